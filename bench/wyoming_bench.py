"""Wyoming first audio: from `synthesize` to the first `audio-chunk`, against a real
`makima-tts serve --wyoming-port` (the `wyoming` package's AsyncTcpClient on loopback), next to
the WebSocket's first binary frame on the same server for the same text.

    python bench/wyoming_bench.py [--engine piper | --checkpoint DIR | --tiny] [--runs N] [--threads N]

Also the streaming form: `synthesize-start` + one `synthesize-chunk` holding a complete sentence
(and the space after it) → first `audio-chunk`. Each figure is the median of --runs after one warm-up. Prints a table,
then one JSON object last.
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


async def _until(client, *types):
    while True:
        event = await asyncio.wait_for(client.read_event(), 120)
        if event is None:
            raise RuntimeError("the server closed the connection")
        if event.type == "error":
            raise RuntimeError(f"error from the server: {event.data}")
        if event.type in types:
            return event


async def wyoming_first_audio(port: int, runs: int, streaming: bool) -> dict:
    from wyoming.client import AsyncTcpClient
    from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop

    times = []
    for _ in range(runs + 1):
        async with AsyncTcpClient("127.0.0.1", port) as c:
            t0 = time.perf_counter()
            if streaming:
                await c.write_event(SynthesizeStart().event())
                # a sentence is taken once what follows its end arrives (here the space), or at synthesize-stop
                await c.write_event(SynthesizeChunk(text=TEXT + " ").event())
            else:
                await c.write_event(Synthesize(text=TEXT).event())
            await _until(c, "audio-chunk")
            times.append(time.perf_counter() - t0)
            if streaming:
                await c.write_event(SynthesizeStop().event())
                await _until(c, "synthesize-stopped")
            else:
                await _until(c, "audio-stop")
    return {"first_audio_ms": round(1000 * statistics.median(times[1:]), 1),
            "all_ms": [round(1000 * t, 1) for t in times[1:]]}


async def ws_first_audio(url: str, runs: int) -> dict:
    import websockets

    times = []
    async with websockets.connect(url + "/api/v1/speak", max_size=None) as ws:
        json.loads(await ws.recv())                                    # ready
        for i in range(runs + 1):
            t0 = time.perf_counter()
            await ws.send(json.dumps({"type": "speak", "text": TEXT, "id": f"r{i}"}))
            first = None
            while True:
                m = await ws.recv()
                if isinstance(m, bytes):
                    if first is None:
                        first = time.perf_counter() - t0
                    continue
                msg = json.loads(m)
                if msg["type"] == "error":
                    raise RuntimeError(msg)
                if msg["type"] == "audio_end":
                    break
            times.append(first)
    return {"first_audio_ms": round(1000 * statistics.median(times[1:]), 1),
            "all_ms": [round(1000 * t, 1) for t in times[1:]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_flags(ap)
    ap.add_argument("--engine", choices=("piper", "qwen3"), default="piper",
                    help="piper (default: the embedded engine, no checkpoint) or qwen3 (--checkpoint / --tiny)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.checkpoint or args.tiny:
        args.engine = "qwen3"

    from makima_tts.voices import VoiceLibrary
    from makima_tts.testing.server import ServerProcess, free_port

    results = {"settings": {"engine": args.engine, "runs": args.runs, "threads": args.threads, "text": TEXT,
                            "loadavg_before": [round(x, 2) for x in os.getloadavg()]}}
    port = free_port()
    with tempfile.TemporaryDirectory() as voices:
        flags = ["--voices-dir", voices, "--threads", str(args.threads), "--wyoming-port", str(port)]
        if args.engine == "qwen3":
            ckpt = checkpoint(args)
            results["settings"]["checkpoint"] = ckpt
            VoiceLibrary(voices).add("bench", reference_clip(3.0), 24000, name="Bench", transcript=REF_TEXT)
            flags += ["--checkpoint", ckpt, "--default-voice", "bench"]
        else:
            flags += ["--engine", "piper"]
        with ServerProcess(*flags) as server:
            server.wait_ready(timeout=600)
            results["websocket"] = asyncio.run(ws_first_audio(server.ws_url, args.runs))
            results["wyoming"] = asyncio.run(wyoming_first_audio(port, args.runs, streaming=False))
            results["wyoming_streaming"] = asyncio.run(wyoming_first_audio(port, args.runs, streaming=True))
    results["settings"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(f"{'path':<52}{'first audio (ms)':>18}")
    print(f"{'WebSocket speak -> first binary frame':<52}{results['websocket']['first_audio_ms']:>18}")
    print(f"{'Wyoming synthesize -> first audio-chunk':<52}{results['wyoming']['first_audio_ms']:>18}")
    print(f"{'Wyoming synthesize-start + chunk -> first audio-chunk':<52}"
          f"{results['wyoming_streaming']['first_audio_ms']:>18}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
