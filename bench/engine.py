"""Engine benchmark: our streaming engine against the reference `qwen-tts`, same run, same checkpoint.

    python bench/engine.py [--checkpoint DIR] [--tiny] [--frames N] [--dtype float32|bfloat16] [--threads N]
                           [--quantize none,int8,int8-dynamic] [--skip-reference] [--peer vox]
                           [--batch N] [--device cpu|cuda]

Builds (once, cached in --cache) a random-weight checkpoint with the real 0.6B-Base
geometry unless --checkpoint is given. Each system runs in its own process (so
peak RSS is its own) on the same reference clip, transcript and text, with the
frame count forced equal (random weights never say EOS; the reference is also
given a suppressed EOS id). Prints a short table, then one JSON object last.

--peer vox: installs vox-tts==0.19.5 (+ numpy) into its own virtual environment in
--cache/vox/venv (bench only; reused), converts the same checkpoint once with
`python -m vox build --dtype bf16 --quant q8` (cached next to the checkpoint as
DIR.vox-bf16-q8.tmod), and times it in a child of that venv (bench/vox_peer.py) on the same
clip, transcript, text and frame count (VOX_DEBUG_NO_EOS=1). --batch N: our engine also with N
concurrent streams through one BatchedEngine (bench/batch.py's run_streams). --device: where
our engine runs (cuda only when torch sees one).

--engine chatterbox: also the Chatterbox-Turbo engine in the same run, once per --onnx-dtypes variant
(default fp32,q4), on --chatterbox-export or a random-weight export built (once, in --cache) by
makima_tts.testing.chatterbox_export with the real geometry of the language model (GPT-2 medium, 24 layers)
and of the decoder (S3Gen: meanflow flow, 2 steps, and HiFT), and a small stand-in speech encoder. It
generates the same audio length as the Qwen3 runs (2 speech tokens per 80 ms frame).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from makima_tts.testing import REF_TEXT, reference_clip

ROOT = Path(__file__).resolve().parents[1]
if not __package__:    # run as a file (python bench/X.py): import bench.* as `python -m bench.X` does
    sys.path.insert(0, str(ROOT))


TEXT = ("Streaming speech synthesis sends each piece of audio as soon as it is ready, "
        "so a listener hears the first words while the rest of the sentence is still being made.")


def peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM (ru_maxrss would carry over the parent's peak from before exec)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def gpu_figures(device) -> dict:
    """On CUDA: the GPU's name and the process's peak GPU memory (torch's allocator); nothing on the CPU."""
    import torch

    if torch.device(device).type != "cuda":
        return {}
    return dict(gpu=torch.cuda.get_device_name(device),
                gpu_peak_mb=round(torch.cuda.max_memory_allocated(device) / 2 ** 20))


def run_ours(args) -> dict:
    import torch

    from makima_tts.engine.qwen3 import Qwen3Engine
    from makima_tts.engine.types import GenerationSettings, SamplingParams

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    engine = Qwen3Engine.load(args.checkpoint, device=args.device, dtype=args.dtype, quantize=args.quantize)
    load_s = time.perf_counter() - t0
    clip = reference_clip(3.0)
    t0 = time.perf_counter()
    voice = engine.create_voice_prompt(clip, 24000, transcript=REF_TEXT)
    prompt_s = time.perf_counter() - t0
    settings = GenerationSettings(talker=SamplingParams(repetition_penalty=1.05), predictor=SamplingParams(),
                                  seed=1, max_frames=args.frames, first_chunk_frames=args.first_chunk_frames)
    t0 = time.perf_counter()
    engine.prepare_voice(voice)      # once per voice: the codec primed with the reference codes
    voice_prime_s = time.perf_counter() - t0
    # Warm up to the steady state: the first pass over freshly loaded (or quantized) weights runs
    # several times slower here (page faults of a VM's memory), and would swamp a short run.
    list(engine.stream(TEXT, voice, "english", GenerationSettings(max_frames=args.warmup_frames, seed=0)))
    stats, figures = timed_utterance(engine, voice, settings)
    frames = stats.frames or 0
    batch = None
    if args.batch:
        batch = run_batch(engine, voice, args)
    return dict(batch=batch, device=str(engine.device), **figures, **gpu_figures(engine.device),
                frame_ms=round(1000 * (stats.talker_s + stats.predictor_s) / max(frames - 1, 1), 1),
                predictor_ms=round(1000 * stats.predictor_s / frames, 1),
                prompt_s=round(prompt_s, 3), voice_prime_s=round(voice_prime_s, 3), load_s=round(load_s, 2),
                peak_rss_mb=round(peak_rss_mb()), quantize=engine.quantize,
                weights=getattr(engine, "load_info", {}).get("weights"))


def timed_utterance(engine, voice, settings):
    """TEXT spoken once, timed: its GenerationStats and the figures every engine reports (frames, audio_s,
    talker_ms, prefill_s, decode_s_per_audio_s, ttfa_s, rtf, total_s)."""
    from makima_tts.engine.types import GenerationStats

    stats = GenerationStats()
    samples = 0
    t0 = time.perf_counter()
    for chunk in engine.stream(TEXT, voice, "english", settings, stats=stats):
        samples += len(chunk.pcm)
    total = time.perf_counter() - t0
    frames = stats.frames or 0
    audio_s = samples / engine.sample_rate
    return stats, dict(frames=frames, audio_s=round(audio_s, 3),
                       talker_ms=round(1000 * stats.talker_s / max(frames - 1, 1), 1),
                       prefill_s=round(stats.prefill_s, 3), decode_s_per_audio_s=round(stats.decode_s / audio_s, 3),
                       ttfa_s=round(stats.ttfa_s or 0.0, 3), rtf=round(total / audio_s, 3), total_s=round(total, 2))


def run_chatterbox(args) -> dict:
    """The Chatterbox engine (one graph variant, --quantize carries it to the child) on the same clip and text."""
    from makima_tts.engine.chatterbox import ChatterboxEngine
    from makima_tts.engine.types import GenerationSettings

    t0 = time.perf_counter()
    engine = ChatterboxEngine.load(args.checkpoint, dtype=args.quantize, threads=args.threads)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    voice = engine.create_voice_prompt(reference_clip(3.0), 24000)
    prompt_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine.prepare_voice(voice)          # once per voice: the language model's cache after its conditioning
    voice_prime_s = time.perf_counter() - t0
    tokens = 2 * args.frames             # 25 speech tokens per second against Qwen3's 12.5 frames
    list(engine.stream(TEXT, voice, "english", GenerationSettings(talker=engine.defaults.talker, seed=0,
                                                                  max_frames=2 * args.warmup_frames)))
    settings = GenerationSettings(talker=engine.defaults.talker, seed=1, max_frames=tokens,
                                  first_chunk_frames=engine.defaults.first_chunk_frames,
                                  chunk_frames=engine.defaults.chunk_frames)
    _, figures = timed_utterance(engine, voice, settings)
    return dict(device="cpu", **figures, frame_ms=figures["talker_ms"], predictor_ms=None,
                prompt_s=round(prompt_s, 3), voice_prime_s=round(voice_prime_s, 3), load_s=round(load_s, 2),
                peak_rss_mb=round(peak_rss_mb()), quantize=engine.dtype, weights="onnx")


def run_batch(engine, voice, args) -> dict:
    """N concurrent streams (each its own text, seed, decoding on its own thread) through one BatchedEngine."""
    from bench.batch import run_streams
    from makima_tts.engine.batch import BatchedEngine
    from makima_tts.engine.types import GenerationSettings

    target = BatchedEngine(engine, max_batch=args.batch)
    try:
        list(target.frames(TEXT, voice, "english", GenerationSettings(max_frames=2, seed=0)))   # warm-up
        la = os.getloadavg()[0]
        r = run_streams(target, voice, args.batch, args.frames, args.first_chunk_frames, True)
    finally:
        target.close()
    r["loadavg_1m_before"] = round(la, 2)
    return r


def measure_floors(threads: int) -> dict:
    """What this machine allows, measured now: the bandwidth of a large fp32 matrix-vector product
    (weights out of cache, as in decoding one frame) and the throughput of a large fp32 matrix product."""
    import torch

    torch.set_num_threads(threads)

    def best(fn, reps):
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    with torch.inference_mode():
        mats = [torch.randn(4096, 4096) for _ in range(8)]          # 8 x 64 MiB: far beyond any cache
        x = torch.randn(1, 4096)
        s = best(lambda: [torch.nn.functional.linear(x, w) for w in mats], 5)
        gemv_gbs = sum(w.numel() * 4 for w in mats) / s / 1e9
        a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
        s = best(lambda: torch.mm(a, b), 5)
        gemm_gflops = 2 * 2048 ** 3 / s / 1e9
    return dict(gemv_fp32_gb_s=round(gemv_gbs, 1), gemm_fp32_gflop_s=round(gemm_gflops, 1))


def run_reference(args) -> dict:
    import numpy as np
    import torch
    from qwen_tts import Qwen3TTSModel


    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    # its README's GPU setting, with sdpa for flash-attn (not installed here)
    model = Qwen3TTSModel.from_pretrained(args.checkpoint, dtype=dtype, attn_implementation="sdpa",
                                          device_map=args.device)
    load_s = time.perf_counter() - t0
    clip = reference_clip(3.0)
    t0 = time.perf_counter()
    items = model.create_voice_clone_prompt(ref_audio=(clip, 24000), ref_text=REF_TEXT)
    prompt_s = time.perf_counter() - t0

    timers = {"predictor_s": 0.0, "decode_s": 0.0}
    predictor = model.model.talker.code_predictor
    orig_generate, orig_decode = predictor.generate, model.model.speech_tokenizer.decode

    def timed_generate(*a, **k):
        t = time.perf_counter()
        try:
            return orig_generate(*a, **k)
        finally:
            timers["predictor_s"] += time.perf_counter() - t

    def timed_decode(*a, **k):
        t = time.perf_counter()
        try:
            return orig_decode(*a, **k)
        finally:
            timers["decode_s"] += time.perf_counter() - t

    model.generate_voice_clone(text=TEXT, language="English", voice_clone_prompt=items,
                               max_new_tokens=args.warmup_frames + 1, eos_token_id=3071)
    predictor.generate, model.model.speech_tokenizer.decode = timed_generate, timed_decode
    t0 = time.perf_counter()
    wavs, sr = model.generate_voice_clone(text=TEXT, language="English", voice_clone_prompt=items,
                                          max_new_tokens=args.frames + 1, eos_token_id=3071)
    total = time.perf_counter() - t0
    frames = args.frames
    audio_s = len(wavs[0]) / sr
    gen_s = total - timers["decode_s"]
    talker_s = gen_s - timers["predictor_s"]
    return dict(
        frames=frames, audio_s=round(audio_s, 3),
        frame_ms=round(1000 * gen_s / frames, 1), talker_ms=round(1000 * talker_s / frames, 1),
        predictor_ms=round(1000 * timers["predictor_s"] / frames, 1), prefill_s=None,
        decode_s_per_audio_s=round(timers["decode_s"] / audio_s, 3),
        ttfa_s=round(total, 3), rtf=round(total / audio_s, 3), total_s=round(total, 2),
        prompt_s=round(prompt_s, 3), load_s=round(load_s, 2), peak_rss_mb=round(peak_rss_mb()),
        audio_rms=float(np.sqrt(np.mean(wavs[0] ** 2))), **gpu_figures(torch.device(args.device)),
    )


def child(system: str, args, quantize: str = "none", checkpoint: str = "") -> dict:
    cmd = [sys.executable, __file__, "--child", system, "--checkpoint", str(checkpoint or args.checkpoint), "--frames",
           str(args.frames), "--dtype", args.dtype, "--threads", str(args.threads),
           "--first-chunk-frames", str(args.first_chunk_frames), "--quantize", quantize,
           "--warmup-frames", str(args.warmup_frames), "--device", args.device, "--batch", str(args.batch)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    la = os.getloadavg()[0]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        return {"error": (r.stderr or r.stdout).strip().splitlines()[-5:]}
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out.update(loadavg_1m_before=round(la, 2), loadavg_1m_after=round(os.getloadavg()[0], 2))
    return out


def main() -> None:
    from makima_tts.engine.types import GenerationSettings

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="checkpoint folder (default: build a random one in --cache)")
    ap.add_argument("--tiny", action="store_true", help="use the tiny test checkpoint (seconds)")
    ap.add_argument("--frames", type=int, default=125, help="frames to generate (125 = 10 s)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--first-chunk-frames", type=int, default=GenerationSettings().first_chunk_frames,
                    help="frames in the first chunk (default: the engine's, 1)")
    ap.add_argument("--warmup-frames", type=int, default=12, help="frames generated once before timing")
    ap.add_argument("--cache", default=str(ROOT / ".cache" / "bench"), help="where built checkpoints are kept")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--quantize", "--quant", default="auto",
                    help="our engine's weights: none, int8, int8-dynamic; a comma list runs each (same run)")
    ap.add_argument("--peer", default="", help="also run a peer in the same run: vox (vox-tts 0.19.5, q8)")
    ap.add_argument("--batch", type=int, default=0, help="also run our engine with N concurrent batched streams")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where our engine runs")
    ap.add_argument("--engine", default="qwen3", choices=["qwen3", "chatterbox"],
                    help="chatterbox: also run the Chatterbox-Turbo engine beside Qwen3 (same run)")
    ap.add_argument("--chatterbox-export", help="Chatterbox ONNX export folder (default: build a random one in --cache)")
    ap.add_argument("--onnx-dtypes", default="fp32,q4", help="the Chatterbox graph variants to run (comma list)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device == "cuda" and not args.child:
        import torch

        if not torch.cuda.is_available():
            sys.exit("--device cuda: torch sees no CUDA device here (torch %s, cuda build %s); use --device cpu"
                     % (torch.__version__, torch.version.cuda))
    if args.peer and args.peer != "vox":
        sys.exit(f"--peer {args.peer}: only vox is supported")

    if args.child:
        result = {"ours": run_ours, "reference": run_reference, "chatterbox": run_chatterbox,
                  "floors": lambda a: measure_floors(a.threads)}[args.child](args)
        print(json.dumps(result))
        return

    if not args.checkpoint:
        from makima_tts.testing.checkpoints import build_checkpoint

        name = "tiny" if args.tiny else "full-0.6b-base"
        print(f"checkpoint: building/using {args.cache}/{name}", file=sys.stderr)
        args.checkpoint = str(build_checkpoint(Path(args.cache) / name, tiny=args.tiny))
    variants = [q.strip() for q in args.quantize.split(",") if q.strip()] or ["none"]
    results = {"settings": {"checkpoint": args.checkpoint, "frames": args.frames, "dtype": args.dtype,
                            "threads": args.threads, "first_chunk_frames": args.first_chunk_frames,
                            "device": args.device, "batch": args.batch, "peer": args.peer or None,
                            "cpu": _cpu_name(), "loadavg_before": [round(x, 2) for x in os.getloadavg()]}}
    results["floors"] = child("floors", args)
    systems = []
    for i, q in enumerate(variants):
        name = "ours" if i == 0 else f"ours_{q}"
        results[name] = child("ours", args, q)
        systems.append(name)
    if not args.skip_reference:
        results["reference"] = child("reference", args)
    if args.engine == "chatterbox":
        dtypes = [d.strip() for d in args.onnx_dtypes.split(",") if d.strip()]
        export = args.chatterbox_export
        if not export:
            from makima_tts.testing.chatterbox_export import build_chatterbox_export

            name = "chatterbox-tiny" if args.tiny else "chatterbox-full"
            print(f"chatterbox export: building/using {args.cache}/{name}", file=sys.stderr)
            export = str(build_chatterbox_export(Path(args.cache) / name, tiny=args.tiny,
                                                 dtypes=sorted(set(dtypes) | {"fp32"})))
        results["settings"]["chatterbox_export"] = export
        for d in dtypes:
            results[f"chatterbox_{d}"] = child("chatterbox", args, d, checkpoint=export)
            systems.append(f"chatterbox_{d}")
    if args.peer == "vox":
        results["peer"] = run_vox(args)
    results["settings"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    fields = ["frame_ms", "talker_ms", "predictor_ms", "decode_s_per_audio_s", "ttfa_s", "rtf", "peak_rss_mb",
              "load_s"]
    fields = ["quantize"] + fields + (["gpu_peak_mb"] if args.device == "cuda" else [])
    print(f"{'system':<18}" + "".join(f"{f:>21}" for f in fields))
    for system in systems + ["reference", "peer"]:
        if system in results:
            row = results[system]
            if "error" in row:
                print(f"{system:<18} error: {row['error'][-1]}")
                continue
            print(f"{system:<18}" + "".join(f"{str(row.get(f, '-')):>21}" for f in fields))
    print("floors:", results["floors"])
    peer = results.get("peer")
    if peer and "error" not in peer:
        fu = peer["first_use"]
        print(f"peer {peer['system']}: first audio on the voice's first use {fu['first_audio_incl_clone_s']} s "
              f"(clone {fu['clone_s']} s + first chunk {fu['ttfa_s']} s), second use {peer['ttfa_s']} s; "
              f"chunks of {peer['first_chunk_ms']} ms; not available: {'; '.join(peer['not_available'])}")
    if peer and peer.get("many"):
        print("peer several streams (synthesize_many): " + ", ".join(
            f"{m['streams']}: {m['aggregate_audio_s_per_s']} audio s per wall s" for m in peer["many"]))
    for system in systems:
        b = results[system].get("batch") if isinstance(results[system], dict) else None
        if b:
            print(f"{system} batched x{b['streams']}: {b['aggregate_audio_s_per_s']} audio s per wall s, "
                  f"{b['frame_ms_per_stream']} ms/frame per stream, first audio p50 {b['ttfa_p50_s']} s "
                  f"p95 {b['ttfa_p95_s']} s")
    print(f"load average before {results['settings']['loadavg_before']}, after {results['settings']['loadavg_after']}")
    print(json.dumps(results))


VOX_VERSION = "0.19.5"


def run_vox(args) -> dict:
    """vox-tts in its own venv (created/reused under --cache/vox), the checkpoint converted once (cached
    next to it), timed in a child of that venv's python. Returns the peer's figures or {"error": ...}."""
    import numpy as np


    cache = Path(args.cache) / "vox"
    venv = cache / "venv"
    py = venv / "bin" / "python"
    try:
        ok = py.exists() and subprocess.run([str(py), "-c", f"import vox, numpy; assert vox.__version__ == '{VOX_VERSION}'"],
                                            capture_output=True).returncode == 0
        if not ok:
            print(f"peer vox: installing vox-tts=={VOX_VERSION} into {venv}", file=sys.stderr)
            subprocess.run(["python3", "-m", "venv", str(venv)], check=True,
                           capture_output=True, text=True)
            r = subprocess.run([str(py), "-m", "pip", "install", "-q", f"vox-tts=={VOX_VERSION}", "numpy"],
                               capture_output=True, text=True)
            if r.returncode != 0:
                return {"error": ["pip install vox-tts failed"] + (r.stderr or r.stdout).strip().splitlines()[-5:]}
        ckpt = Path(args.checkpoint).resolve()
        tmod = ckpt.parent / f"{ckpt.name}.vox-bf16-q8.tmod"
        if not tmod.exists():
            print(f"peer vox: converting {ckpt} -> {tmod}", file=sys.stderr)
            tmp = tmod.with_name(tmod.name + ".tmp.tmod")
            r = subprocess.run([str(py), "-m", "vox", "build", "--model", str(ckpt), "--dtype", "bf16", "--quant", "q8",
                                "-o", str(tmp)], capture_output=True, text=True)
            if r.returncode != 0:
                return {"error": ["vox build failed"] + (r.stderr or r.stdout).strip().splitlines()[-5:]}
            tmp.rename(tmod)
        clip_path = cache / "reference_clip_3s.npy"
        np.save(clip_path, reference_clip(3.0).astype(np.float32))
        env = dict(os.environ, VOX_DEBUG_NO_EOS="1", OMP_NUM_THREADS=str(args.threads))
        cmd = [str(py), str(ROOT / "bench" / "vox_peer.py"), "--tmod", str(tmod), "--clip", str(clip_path),
               "--ref-text", REF_TEXT, "--text", TEXT, "--frames", str(args.frames), "--threads", str(args.threads)]
        if args.batch:          # the peer's own several-streams path, same stream counts as ours
            cmd += ["--many", ",".join(str(n) for n in sorted({1, 2, 4, 8, args.batch}) if n <= args.batch)]
        la = os.getloadavg()[0]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            return {"error": (r.stderr or r.stdout).strip().splitlines()[-5:]}
        out = json.loads(r.stdout.strip().splitlines()[-1])
        out.update(tmod=str(tmod), loadavg_1m_before=round(la, 2), loadavg_1m_after=round(os.getloadavg()[0], 2))
        return out
    except (OSError, subprocess.CalledProcessError, ValueError) as e:
        return {"error": [repr(e)]}


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
