"""Ray Serve benchmark (issue 18): the same server as one process and as `serve --ray` with 1 and 2 engine
replicas on a local cluster.

    python -m bench.ray_serve [--checkpoint DIR | --tiny] [--replicas 1,2] [--sessions 4] [--utterances 3]
                              [--runs 20] [--only overhead|throughput]

* Per-utterance overhead of the Ray path: the single process and `--ray` with one replica run at the same
  time and are asked in turn, one utterance at a time (a short text and the throughput text), so that the
  load of a shared machine falls on both alike: first audio and the whole utterance, medians, and their
  difference.
* Throughput: for each configuration alone, --sessions WebSocket sessions at once, --utterances each:
  aggregate audio seconds per second and first-audio p50/p95.

Every server is a real `makima-tts serve` child process on loopback, driven over the WebSocket (first
audio is measured at the client: `speak` sent -> first binary frame). The CPU cores are split between the
replicas (--threads cores/replicas each; --max-streams 4 per process, 4/replicas per replica). On a
2-core machine this shows Ray's overhead, not scaling: two replicas share the two cores the single process
has. Prints a table, then one JSON object last.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if not __package__:    # run as a file (python bench/X.py): import bench.* as `python -m bench.X` does
    sys.path.insert(0, str(ROOT))

from bench.common import REF_TEXT, add_checkpoint_flags, checkpoint  # noqa: E402

TEXT = "Streaming speech sends each piece of audio as soon as it is ready."
SHORT = "Hello there."
STREAMS = 4                  # generation slots: of the single process, of all replicas together


def utterance(url: str, text: str, n: int = 1) -> list[tuple[float, float, float]]:
    """n utterances in one WebSocket session, one after another: (first audio s, total s, audio s) each."""
    from websockets.sync.client import connect

    out = []
    with connect(url + "/api/v1/speak", open_timeout=60, max_size=None) as ws:
        json.loads(ws.recv(timeout=60))
        for i in range(n):
            t0 = time.perf_counter()
            ws.send(json.dumps({"type": "speak", "text": text, "id": f"u{i}"}))
            first, audio = None, 0
            while True:
                m = ws.recv(timeout=300)
                if isinstance(m, bytes):
                    first = first if first is not None else time.perf_counter() - t0
                    audio += len(m)
                    continue
                m = json.loads(m)
                if m["type"] == "error":
                    raise RuntimeError(m)
                if m["type"] == "audio_end":
                    break
            out.append((first or float("nan"), time.perf_counter() - t0, audio / 2 / 24000))
    return out


def p95(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))]


def overhead(single, ray1, runs: int, text: str) -> dict:
    """Utterances of `text`, alternately on the single process and on --ray (1 replica): medians."""
    for srv in (single, ray1):
        utterance(srv.ws_url, text, 2)                     # warm up (voice prompt, first steps)
    a, b = [], []
    for _ in range(runs):
        a += utterance(single.ws_url, text, 1)
        b += utterance(ray1.ws_url, text, 1)
    med = lambda rs, k: 1000 * statistics.median(r[k] for r in rs)     # noqa: E731
    return {"text": text, "runs": runs, "audio_s": a[0][2],
            "single_ttfa_ms": med(a, 0), "ray_ttfa_ms": med(b, 0), "single_total_ms": med(a, 1),
            "ray_total_ms": med(b, 1), "overhead_ttfa_ms": med(b, 0) - med(a, 0),
            "overhead_total_ms": med(b, 1) - med(a, 1)}


def throughput(server, sessions: int, per_session: int) -> dict:
    utterance(server.ws_url, TEXT, 2)                        # warm up (voice prompt, first steps)
    results: list = []
    errors: list = []

    def session():
        try:
            results.extend(utterance(server.ws_url, TEXT, per_session))
        except Exception as e:  # noqa: BLE001 - reported
            errors.append(repr(e))

    threads = [threading.Thread(target=session) for _ in range(sessions)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(errors[0])
    return {"agg_audio_s_per_s": sum(r[2] for r in results) / wall, "agg_utt_per_s": len(results) / wall,
            "agg_ttfa_p50_ms": 1000 * statistics.median(r[0] for r in results),
            "agg_ttfa_p95_ms": 1000 * p95([r[0] for r in results]), "wall_s": wall, "utterances": len(results)}


class Servers:
    """Servers started together, stopped together (SIGINT: a --ray one takes its local cluster down)."""

    def __init__(self, tmp: Path):
        self.tmp, self.procs = tmp, []

    def start(self, *flags):
        from makima_tts.testing.server import ServerProcess

        s = ServerProcess(*flags, log_path=self.tmp / f"{len(self.procs)}.log", env={"OMP_NUM_THREADS": "1"})
        self.procs.append(s)
        t0 = time.perf_counter()
        s.wait_ready(timeout=600)
        s.ready_s = time.perf_counter() - t0
        return s

    def stop(self):
        for s in self.procs:
            if s.proc.poll() is None:
                s.proc.send_signal(2)
        for s in self.procs:
            try:
                s.proc.wait(90)
            except Exception:
                pass
            s.stop()
        self.procs = []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_flags(ap)
    ap.add_argument("--replicas", default="1,2", help="replica counts to run (comma-separated)")
    ap.add_argument("--sessions", type=int, default=4, help="concurrent sessions for the throughput figure")
    ap.add_argument("--utterances", type=int, default=3, help="utterances per concurrent session")
    ap.add_argument("--runs", type=int, default=20, help="short utterances on each server for the overhead figure")
    ap.add_argument("--only", choices=("overhead", "throughput"), help="run one of the two parts")
    args = ap.parse_args()
    ckpt = checkpoint(args)

    from makima_tts.testing import reference_clip
    from makima_tts.voices import VoiceLibrary

    cores = os.cpu_count() or 2
    out: dict = {"checkpoint": ckpt, "cores": cores, "text": TEXT, "sessions": args.sessions,
                 "utterances": args.utterances, "load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        voices = Path(tmp) / "voices"
        VoiceLibrary(voices).add("bench", reference_clip(3.0), 24000, name="Bench", transcript=REF_TEXT)
        common = ("--checkpoint", ckpt, "--voices-dir", str(voices), "--default-voice", "bench", "--max-queue", "64")
        single_flags = (*common, "--threads", str(cores), "--max-streams", str(STREAMS))

        def ray_flags(n):
            return (*common, "--ray", "--replicas", str(n), "--threads", str(max(1, cores // n)),
                    "--replica-cpus", str(cores / n), "--max-streams", str(max(1, STREAMS // n)))

        servers = Servers(Path(tmp))
        out["overhead"] = []
        try:                                   # the overhead: both at once, asked in turn
            if args.only != "throughput":
                single, ray1 = servers.start(*single_flags), servers.start(*ray_flags(1))
                out["ready_s"] = {"single process": single.ready_s, "ray, 1 replica": ray1.ready_s}
                for text in (SHORT, TEXT):
                    o = overhead(single, ray1, args.runs, text)
                    out["overhead"].append(o)
                    print(f"per utterance ({o['audio_s']:.2f} s of audio, median of {args.runs}, in turn): first "
                          f"audio {o['single_ttfa_ms']:.0f} ms single process, {o['ray_ttfa_ms']:.0f} ms ray "
                          f"({o['overhead_ttfa_ms']:+.0f} ms); whole utterance {o['single_total_ms']:.0f} ms, "
                          f"{o['ray_total_ms']:.0f} ms ({o['overhead_total_ms']:+.0f} ms)", flush=True)
        finally:
            servers.stop()
        rows = []
        configs = [("single process", single_flags)]
        configs += [(f"ray, {n} replica{'s' if n > 1 else ''}", ray_flags(n))
                    for n in [int(x) for x in args.replicas.split(",") if x]]
        for name, flags in configs if args.only != "overhead" else []:      # throughput: each alone
            try:
                row = {"config": name, **throughput(servers.start(*flags), args.sessions, args.utterances)}
            finally:
                servers.stop()
            rows.append(row)
            print(f"{name:16s} {args.sessions} sessions x {args.utterances}: {row['agg_audio_s_per_s']:5.2f} audio "
                  f"s/s, first audio p50 {row['agg_ttfa_p50_ms']:5.0f} ms, p95 {row['agg_ttfa_p95_ms']:5.0f} ms",
                  flush=True)
    out["rows"] = rows
    out["load_after"] = os.getloadavg()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
