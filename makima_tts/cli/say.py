"""`makima-tts say "text" --checkpoint DIR_OR_REPO --ref-audio ref.wav --ref-text "..." -o out.wav`, or
`makima-tts say "text" --server URL [--api-key K] [--voice V] -o out.wav` through a running server.

Without --server, `--engine auto|qwen3|chatterbox|piper` chooses and loads the engine as `serve` does
(server.engines.load_engine): auto takes the checkpoint's engine (Chatterbox for a folder in its ONNX
layout, else Qwen3-TTS), or the embedded Piper engine when no checkpoint is given."""
from __future__ import annotations

import argparse
import os
import sys

from ..engine.types import LANGUAGES


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults: the checkpoint's generation_config.json)")
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    g.add_argument("--greedy", action="store_true", help="no sampling: greedy decoding in both stages")
    for stage, prefix in (("talker", ""), ("code predictor", "predictor-")):
        g.add_argument(f"--{prefix}temperature", type=float, default=None, help=f"{stage} temperature")
        g.add_argument(f"--{prefix}top-k", type=int, default=None, help=f"{stage} top-k")
        g.add_argument(f"--{prefix}top-p", type=float, default=None, help=f"{stage} top-p")
        g.add_argument(f"--{prefix}repetition-penalty", type=float, default=None, help=f"{stage} repetition penalty")
    g.add_argument("--max-frames", type=int, default=None, help="cap on 80 ms frames (default: from text length)")


def settings_from_args(args: argparse.Namespace, defaults):
    """The engine's defaults with the sampling flags, merged as the server merges a request's."""
    return defaults.with_overrides({**sampling_from_args(args), "max_frames": args.max_frames})


