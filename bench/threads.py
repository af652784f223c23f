"""Frame time against thread count and OpenMP wait policy, alone and beside a busy neighbour.

    python -m bench.threads [--checkpoint DIR] [--tiny] [--frames 16] [--threads 1,2]

Each configuration is a fresh child process (the OpenMP runtime reads OMP_WAIT_POLICY when it starts):
it loads the default engine (int8), makes an ICL voice, generates a few frames to warm up, then times
`--frames` frames of one stream (talker + code predictor, sampled, no codec). "busy neighbour": one
more process spins on a core meanwhile (what an LLM, a browser or a second server beside ours does).
With OpenMP's default (active) policy, an intra-op team whose second thread is not running waits for
it at every parallel region, so the per-frame cost can grow by an order of magnitude when a core is
taken; the passive policy parks the thread instead. Prints a table, then one JSON object last.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

if not __package__:    # run as a file: import bench.* as `python -m bench.threads` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_checkpoint_flags, checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("Streaming speech synthesis sends each piece of audio as soon as it is ready, "
        "so a listener hears the first words while the rest of the sentence is still being made.")


def child(ckpt: str, threads: int, frames: int) -> dict:
    import torch

    from makima_tts.engine.generate import FrameGenerator
    from makima_tts.engine.qwen3 import Qwen3Engine
    from makima_tts.engine.types import GenerationSettings
    from makima_tts.testing import REF_TEXT, reference_clip

    torch.set_num_threads(threads)
    engine = Qwen3Engine.load(ckpt)
    voice = engine.prepare_voice(engine.create_voice_prompt(reference_clip(3.0), 24000, transcript=REF_TEXT))
    row = engine.plan(TEXT, voice, "english", GenerationSettings(max_frames=frames + 8, seed=1))
    gen = FrameGenerator(engine.talker, engine.ids, rows=1, length=row.prompt.length + 64)
    gen.join([row])
    for _ in range(4):                       # warm up
        gen.complete()
        gen.advance()
    times = []
    for _ in range(frames):
        t0 = time.perf_counter()
        gen.complete()
        gen.advance()
        times.append(time.perf_counter() - t0)
    times.sort()
    return dict(frame_ms_median=round(1000 * times[len(times) // 2], 1), frame_ms_min=round(1000 * times[0], 1),
                frame_ms_mean=round(1000 * sum(times) / len(times), 1), quantize=engine.quantize)


def _spin() -> None:
    while True:
        pass


def run(ckpt: str, threads: int, policy: str, neighbour: bool, frames: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    spinner = None
    if neighbour:
        spinner = multiprocessing.Process(target=_spin, daemon=True)
        spinner.start()
    try:
        out = subprocess.run([sys.executable, "-m", "bench.threads", "--child", "--checkpoint", ckpt,
                              "--threads", str(threads), "--frames", str(frames)],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    finally:
        if spinner is not None:
            spinner.terminate()
            spinner.join()
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return dict(threads=threads, omp_wait_policy=policy, busy_neighbour=neighbour,
                **json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_flags(ap)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--policies", default="default,PASSIVE")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    ckpt = checkpoint(args)
    if args.child:
        print(json.dumps(child(ckpt, int(args.threads), args.frames)))
        return
    load_before = os.getloadavg()
    rows = [run(ckpt, int(t), p, n, args.frames) for n in (False, True) for t in args.threads.split(",")
            for p in args.policies.split(",")]
    print(f"{'threads':>7} {'OMP_WAIT_POLICY':>15} {'neighbour':>9} {'median ms/frame':>15} {'min':>7}")
    for r in rows:
        print(f"{r['threads']:>7} {r['omp_wait_policy']:>15} {str(r['busy_neighbour']):>9} "
              f"{r['frame_ms_median']:>15} {r['frame_ms_min']:>7}")
    print(json.dumps(dict(checkpoint=ckpt, cpus=os.cpu_count(), loadavg_before=load_before,
                          loadavg_after=os.getloadavg(), rows=rows)))


if __name__ == "__main__":
    main()
