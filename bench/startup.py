"""Server start-up and footprint: `makima-tts serve` from launch to ready, twice (the first start quantizes
and writes the weights cache, the second memory-maps it), and the whole server process's peak RSS after
loading and after one utterance, and the first audio of the first and the second request after the start
(streamed through /v1/audio/speech).

    python -m bench.startup [--checkpoint DIR] [--tiny] [--threads 2] [--pause S]

Each start is a fresh process with the default settings (quantize=auto, batched) and its own empty
weights cache folder for the first start. Prints a table, then one JSON object last.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

if not __package__:    # run as a file: import bench.* as `python -m bench.startup` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_checkpoint_flags, checkpoint  # noqa: E402
from makima_tts.testing import REF_TEXT, proc_status_kb, reference_clip  # noqa: E402


def one_start(ckpt: str, voices: str, cache: str, threads: int, pause: float = 0.0) -> dict:
    from makima_tts.testing.server import ServerProcess

    t0 = time.perf_counter()
    with ServerProcess("--checkpoint", ckpt, "--voices-dir", voices, "--default-voice", "bench",
                       "--threads", str(threads), env={"MAKIMA_TTS_WEIGHTS_CACHE": cache,
                                                       "OMP_NUM_THREADS": str(threads)}) as server:
        ready = server.wait_ready(timeout=900)
        ready_s = time.perf_counter() - t0
        pid = server.proc.pid
        after_load = dict(rss_mb=round(proc_status_kb("VmRSS", pid) / 1024), peak_mb=round(proc_status_kb("VmHWM", pid) / 1024))
        time.sleep(pause)                     # a first request that comes a while after the start
        first_audio_s, first_utt_s, audio_bytes = speak_once(server.url, "bench")
        after_utt = dict(rss_mb=round(proc_status_kb("VmRSS", pid) / 1024), peak_mb=round(proc_status_kb("VmHWM", pid) / 1024))
        second_audio_s, _, _ = speak_once(server.url, "bench")
    return dict(ready_s=round(ready_s, 2), engine=ready.get("engine"), after_load=after_load,
                after_utterance=after_utt, first_utterance_s=round(first_utt_s, 2), audio_bytes=audio_bytes,
                first_request_first_audio_s=round(first_audio_s, 3),
                second_request_first_audio_s=round(second_audio_s, 3))


def speak_once(url: str, voice: str) -> tuple[float, float, int]:
    """One utterance through /v1/audio/speech, streamed as raw PCM: (seconds to its first audio bytes, seconds
    to its end, bytes)."""
    import httpx

    t0 = time.perf_counter()
    first, n = None, 0
    with httpx.stream("POST", url + "/v1/audio/speech", timeout=600,
                      json={"model": "tts-1", "voice": voice, "response_format": "pcm",
                            "input": "Hello there, this is the first utterance after a start."}) as r:
        r.raise_for_status()
        for piece in r.iter_bytes():
            if piece and first is None:
                first = time.perf_counter() - t0
            n += len(piece)
    if first is None:
        raise RuntimeError("the server sent no audio")
    return first, time.perf_counter() - t0, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_flags(ap)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pause", type=float, default=0.0,
                    help="seconds between ready and the first request (default 0: at once)")
    args = ap.parse_args()
    ckpt = checkpoint(args)
    from makima_tts.voices import VoiceLibrary

    results = {"settings": {"checkpoint": ckpt, "threads": args.threads, "pause_s": args.pause,
                            "loadavg_before": [round(x, 2) for x in os.getloadavg()]}, "starts": []}
    with tempfile.TemporaryDirectory() as voices, tempfile.TemporaryDirectory() as cache:
        VoiceLibrary(voices).add("bench", reference_clip(3.0), 24000, name="Bench", transcript=REF_TEXT)
        for label in ("first (quantizes, writes the cache)", "second (cached)"):
            r = one_start(ckpt, voices, cache, args.threads, args.pause)
            r["start"] = label
            results["starts"].append(r)
    results["settings"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(f"{'start':<38}{'ready s':>9}{'RSS after load MB':>19}{'peak after utterance MB':>25}"
          f"{'first audio: 1st request':>26}{'2nd request':>13}")
    for r in results["starts"]:
        print(f"{r['start']:<38}{r['ready_s']:>9}{r['after_load']['rss_mb']:>19}{r['after_utterance']['peak_mb']:>25}"
              f"{r['first_request_first_audio_s']:>26}{r['second_request_first_audio_s']:>13}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