def register(sub) -> None:
    p = sub.add_parser("say", help="speak a text into a WAV file (or raw PCM to stdout)",
                       description="Speak TEXT with a voice cloned from a reference clip.")
    p.add_argument("text", help="what to say ('-' reads standard input)")
    p.add_argument("--server", default=os.environ.get("MAKIMA_TTS_SERVER"), metavar="URL",
                   help="speak through a running makima-tts server (http://HOST:PORT) instead of loading an "
                        "engine (env MAKIMA_TTS_SERVER)")
    p.add_argument("--api-key", default=os.environ.get("MAKIMA_TTS_API_KEY"),
                   help="with --server: the server's API key (env MAKIMA_TTS_API_KEY)")
    p.add_argument("--voice", help="with --server: a voice id of the server's library; with --engine piper: one of "
                                   "its built-in voices")
    p.add_argument("--sample-rate", type=int, default=24000, help="with --server: output rate (8000-48000)")
    p.add_argument("--timeout", type=float, default=None,
                   help="with --server: seconds to wait for first audio and between chunks")
    p.add_argument("--failure-threshold", type=int, default=None,
                   help="with --server: consecutive failures (connection attempts) before the circuit breaker "
                        "opens and the call fails fast with CIRCUIT_OPEN")
    p.add_argument("--engine", default="auto", choices=["auto", "qwen3", "chatterbox", "piper"],
                   help="the engine, chosen as `serve` chooses it (auto: the checkpoint's engine; Piper without one)")
    p.add_argument("--checkpoint", default=os.environ.get("MAKIMA_TTS_CHECKPOINT"),
                   help="Qwen3-TTS checkpoint or Chatterbox-Turbo ONNX export: a folder or Hugging Face repo id "
                        "(env MAKIMA_TTS_CHECKPOINT)")
    p.add_argument("--ref-audio", help="reference clip of the voice (3-10 s; any rate, mono or stereo)")
    p.add_argument("--ref-text", help="transcript of the reference clip")
    p.add_argument("--x-vector-only", action="store_true", help="clone from the speaker embedding alone (no transcript)")
    p.add_argument("--voice-prompt", help="a saved voice prompt (.safetensors) instead of --ref-audio")
    p.add_argument("--save-voice-prompt", help="write the computed voice prompt here for reuse")
    p.add_argument("--language", default="auto", help=f"one of: {', '.join(LANGUAGES)}")
    p.add_argument("-o", "--output", default="out.wav",
                   help="output WAV file ('-' for raw PCM on stdout: float32, or with --server 16-bit little-endian)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="Qwen3's float dtype")
    p.add_argument("--onnx-dtype", default="auto", choices=["auto", "fp32", "fp16", "q8", "q4", "q4f16"],
                   help="Chatterbox: which of the export's graphs (auto: q4 on the CPU where present, else fp32)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--quantize", default="none", choices=["none", "int8", "int4", "int8-dynamic"],
                   help="int8 weights for the talker and code predictor (CPU, float32; faster, small error)")
    add_sampling_flags(p)
    p.set_defaults(func=run)


def sampling_from_args(args: argparse.Namespace) -> dict:
    """The sampling flags as the protocol's `start.sampling` (only those given)."""
    def stage(prefix: str) -> dict:
        out = {field: getattr(args, prefix + field) for field in ("temperature", "top_k", "top_p", "repetition_penalty")
               if getattr(args, prefix + field) is not None}
        if args.greedy:
            out["do_sample"] = False
        return out

    sampling = stage("")
    predictor = stage("predictor_")
    if predictor:
        sampling["predictor"] = predictor
    if args.seed is not None:
        sampling["seed"] = args.seed
    return sampling


def run_server(args: argparse.Namespace, text: str) -> int:
    """Through a running server with makima_tts.client (errors: ClientError, a MakimaError)."""
    from ..client import Client

    settings = {}
    if args.timeout is not None:
        settings.update(first_audio_timeout=args.timeout, chunk_gap_timeout=args.timeout)
    if args.failure_threshold is not None:
        settings["failure_threshold"] = args.failure_threshold
    to_stdout = args.output == "-"
    language = None if args.language == "auto" else args.language
    with Client(args.server, args.api_key, sampling=sampling_from_args(args) or None, **settings) as client:
        utterance = client.speak(text, voice=args.voice, language=language, format="pcm_s16le",
                                 sample_rate=args.sample_rate)
        if to_stdout:
            for chunk in utterance:
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
            return 0
        import numpy as np
        import soundfile as sf

        from ..fileio import atomic_path

        with atomic_path(args.output) as tmp:        # a failure leaves no file, not half of one
            with sf.SoundFile(tmp, "w", samplerate=args.sample_rate, channels=1, subtype="PCM_16",
                              format="WAV") as out:
                for chunk in utterance:
                    out.write(np.frombuffer(chunk, "<i2"))
        end = utterance.end or {}
    print(f"wrote {args.output}: {end.get('audio_ms', 0) / 1000:.2f} s of audio from {args.server} "
          f"(first audio after {(end.get('ttfa_ms') or 0) / 1000:.2f} s)", file=sys.stderr)
    return 0


def load_engine(args: argparse.Namespace):
    """The engine the flags choose, loaded as the server loads it (server.engines.load_engine)."""
    from ..errors import CheckpointError
    from ..server.engines import load_engine as load
    from ..server.settings import Settings

    if args.engine in ("qwen3", "chatterbox") and not args.checkpoint:
        raise CheckpointError(f"no checkpoint: --engine {args.engine} needs --checkpoint DIR_OR_REPO "
                              "(or MAKIMA_TTS_CHECKPOINT)")
    # model_construct: the flags alone (not the server's MAKIMA_TTS_* environment); one stream, no batching
    settings = Settings.model_construct(engine=args.engine, checkpoint=args.checkpoint, device=args.device,
                                        dtype=args.dtype, quantize=args.quantize, onnx_dtype=args.onnx_dtype,
                                        threads=args.threads, batch=False)
    if settings.engine == "auto" and settings.checkpoint:
        # the checkpoint's engine, as the server picks it; a checkpoint that does not load is an error here,
        # not the server's fall-back to the embedded engine
        settings.engine = "chatterbox" if settings.wants_chatterbox else "qwen3"
    engine, _ = load(settings)
    return engine


def _voice(args: argparse.Namespace, engine):
    """The voice to speak with: a saved prompt, a clip cloned now, or (an engine that cannot clone) --voice."""
    import soundfile as sf

    from ..engine.types import VoicePrompt
    from ..errors import CloningUnsupported, InvalidAudio

    if not engine.supports_cloning:
        if args.voice_prompt or args.ref_audio:
            raise CloningUnsupported(f"the {engine.name} engine cannot clone a voice: drop --ref-audio and "
                                     "--voice-prompt (--voice picks one of its own), or pass --checkpoint")
        return args.voice
    if args.voice_prompt:
        return VoicePrompt.load(args.voice_prompt)
    if not args.ref_audio:
        raise InvalidAudio("a voice is needed: pass --ref-audio (with --ref-text or --x-vector-only) or --voice-prompt")
    try:
        wav, sr = sf.read(args.ref_audio, dtype="float32", always_2d=False)
    except Exception as exc:
        raise InvalidAudio(f"cannot read the reference clip {args.ref_audio}: {exc}") from exc
    voice = engine.create_voice_prompt(wav, sr, transcript=args.ref_text, x_vector_only=args.x_vector_only)
    if args.save_voice_prompt:
        voice.save(args.save_voice_prompt)
    return voice


def run(args: argparse.Namespace) -> int:
    """Errors (MakimaError) are reported by the dispatcher as `error [CODE]: message`, exit 2."""
    if args.server:
        return run_server(args, sys.stdin.read() if args.text == "-" else args.text)
    import time

    import numpy as np
    import soundfile as sf

    from ..engine.types import GenerationSettings

    text = sys.stdin.read() if args.text == "-" else args.text
    engine = load_engine(args)
    voice = _voice(args, engine)
    settings = settings_from_args(args, getattr(engine, "defaults", None) or GenerationSettings())
    t0 = time.perf_counter()
    chunks = engine.stream(text, voice, args.language, settings)
    if args.output == "-":
        for chunk in chunks:
            sys.stdout.buffer.write(chunk.pcm.astype(np.float32).tobytes())
            sys.stdout.buffer.flush()
        return 0
    samples, ttfa = 0, None
    with sf.SoundFile(args.output, "w", samplerate=engine.sample_rate, channels=1, subtype="PCM_16") as out:
        for chunk in chunks:
            if ttfa is None:
                ttfa = time.perf_counter() - t0
            out.write(chunk.pcm)
            samples += len(chunk.pcm)
    print(f"wrote {args.output}: {samples / engine.sample_rate:.2f} s of audio in {time.perf_counter() - t0:.2f} s "
          f"(first audio after {ttfa or 0:.2f} s)", file=sys.stderr)
    return 0
