"""`makima-tts bench`: time the engine on this machine (ms per frame, first audio, real-time factor).

The full comparisons (against the reference package, peers, the server and many sessions) are
the scripts in bench/ of the source tree; this command needs only an installed package.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time

REF_TEXT = "Hello world. This is a test of the voice."
TEXT = ("Streaming speech synthesis sends each piece of audio as soon as it is ready, "
        "so a listener hears the first words while the rest of the sentence is still being made.")


def register(sub) -> None:
    p = sub.add_parser("bench", help="time the engine here: ms per frame, first audio, real-time factor",
                       description="Time the Qwen3-TTS engine on this machine; prints a table and one JSON line. "
                                   "Without --ref-audio a synthetic 3 s clip stands in for the voice.")
    p.add_argument("--checkpoint", required=True, help="Qwen3-TTS checkpoint folder or Hugging Face repo id")
    p.add_argument("--ref-audio", help="reference clip (default: a synthetic 3 s clip)")
    p.add_argument("--ref-text", default=REF_TEXT, help="its transcript")
    p.add_argument("--text", default=TEXT)
    p.add_argument("--frames", type=int, default=125, help="frames to generate (125 = 10 s of audio)")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--quantize", default="none", help="none or int8")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=run)


def _clip():
    import numpy as np

    t = np.arange(72000) / 24000
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    voiced = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / 24000) / k for k in range(1, 12))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t) ** 2
    return (0.3 * voiced / np.abs(voiced).max() * envelope).astype(np.float32), 24000


def run(args: argparse.Namespace) -> int:
    """Errors (MakimaError) are reported by the dispatcher as `error [CODE]: message`, exit 2."""
    import torch

    from ..audio import read_audio
    from ..engine.qwen3 import Qwen3Engine
    from ..engine.types import GenerationSettings, GenerationStats, SamplingParams

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    kw = {"quantize": args.quantize} if args.quantize != "none" else {}
    engine = Qwen3Engine.load(args.checkpoint, device=args.device, dtype=args.dtype, **kw)
    load_s = time.perf_counter() - t0
    wav, sr = read_audio(args.ref_audio) if args.ref_audio else _clip()
    t0 = time.perf_counter()
    voice = engine.create_voice_prompt(wav, sr, transcript=args.ref_text)
    prompt_s = time.perf_counter() - t0
    settings = GenerationSettings(talker=SamplingParams(repetition_penalty=1.05), predictor=SamplingParams(),
                                  seed=1, max_frames=args.frames)
    list(engine.stream("Warm up.", voice, "english", GenerationSettings(max_frames=2, seed=0)))
    rows = []
    for _ in range(args.runs):
        stats = GenerationStats()
        samples = 0
        t0 = time.perf_counter()
        for chunk in engine.stream(args.text, voice, "english", settings, stats=stats):
            samples += len(chunk.pcm)
        total = time.perf_counter() - t0
        audio_s = samples / engine.sample_rate
        frames = max(stats.frames or 1, 1)
        rows.append({"frames": frames, "audio_s": round(audio_s, 2),
                     "frame_ms": round(1000 * (stats.talker_s + stats.predictor_s) / frames, 1),
                     "decode_s_per_audio_s": round(stats.decode_s / max(audio_s, 1e-9), 3),
                     "ttfa_s": round(stats.ttfa_s if stats.ttfa_s is not None else float("nan"), 3), "rtf": round(total / max(audio_s, 1e-9), 3)})
    result = {"checkpoint": str(args.checkpoint), "device": args.device, "dtype": str(engine.dtype).removeprefix("torch."),
              "quantize": args.quantize, "threads": torch.get_num_threads(), "load_s": round(load_s, 2),
              "prompt_s": round(prompt_s, 3),
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), "runs": rows}
    print(f"{'run':>4}{'frames':>8}{'audio_s':>9}{'frame_ms':>10}{'decode_s/s':>12}{'ttfa_s':>8}{'rtf':>8}",
          file=sys.stderr)
    for i, r in enumerate(rows):
        print(f"{i:>4}{r['frames']:>8}{r['audio_s']:>9}{r['frame_ms']:>10}{r['decode_s_per_audio_s']:>12}"
              f"{r['ttfa_s']:>8}{r['rtf']:>8}", file=sys.stderr)
    print(json.dumps(result))
    return 0
