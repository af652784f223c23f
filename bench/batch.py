"""Several concurrent streams: batched (one BatchedEngine scheduler) against unbatched (a thread per
stream, each running Qwen3Engine.stream, as the server does without batching), same run, same process.

    python bench/batch.py [--streams 1,2,4,8] [--frames 40] [--tiny] [--quantize none|int8|int8-dynamic]
                          [--threads 2] [--modes unbatched,batched] [--no-decode] [--checkpoint DIR]
                          [--device cpu|cuda]

Builds (once, cached in .cache/bench) a random-weight checkpoint with the real 0.6B-Base geometry
(or the tiny test one with --tiny). Every stream clones the same 3 s voice (computed once), speaks
its own text with seeded sampling and exactly --frames frames (random weights never say EOS),
and decodes its audio on its own thread. For each N and mode: aggregate audio seconds per wall
second, per-stream ms per frame after its first audio, first-audio p50/p95 (all N streams start
at once). The load average before and after is recorded: other work on the machine skews figures.
Prints a table, then one JSON object last.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path

from makima_tts.testing import REF_TEXT, reference_clip

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["Streaming speech synthesis sends each piece of audio as soon as it is ready.",
         "A listener hears the first words while the rest of the sentence is still being made.",
         "Several voices can be served at once when their steps share each read of the weights.",
         "The quick brown fox jumps over the lazy dog, again and again, until the sun goes down."]


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def run_streams(target, voice, n, frames, first_chunk, decode):
    from makima_tts.engine.types import GenerationSettings, GenerationStats, SamplingParams

    first_chunk = first_chunk if first_chunk is not None else GenerationSettings().first_chunk_frames
    results = [None] * n
    errors = []
    start = threading.Barrier(n + 1)

    def one(i):
        settings = GenerationSettings(talker=SamplingParams(repetition_penalty=1.05), predictor=SamplingParams(),
                                      seed=100 + i, max_frames=frames, first_chunk_frames=first_chunk)
        stats = GenerationStats()
        start.wait()
        t0 = time.perf_counter()
        try:
            if decode:
                samples = 0
                for chunk in target.stream(TEXTS[i % len(TEXTS)], voice, "english", settings, stats=stats):
                    samples += len(chunk.pcm)
                audio_s = samples / 24000
            else:
                got = 0
                for _ in target.frames(TEXTS[i % len(TEXTS)], voice, "english", settings, stats=stats):
                    got += 1
                    if got == first_chunk:
                        stats.ttfa_s = time.perf_counter() - t0
                stats.frames = got
                audio_s = got * 0.08
        except BaseException as e:      # noqa: BLE001
            errors.append(repr(e))
            return
        total = time.perf_counter() - t0
        nf = stats.frames or 0
        results[i] = dict(audio_s=audio_s, total_s=total, ttfa_s=stats.ttfa_s, frames=nf,
                          frame_ms=1000 * (total - (stats.ttfa_s or 0.0)) / max(nf - first_chunk, 1))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(errors[0])
    audio = sum(r["audio_s"] for r in results)
    ttfa = [r["ttfa_s"] for r in results]
    return dict(streams=n, wall_s=round(wall, 2), audio_s=round(audio, 2),
                aggregate_audio_s_per_s=round(audio / wall, 3),
                frame_ms_per_stream=round(statistics.mean(r["frame_ms"] for r in results), 1),
                ttfa_p50_s=round(pct(ttfa, 0.5), 3), ttfa_p95_s=round(pct(ttfa, 0.95), 3),
                frames_per_stream=results[0]["frames"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--cache", default=str(ROOT / ".cache" / "bench"))
    ap.add_argument("--tiny", action="store_true", help="the tiny test checkpoint (a smoke run)")
    ap.add_argument("--streams", default="1,2,4,8")
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--first-chunk-frames", type=int, default=None,
                    help="frames in a stream's first chunk (default: the engine's, GenerationSettings)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quantize", nargs="?", const="int8", default="auto",
                    help="auto (the default path) | none | int8 | int8-dynamic (bare --quantize: int8)")
    ap.add_argument("--modes", default="unbatched,batched")
    ap.add_argument("--no-decode", action="store_true", help="frames only: no codec decoding on the stream threads")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the engine runs")
    args = ap.parse_args()

    import torch

    from makima_tts.engine.batch import BatchedEngine
    from makima_tts.engine.qwen3 import Qwen3Engine
    from makima_tts.engine.types import GenerationSettings
    from bench.engine import gpu_figures
    from makima_tts.testing.checkpoints import build_checkpoint

    torch.set_num_threads(args.threads)
    ckpt = args.checkpoint or str(build_checkpoint(Path(args.cache) / ("tiny" if args.tiny else "full-0.6b-base"),
                                                   tiny=args.tiny))
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    engine = Qwen3Engine.load(ckpt, device=args.device, quantize=args.quantize)
    load_s = time.perf_counter() - t0
    voice = engine.create_voice_prompt(reference_clip(3.0), 24000, transcript=REF_TEXT)
    engine.prepare_voice(voice)                 # prime the codec once per voice
    # warm-up: the first pass over fresh weights is slow (page faults)
    list(engine.stream(TEXTS[0], voice, "english", GenerationSettings(max_frames=4, seed=0)))
    counts = [int(x) for x in args.streams.split(",") if x]
    modes = [m for m in args.modes.split(",") if m]
    rows = []
    for n in counts:
        for mode in modes:
            if mode == "batched":
                target = BatchedEngine(engine, max_batch=n)
                list(target.frames(TEXTS[0], voice, "english", GenerationSettings(max_frames=2, seed=0)))
            else:
                target = engine
            la = os.getloadavg()[0]
            r = run_streams(target, voice, n, args.frames, args.first_chunk_frames, not args.no_decode)
            if mode == "batched":
                target.close()
            r.update(mode=mode, loadavg_1m_before=round(la, 2))
            rows.append(r)
            print(f"{mode:>9} N={n}: {r['aggregate_audio_s_per_s']:.3f} audio s / s, "
                  f"{r['frame_ms_per_stream']:.0f} ms/frame per stream, first audio p50 {r['ttfa_p50_s']:.2f} s "
                  f"p95 {r['ttfa_p95_s']:.2f} s, wall {r['wall_s']:.1f} s (load {la:.1f})", flush=True)
    load_after = os.getloadavg()

    print()
    print(f"{'streams':>7} {'mode':>9} {'agg audio s/s':>13} {'ms/frame/stream':>15} {'ttfa p50':>8} {'ttfa p95':>8}")
    for r in rows:
        print(f"{r['streams']:>7} {r['mode']:>9} {r['aggregate_audio_s_per_s']:>13.3f} {r['frame_ms_per_stream']:>15.1f} "
              f"{r['ttfa_p50_s']:>8.2f} {r['ttfa_p95_s']:>8.2f}")
    speedup = {}
    for n in counts:
        by = {r["mode"]: r for r in rows if r["streams"] == n}
        if "batched" in by and "unbatched" in by:
            speedup[str(n)] = round(by["batched"]["aggregate_audio_s_per_s"] /
                                    by["unbatched"]["aggregate_audio_s_per_s"], 2)
    if speedup:
        print("batched / unbatched aggregate:", speedup)
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} "
          "(above ~0.5 means other work shared these cores)")
    print(json.dumps(dict(checkpoint=ckpt, tiny=args.tiny, threads=args.threads, quantize=engine.quantize,
                          device=str(engine.device), **gpu_figures(engine.device),
                          frames=args.frames, decode=not args.no_decode, load_s=round(load_s, 1),
                          loadavg_before=[round(x, 2) for x in load_before],
                          loadavg_after=[round(x, 2) for x in load_after], results=rows,
                          batched_over_unbatched=speedup)))


if __name__ == "__main__":
    main()
