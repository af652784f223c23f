"""Server benchmark: time to first audio over the WebSocket and over HTTP against the engine
alone (the server's overhead), and how many idle WebSocket sessions one server holds.

    python bench/server.py [--checkpoint DIR | --tiny] [--runs N] [--sessions N] [--threads N]

Our engine runs in this process for the engine-alone figure; the server is a real
`makima-tts serve` child process on loopback, driven by `websockets` and `httpx`. The same
voice (a 3 s clip and its transcript), text and chunking are used everywhere. Prints a short
table, then one JSON object last.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from makima_tts.testing import REF_TEXT, reference_clip

ROOT = Path(__file__).resolve().parents[1]
if not __package__:    # run as a file (python bench/X.py): import bench.* as `python -m bench.X` does
    sys.path.insert(0, str(ROOT))

from bench.common import add_checkpoint_flags, checkpoint  # noqa: E402
TEXT = "Streaming speech sends each piece of audio as soon as it is ready."


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def engine_alone(checkpoint: str, runs: int) -> dict:
    from makima_tts.engine.qwen3 import Qwen3Engine

    engine = Qwen3Engine.load(checkpoint)
    voice = engine.create_voice_prompt(reference_clip(3.0), 24000, transcript=REF_TEXT)
    times = []
    for _ in range(runs + 1):                     # the first run warms up
        t0 = time.perf_counter()
        stream = engine.stream(TEXT, voice, "english")
        next(stream)
        times.append(time.perf_counter() - t0)
        stream.close()
    return {"ttfa_ms": round(1000 * statistics.median(times[1:]), 1), "runs": runs}


async def ws_ttfa(url: str, runs: int) -> dict:
    import websockets

    times = []
    async with websockets.connect(url + "/api/v1/speak", max_size=None) as ws:
        json.loads(await ws.recv())
        for i in range(runs + 1):
            t0 = time.perf_counter()
            await ws.send(json.dumps({"type": "speak", "text": TEXT, "id": f"r{i}"}))
            first = None
            while True:
                m = await ws.recv()
                if isinstance(m, bytes):
                    if first is None:
                        first = time.perf_counter() - t0
                        await ws.send(json.dumps({"type": "cancel"}))   # only the first audio is timed
                    continue
                if json.loads(m)["type"] in ("cancelled", "audio_end", "error"):
                    break
            times.append(first)
    return {"ttfa_ms": round(1000 * statistics.median(times[1:]), 1), "runs": runs}


def http_ttfb(url: str, runs: int) -> dict:
    import httpx

    times = []
    for _ in range(runs + 1):
        t0 = time.perf_counter()
        with httpx.stream("POST", url + "/v1/audio/speech", timeout=300,
                          json={"input": TEXT, "response_format": "pcm"}) as r:
            chunks = r.iter_bytes()
            next(chunks)
            times.append(time.perf_counter() - t0)
    return {"ttfb_ms": round(1000 * statistics.median(times[1:]), 1), "runs": runs}


async def hold_sessions(url: str, n: int, pid: int) -> dict:
    import websockets

    before = rss_mb(pid)
    sockets, failed = [], 0

    async def one():
        nonlocal failed
        try:
            ws = await websockets.connect(url + "/api/v1/speak", open_timeout=60)
            json.loads(await asyncio.wait_for(ws.recv(), 60))
            sockets.append(ws)
        except Exception:
            failed += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    elapsed = time.perf_counter() - t0
    after = rss_mb(pid)
    # all held sessions still answer: one speaks while the others stay open
    ws0 = sockets[0]
    await ws0.send(json.dumps({"type": "speak", "text": "Still here.", "id": "x"}))
    while True:
        m = await ws0.recv()
        if not isinstance(m, bytes) and json.loads(m)["type"] in ("audio_end", "error"):
            break
    await asyncio.gather(*(ws.close() for ws in sockets))
    return {"requested": n, "held": len(sockets), "failed": failed, "connect_all_s": round(elapsed, 2),
            "server_rss_mb_before": round(before, 1), "server_rss_mb_after": round(after, 1),
            "kb_per_session": round(1024 * (after - before) / max(1, len(sockets)), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_flags(ap)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--sessions", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    args.checkpoint = checkpoint(args)
    from makima_tts.voices import VoiceLibrary
    from makima_tts.testing.server import ServerProcess

    results = {"settings": {"checkpoint": args.checkpoint, "runs": args.runs, "threads": args.threads,
                            "text": TEXT, "loadavg_before": [round(x, 2) for x in os.getloadavg()]}}
    results["engine"] = engine_alone(args.checkpoint, args.runs)
    import gc

    gc.collect()
    with tempfile.TemporaryDirectory() as voices:
        VoiceLibrary(voices).add("bench", reference_clip(3.0), 24000, name="Bench", transcript=REF_TEXT)
        with ServerProcess("--checkpoint", args.checkpoint, "--voices-dir", voices, "--default-voice", "bench",
                           "--threads", str(args.threads), "--max-queue", str(args.sessions)) as server:
            server.wait_ready(timeout=600)
            results["websocket"] = asyncio.run(ws_ttfa(server.ws_url, args.runs))
            results["http"] = http_ttfb(server.url, args.runs)
            results["sessions"] = asyncio.run(hold_sessions(server.ws_url, args.sessions, server.proc.pid))
    e = results["engine"]["ttfa_ms"]
    results["overhead_ms"] = {"websocket": round(results["websocket"]["ttfa_ms"] - e, 1),
                              "http": round(results["http"]["ttfb_ms"] - e, 1)}
    results["settings"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(f"{'path':<22}{'first audio (ms)':>18}{'overhead (ms)':>16}")
    print(f"{'engine alone':<22}{e:>18}{'-':>16}")
    print(f"{'WebSocket':<22}{results['websocket']['ttfa_ms']:>18}{results['overhead_ms']['websocket']:>16}")
    print(f"{'HTTP /v1/audio/speech':<22}{results['http']['ttfb_ms']:>18}{results['overhead_ms']['http']:>16}")
    s = results["sessions"]
    print(f"sessions held: {s['held']}/{s['requested']} ({s['kb_per_session']} KB each)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
