"""Load benchmark: N concurrent WebSocket sessions against a server.

    python bench/load.py --url http://127.0.0.1:8000 --streams 1,2,4,8 [--utterances 2] [--voice ID]
    python bench/load.py --tiny --streams 1,2,4,8          # starts its own server on the tiny checkpoint
    python bench/load.py --checkpoint DIR --streams 1,2,4 --max-streams 8

Each session speaks `--utterances` utterances of the same text one after another. Per level it
prints first-audio p50/p95 (from `speak` to the first binary frame, as the client sees it), the
real-time factor of each utterance (wall time / audio time), the aggregate audio seconds per wall
second, and the errors by code. A short table, then one JSON object last.

Continuity, as a listener hears it: each utterance is played in real time on the client side from
its first audio; a chunk that arrives after the audio before it has finished playing is a gap
(the buffer ran dry). Per level: the longest gap and how many streams had a gap over 100 ms. The
server's real-time capacity is the largest level with no gap over 100 ms (`capacity_streams`).
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
from collections import Counter
from pathlib import Path

from makima_tts.testing import REF_TEXT, reference_clip

ROOT = Path(__file__).resolve().parents[1]
if not __package__:    # run as a file (python bench/X.py): import bench.* as `python -m bench.X` does
    sys.path.insert(0, str(ROOT))

from bench.common import add_checkpoint_flags, checkpoint  # noqa: E402
TEXT = "Streaming speech sends each piece of audio as soon as it is ready, so the listener hears it at once."


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


async def session(url: str, n: int, voice: str | None, rate: int, out: dict, text: str) -> None:
    import websockets

    try:
        async with websockets.connect(url + "/api/v1/speak", max_size=None, open_timeout=120) as ws:
            json.loads(await ws.recv())
            for i in range(n):
                t0 = time.perf_counter()
                msg = {"type": "speak", "text": text, "id": f"u{i}"}
                if voice:
                    msg["voice"] = voice
                await ws.send(json.dumps(msg))
                first, nbytes = None, 0
                play_end = 0.0                   # when what arrived so far has finished playing
                while True:
                    m = await ws.recv()
                    if isinstance(m, bytes):
                        now = time.perf_counter()
                        first = first if first is not None else now - t0
                        if play_end and now > play_end:
                            out["gap_s"] = max(out["gap_s"], now - play_end)
                            gaps = out.setdefault("stream_gaps", {})
                            gaps[id(ws)] = max(gaps.get(id(ws), 0.0), now - play_end)
                        play_end = max(play_end, now) + len(m) / 2 / rate
                        nbytes += len(m)
                        continue
                    m = json.loads(m)
                    if m["type"] == "audio_end":
                        wall = time.perf_counter() - t0
                        audio_s = nbytes / 2 / rate
                        out["ttfa"].append(first)
                        out["rtf"].append(wall / audio_s if audio_s else float("nan"))
                        out["audio_s"] += audio_s
                        break
                    if m["type"] == "error":
                        out["errors"][m["code"]] += 1
                        break
    except Exception as e:          # a dropped connection counts as an error
        out["errors"][type(e).__name__] += 1


async def level(url: str, streams: int, utterances: int, voice: str | None, text: str) -> dict:
    out = {"ttfa": [], "rtf": [], "audio_s": 0.0, "errors": Counter(), "gap_s": 0.0}
    t0 = time.perf_counter()
    await asyncio.gather(*(session(url, utterances, voice, 24000, out, text) for _ in range(streams)))
    wall = time.perf_counter() - t0
    return {"streams": streams, "utterances": len(out["rtf"]),
            "ttfa_p50_ms": round(1000 * pct(out["ttfa"], 0.5), 1), "ttfa_p95_ms": round(1000 * pct(out["ttfa"], 0.95), 1),
            "rtf_p50": round(statistics.median(out["rtf"]), 3) if out["rtf"] else None,
            "rtf_max": round(max(out["rtf"]), 3) if out["rtf"] else None,
            "aggregate_audio_s_per_s": round(out["audio_s"] / wall, 3), "wall_s": round(wall, 2),
            "longest_gap_ms": round(1000 * out["gap_s"], 1),
            "streams_gap_over_100ms": sum(g > 0.1 for g in out.get("stream_gaps", {}).values()),
            "errors": dict(out["errors"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server (default: start one)")
    add_checkpoint_flags(ap)
    ap.add_argument("--streams", default="1,2,4,8", help="comma list of concurrent session counts")
    ap.add_argument("--utterances", type=int, default=2, help="utterances per session")
    ap.add_argument("--voice", default=None)
    ap.add_argument("--max-streams", type=int, default=None, help="server's max_streams (default: the largest level)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--text", default=TEXT, help="what each utterance says")
    ap.add_argument("--quantize", default="auto", help="server's --quantize (auto, none, int8, int8-dynamic)")
    ap.add_argument("--no-batch", dest="batch", action="store_false", help="server's --no-batch (default: batched)")
    args = ap.parse_args()
    levels = [int(x) for x in args.streams.split(",") if x.strip()]
    results = {"settings": {"streams": levels, "utterances": args.utterances, "text": args.text,
                            "quantize": args.quantize, "batch": args.batch,
                            "loadavg_before": [round(x, 2) for x in os.getloadavg()]}, "levels": []}

    def run(url: str) -> None:
        for n in levels:
            results["levels"].append(asyncio.run(level(url, n, args.utterances, args.voice, args.text)))

    if args.url:
        results["settings"]["url"] = args.url
        run(args.url.rstrip("/").replace("http://", "ws://").replace("https://", "wss://"))
    else:
        from makima_tts.voices import VoiceLibrary
        from makima_tts.testing.server import ServerProcess

        ckpt = checkpoint(args)
        results["settings"]["checkpoint"] = ckpt
        with tempfile.TemporaryDirectory() as voices:
            VoiceLibrary(voices).add("bench", reference_clip(3.0), 24000, name="Bench", transcript=REF_TEXT)
            max_streams = args.max_streams or max(levels)
            results["settings"]["max_streams"] = max_streams
            with ServerProcess("--checkpoint", ckpt, "--voices-dir", voices, "--default-voice", "bench",
                               "--threads", str(args.threads), "--max-streams", str(max_streams),
                               "--max-queue", str(4 * max(levels)), "--quantize", args.quantize,
                               "--batch" if args.batch else "--no-batch") as server:
                server.wait_ready(timeout=600)
                run(server.ws_url)
    results["settings"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    fine = [r["streams"] for r in results["levels"] if r["streams_gap_over_100ms"] == 0 and not r["errors"]]
    results["capacity_streams"] = max(fine) if fine else 0
    cols = ["streams", "utterances", "ttfa_p50_ms", "ttfa_p95_ms", "rtf_p50", "rtf_max", "aggregate_audio_s_per_s",
            "longest_gap_ms", "streams_gap_over_100ms", "errors"]
    widths = [max(len(c), 8) + 2 for c in cols]
    print("".join(f"{c:>{w}}" for c, w in zip(cols, widths)))
    for row in results["levels"]:
        print("".join(f"{str(row[c]):>{w}}" for c, w in zip(cols, widths)))
    print(f"real-time capacity (no gap over 100 ms): {results['capacity_streams']} streams")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
