"""Soak (issue 15): one real `makima-tts serve` child under mixed, partly abusive clients for a few
minutes; afterwards its sessions, slots, file descriptors and RSS must be back at baseline, every
well-behaved client must have got all its audio, and the voices folder must be intact.

    python bench/soak.py [--minutes 3] [--checkpoint DIR]      # or: python -m bench.soak

The server speaks with the embedded Piper engine unless --checkpoint names a Qwen3-TTS folder.
Clients, all at once, each in a loop until the time is up:

- normal WebSocket speakers: queued `speak`s (random format and rate) or streamed `text` + `flush`
  + `stop`; each utterance must end with `audio_end` and its byte count must match `audio_ms`
- normal HTTP speakers (/v1/audio/speech): `pcm` (a body that ends cleanly, within 25 % of the same
  text's reference length: Piper's length varies a little) and `sse` (the deltas add up to the
  `speech.audio.done` byte count)
- cancel-and-close: `speak`, then `cancel` or `stop` and an immediate close (sometimes before any audio)
- non-readers: a long `speak` (WebSocket) or POST (HTTP) on a socket with a tiny receive buffer,
  never read, held past the send timeout, then reset
- abrupt disconnects: read a little audio, then reset the connection
- bad messages: invalid JSON, unknown types, missing fields, too-long text, deep nesting, binary,
  bad voices and formats, each answered by a recoverable `error`; then a good utterance. Bad HTTP
  requests (never a 5xx)
- voices: upload, read, rename, delete; junk uploads (a JSON error, not a 5xx)

Well-behaved clients that are refused with OVERLOADED wait `retry_after_ms` and retry (not a failure).
Baseline: taken after a warm-up (one of each kind, then the longest text on both slots at once, so
the engine's buffers have reached their peak size) and 3 s of rest. After the run: up to 60 s for the
server to settle. Tolerances: sessions, running and queued utterances exactly 0; descriptors within
+4 of baseline; RSS within +64 MB or +15 % of baseline (whichever is larger). Prints a short table,
the server's resident memory by kind of mapping before and after (glibc heaps, other anonymous
memory, files: a leak and allocator retention both show in the heaps; see memory_map()), then one
JSON object last; the exit status is 1 when a check fails.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import re
import socket
import struct
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from makima_tts.testing import REF_TEXT     # what clip_wav()'s clip is said to say
from makima_tts.testing.rawsocket import raw_socket, read_head, ws_frame

ROOT = Path(__file__).resolve().parents[1]
if not __package__:    # run as a file (python bench/X.py): import bench.* as `python -m bench.X` does
    sys.path.insert(0, str(ROOT))

TEXTS = [
    "Hello there, this is a soak test.",
    "Streaming speech sends each piece of audio as soon as it is ready.",
    "The quick brown fox jumps over the lazy dog. It does so twice.",
    "Numbers like 3.14 and words like Dr. Smith do not end a sentence.",
]
LONG = " ".join(["This long sentence keeps the engine busy for a good while, on purpose"] * 12) + "."
FD_TOL = 4
RSS_TOL_MB, RSS_TOL_FRAC = 64.0, 0.15


# --------------------------------------------------------------------------- server probes


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def metrics(url: str) -> dict:
    import httpx

    out: dict = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            pass
    return out


def server_state(url: str, pid: int) -> dict:
    m = metrics(url)
    return {"sessions": int(m.get("makima_active_sessions", -1)), "streams": int(m.get("makima_active_streams", -1)),
            "queued": int(m.get("makima_queued_requests", -1)), "fds": fds(pid), "rss_mb": round(rss_mb(pid), 1),
            "threads": len(os.listdir(f"/proc/{pid}/task"))}


def memory_map(pid: int) -> dict:
    """The server's resident memory by kind of mapping, in MB (from /proc/PID/smaps): `glibc_heap`
    (the main heap and the per-thread malloc arenas: 64 MB-aligned anonymous mappings), `anon`
    (other anonymous mappings: large mmap()ed blocks, ONNX Runtime's arena regions, Python's
    arenas), `files` (code and data of the loaded libraries and models)."""
    out = {"glibc_heap": 0.0, "anon": 0.0, "files": 0.0}
    kind = None
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        head = line.split()
        if not head:
            continue
        if "-" in head[0] and not head[0].endswith(":"):
            start = int(head[0].split("-")[0], 16)
            name = head[5] if len(head) > 5 else ""
            if name == "[heap]" or (not name and start % (64 << 20) == 0):
                kind = "glibc_heap"
            elif not name or name.startswith("["):
                kind = "anon"
            else:
                kind = "files"
        elif head[0] == "Rss:" and kind:
            out[kind] += int(head[1]) / 1024.0
    return {k: round(v, 1) for k, v in out.items()}


def check_voices_folder(root: Path) -> list[str]:
    """Problems in the voices folder: temp/trash leftovers, folders without a valid manifest or clip."""
    problems = []
    if not root.exists():
        return problems
    for p in sorted(root.iterdir()):
        n = p.name
        if n.startswith((".tmp-", ".trash-")):
            problems.append(f"leftover {n}")
            continue
        if n.startswith(".") or not p.is_dir():
            continue
        try:
            manifest = json.loads((p / "manifest.json").read_text())
        except Exception as e:
            problems.append(f"{n}: manifest unreadable ({type(e).__name__})")
            continue
        if manifest.get("voice_id") != n:
            problems.append(f"{n}: manifest names {manifest.get('voice_id')!r}")
        audio = manifest.get("audio_file")
        if not audio or not (p / audio).is_file():
            problems.append(f"{n}: clip {audio!r} missing")
        if [f for f in os.listdir(p) if ".tmp-" in f]:
            problems.append(f"{n}: temp files left")
    return problems


# --------------------------------------------------------------------------- raw sockets


def _reset(s: socket.socket) -> None:
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))   # RST, not FIN
    finally:
        s.close()


def raw_ws(port: int) -> socket.socket:
    s = raw_socket(port)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET /api/v1/speak HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = read_head(s)
    if b" 101 " not in head.split(b"\r\n")[0]:
        s.close()
        raise RuntimeError(f"handshake refused: {head[:60]!r}")
    return s


def ws_non_reader(port: int, hold_s: float) -> None:
    s = raw_ws(port)
    s.sendall(ws_frame(json.dumps({"type": "speak", "text": LONG, "id": "nr"}).encode()))
    time.sleep(hold_s)
    _reset(s)


def http_non_reader(port: int, hold_s: float) -> None:
    s = raw_socket(port)
    body = json.dumps({"input": LONG, "response_format": "pcm"}).encode()
    s.sendall((f"POST /v1/audio/speech HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
    time.sleep(hold_s)
    _reset(s)


def abrupt(port: int, ws: bool, read_bytes: int) -> None:
    if ws:
        s = raw_ws(port)
        s.sendall(ws_frame(json.dumps({"type": "speak", "text": random.choice(TEXTS + [LONG])}).encode()))
    else:
        s = raw_socket(port, 65536)
        body = json.dumps({"input": random.choice(TEXTS + [LONG]), "response_format": "pcm"}).encode()
        s.sendall((f"POST /v1/audio/speech HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                   f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body)
    got = 0
    try:
        while got < read_bytes:
            b = s.recv(4096)
            if not b:
                break
            got += len(b)
    except OSError:
        pass
    _reset(s)


# --------------------------------------------------------------------------- clients


class Tally:
    def __init__(self):
        self.c: Counter = Counter()
        self.failures: list[str] = []

    def fail(self, what: str) -> None:
        self.c["failures"] += 1
        if len(self.failures) < 30:
            self.failures.append(what[:300])


BPS = {"pcm_s16le": 2, "pcm_f32le": 4}


async def ws_speaker(url: str, t: Tally, deadline: float, rng: random.Random) -> None:
    import websockets

    while time.monotonic() < deadline:
        fmt = rng.choice(list(BPS))
        rate = rng.choice([16000, 24000, 48000])
        streamed = rng.random() < 0.3
        texts = [rng.choice(TEXTS) for _ in range(rng.randint(1, 3))]
        try:
            async with websockets.connect(url.replace("http", "ws", 1) + "/api/v1/speak", max_size=None, open_timeout=30) as ws:
                await asyncio.wait_for(ws.recv(), 30)           # ready
                await ws.send(json.dumps({"type": "start", "format": fmt, "sample_rate": rate}))
                ready = json.loads(await asyncio.wait_for(ws.recv(), 30))
                if ready.get("type") != "ready":
                    t.fail(f"ws: start answered {ready}")
                    continue
                if streamed:
                    words = " ".join(texts).split(" ")
                    for i in range(0, len(words), 3):
                        await ws.send(json.dumps({"type": "text", "text": " ".join(words[i:i + 3]) + " "}))
                    await ws.send(json.dumps({"type": "flush"}))
                    await ws.send(json.dumps({"type": "stop"}))
                    pending = None                          # until `stopped`
                else:
                    pending = set()
                    for i, text in enumerate(texts):
                        uid = f"u{i}"
                        pending.add(uid)
                        await ws.send(json.dumps({"type": "speak", "text": text, "id": uid}))
                current, nbytes = None, 0
                while True:
                    m = await asyncio.wait_for(ws.recv(), 120)
                    if isinstance(m, bytes):
                        nbytes += len(m)
                        continue
                    msg = json.loads(m)
                    kind = msg.get("type")
                    if kind == "audio_start":
                        current, nbytes = msg["id"], 0
                    elif kind == "audio_end":
                        expected = msg["audio_ms"] / 1000.0 * rate
                        samples = nbytes / BPS[fmt]
                        slack = 0.00005 * rate + 1      # audio_ms is rounded to 0.1 ms
                        if nbytes % BPS[fmt] or abs(samples - expected) > slack or nbytes == 0:
                            t.fail(f"ws {fmt}@{rate}: {nbytes} bytes for audio_ms {msg['audio_ms']}")
                        else:
                            t.c["ws_utterances_ok"] += 1
                            t.c["ws_audio_bytes"] += nbytes
                        current = None
                        if pending is not None:
                            pending.discard(msg["id"])
                            if not pending:
                                break
                    elif kind == "error" and msg.get("code") == "OVERLOADED" and pending is not None:
                        t.c["overloaded_retries"] += 1
                        await asyncio.sleep(msg.get("retry_after_ms", 1000) / 1000.0)
                        await ws.send(json.dumps({"type": "speak", "text": texts[int(msg["id"][1:])],
                                                  "id": msg["id"]}))
                    elif kind == "stopped":
                        t.c["ws_streamed_ok"] += 1
                        break
                    elif kind == "error":
                        t.fail(f"ws: error {msg}")
                        break
                if current is not None:
                    t.fail(f"ws: {current} without audio_end")
        except Exception as e:
            t.fail(f"ws speaker: {type(e).__name__}: {e}")
        await asyncio.sleep(rng.uniform(0, 0.5))


async def http_speaker(url: str, t: Tally, deadline: float, rng: random.Random, reference: dict) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        while time.monotonic() < deadline:
            text = rng.choice(TEXTS)
            sse = rng.random() < 0.5
            body = {"input": text, "response_format": "pcm", "seed": 1, **({"stream_format": "sse"} if sse else {})}
            try:
                async with client.stream("POST", "/v1/audio/speech", json=body) as r:
                    if r.status_code == 429:
                        t.c["overloaded_retries"] += 1
                        await asyncio.sleep(float(r.headers.get("retry-after", "1")))
                        continue
                    if r.status_code != 200:
                        t.fail(f"http {r.status_code}: {(await r.aread())[:200]!r}")
                        continue
                    data = b"".join([chunk async for chunk in r.aiter_bytes()])
                if sse:
                    events = [json.loads(line[6:]) for line in data.decode().split("\n") if line.startswith("data: ")]
                    audio = sum(len(base64.b64decode(e["audio"])) for e in events
                                if e["type"] == "speech.audio.delta")
                    done = [e for e in events if e["type"] == "speech.audio.done"]
                    if not done or done[0]["usage"]["output_tokens"] != audio or audio == 0:
                        t.fail(f"http sse: {audio} bytes, done {done[:1]}")
                    else:
                        t.c["http_sse_ok"] += 1
                else:
                    ref = reference.get(text)     # Piper's length varies a little from run to run (noise_w)
                    if len(data) == 0 or len(data) % 2 or (ref is not None and abs(len(data) - ref) > 0.25 * ref):
                        t.fail(f"http pcm: {len(data)} bytes, reference {ref}")
                    else:
                        t.c["http_pcm_ok"] += 1
            except Exception as e:
                t.fail(f"http speaker: {type(e).__name__}: {e}")
            await asyncio.sleep(rng.uniform(0, 0.5))


async def canceller(url: str, t: Tally, deadline: float, rng: random.Random) -> None:
    import websockets

    while time.monotonic() < deadline:
        try:
            async with websockets.connect(url.replace("http", "ws", 1) + "/api/v1/speak", max_size=None, open_timeout=30) as ws:
                await asyncio.wait_for(ws.recv(), 30)
                await ws.send(json.dumps({"type": "speak", "text": rng.choice([LONG] + TEXTS), "id": "c"}))
                if rng.random() < 0.6:                      # after some audio, or at once
                    while True:
                        m = await asyncio.wait_for(ws.recv(), 60)
                        if isinstance(m, bytes) or json.loads(m).get("type") in ("audio_end", "error"):
                            break
                await ws.send(json.dumps({"type": rng.choice(["cancel", "cancel", "stop"])}))
            t.c["cancel_and_close"] += 1                    # closed at once by leaving the block
        except Exception as e:
            t.fail(f"canceller: {type(e).__name__}: {e}")
        await asyncio.sleep(rng.uniform(0, 0.3))


async def non_reader(port: int, t: Tally, deadline: float, rng: random.Random, hold_s: float) -> None:
    while time.monotonic() < deadline:
        ws = rng.random() < 0.6
        try:
            await asyncio.to_thread(ws_non_reader if ws else http_non_reader, port, hold_s)
            t.c["non_readers_ws" if ws else "non_readers_http"] += 1
        except Exception as e:
            t.fail(f"non-reader: {type(e).__name__}: {e}")
        await asyncio.sleep(rng.uniform(0, 1))


async def disconnector(port: int, t: Tally, deadline: float, rng: random.Random) -> None:
    while time.monotonic() < deadline:
        ws = rng.random() < 0.6
        try:
            await asyncio.to_thread(abrupt, port, ws, rng.choice([0, 2000, 20000]))
            t.c["abrupt_ws" if ws else "abrupt_http"] += 1
        except Exception as e:
            t.fail(f"disconnector: {type(e).__name__}: {e}")
        await asyncio.sleep(rng.uniform(0.2, 1))


BAD_WS = [
    b"not json", b"[1, 2]", b'{"type": "nope"}', b'{"type": "speak"}', b'{"type": "speak", "text": ""}',
    b'{"type": "speak", "text": "hi", "voice": "../../etc/passwd"}', b'{"type": "start", "format": "mp3"}',
    b'{"type": "start", "sample_rate": 12345}', b'{"type": "speak", "text": "hi", "language": "klingon"}',
    b'{"type": "speak", "text": "hi", "bogus": 1}', ("[" * 20000 + "]" * 20000).encode(),
    json.dumps({"type": "speak", "text": "x" * 5001}).encode(), json.dumps({"type": "text", "text": "y" * 5001}).encode(),
]


async def bad_client(url: str, t: Tally, deadline: float, rng: random.Random) -> None:
    import httpx
    import websockets

    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        while time.monotonic() < deadline:
            try:
                async with websockets.connect(url.replace("http", "ws", 1) + "/api/v1/speak", max_size=None, open_timeout=30) as ws:
                    await asyncio.wait_for(ws.recv(), 30)
                    msgs = rng.sample(BAD_WS, 5) + [None]      # None: a binary frame
                    for raw in msgs:
                        if raw is None:
                            await ws.send(b"\x00\x01\x02")
                        else:
                            await ws.send(raw.decode())
                        reply = json.loads(await asyncio.wait_for(ws.recv(), 30))
                        if reply.get("type") == "error" and reply.get("recoverable") is True \
                                and isinstance(reply.get("code"), str) and len(reply.get("message", "")) <= 400:
                            t.c["bad_ws_answered"] += 1
                        else:
                            t.fail(f"bad ws {raw[:40] if raw else 'binary'!r}: {reply}")
                    await ws.send(json.dumps({"type": "speak", "text": "Still fine.", "id": "ok"}))
                    n = 0
                    while True:                                # the session still speaks
                        m = await asyncio.wait_for(ws.recv(), 120)
                        if isinstance(m, bytes):
                            n += len(m)
                            continue
                        msg = json.loads(m)
                        if msg.get("type") == "audio_end":
                            if n and abs(n / 2 - msg["audio_ms"] * 24) <= 2.2:
                                t.c["bad_then_good_ok"] += 1
                            else:
                                t.fail(f"bad then good: {n} bytes for {msg['audio_ms']} ms")
                            break
                        if msg.get("type") == "error":
                            if msg.get("code") == "OVERLOADED":
                                t.c["overloaded_retries"] += 1
                            else:
                                t.fail(f"bad then good: {msg}")
                            break
                for method, path, kw in [
                    ("POST", "/v1/audio/speech", {"content": b"{not json", "headers": {"content-type": "application/json"}}),
                    ("POST", "/v1/audio/speech", {"json": {"input": ""}}),
                    ("POST", "/v1/audio/speech", {"json": {"input": "hi", "voice": "no-such-voice"}}),
                    ("POST", "/v1/audio/speech", {"json": {"input": "hi", "response_format": "wma"}}),
                    ("GET", "/static/page.js%00.html", {}), ("GET", "/api/v1/voices/..%2F..%2Fetc", {}),
                    ("POST", "/api/v1/voices", {"files": {"file": ("x.wav", os.urandom(500), "audio/wav")},
                                                "data": {"voice_id": "junk"}}),
                    ("DELETE", "/api/v1/voices/no-such-voice", {}),
                ]:
                    r = await http.request(method, path, **kw)
                    if r.status_code >= 500:
                        t.fail(f"bad http {method} {path}: {r.status_code} {r.text[:200]}")
                    else:
                        t.c["bad_http_answered"] += 1
            except Exception as e:
                t.fail(f"bad client: {type(e).__name__}: {e}")
            await asyncio.sleep(rng.uniform(0, 0.5))


def clip_wav(seconds: float = 3.0) -> bytes:
    import numpy as np
    import soundfile as sf

    try:
        from makima_tts.testing import reference_clip

        pcm = reference_clip(seconds)
    except Exception:  # pragma: no cover - the tests folder is absent
        n = int(24000 * seconds)
        pcm = (0.3 * np.sin(np.arange(n) * 2 * np.pi * 180 / 24000)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, pcm, 24000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


async def voice_client(url: str, t: Tally, deadline: float, rng: random.Random, clip: bytes, worker: int) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        n = 0
        while time.monotonic() < deadline:
            vid = f"soak-{worker}-{n}"
            n += 1
            try:
                if rng.random() < 0.25:                      # junk: truncated clip or random bytes
                    junk = clip[:rng.randint(0, 600)] if rng.random() < 0.5 else os.urandom(rng.randint(1, 5000))
                    r = await http.post("/api/v1/voices", files={"file": ("j.wav", junk, "audio/wav")},
                                        data={"voice_id": vid, "transcript": REF_TEXT})
                    if r.status_code >= 500 or r.status_code == 201 or "error" not in r.json():
                        t.fail(f"junk upload: {r.status_code} {r.text[:200]}")
                    else:
                        t.c["junk_uploads_refused"] += 1
                    continue
                r = await http.post("/api/v1/voices", files={"file": ("v.wav", clip, "audio/wav")},
                                    data={"voice_id": vid, "name": f"Soak {n}", "transcript": REF_TEXT,
                                          "language": "english"})
                if r.status_code == 429:
                    t.c["overloaded_retries"] += 1
                    await asyncio.sleep(float(r.headers.get("retry-after", "1")))
                    continue
                if r.status_code != 201:
                    t.fail(f"upload {vid}: {r.status_code} {r.text[:200]}")
                    continue
                ok = (await http.get(f"/api/v1/voices/{vid}")).status_code == 200
                ok &= (await http.get(f"/api/v1/voices/{vid}/audio")).status_code == 200
                ok &= (await http.patch(f"/api/v1/voices/{vid}", json={"name": "Renamed"})).status_code == 200
                d = await http.delete(f"/api/v1/voices/{vid}")
                ok &= d.status_code in (200, 204)
                ok &= (await http.get(f"/api/v1/voices/{vid}")).status_code == 404
                if ok:
                    t.c["voice_cycles_ok"] += 1
                else:
                    t.fail(f"voice cycle {vid} failed")
            except Exception as e:
                t.fail(f"voice client: {type(e).__name__}: {e}")
            await asyncio.sleep(rng.uniform(0.2, 1.0))


# --------------------------------------------------------------------------- the run


async def reference_lengths(url: str) -> dict:
    """Each text's /v1/audio/speech pcm length (seed 1), to check later bodies were whole."""
    import httpx

    out = {}
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        for text in TEXTS:
            r = await http.post("/v1/audio/speech", json={"input": text, "response_format": "pcm", "seed": 1})
            r.raise_for_status()
            out[text] = len(r.content)
    return out


async def soak(server, args, clip: bytes, reference: dict, t: Tally) -> dict:
    rng = random.Random(args.seed)
    deadline = time.monotonic() + args.minutes * 60
    url, port, pid = server.url, server.port, server.proc.pid
    samples: list[dict] = []

    async def sampler():
        while time.monotonic() < deadline:
            await asyncio.sleep(5)
            try:
                samples.append(await asyncio.to_thread(server_state, url, pid))
            except Exception as e:
                t.fail(f"metrics during the run: {type(e).__name__}: {e}")

    def r() -> random.Random:
        return random.Random(rng.random())

    tasks = [ws_speaker(url, t, deadline, r()) for _ in range(args.speakers)]
    tasks += [http_speaker(url, t, deadline, r(), reference) for _ in range(args.http_speakers)]
    tasks += [canceller(url, t, deadline, r()), canceller(url, t, deadline, r()),
              non_reader(port, t, deadline, r(), args.send_timeout + 3),
              disconnector(port, t, deadline, r()), bad_client(url, t, deadline, r()),
              voice_client(url, t, deadline, r(), clip, 0), sampler()]
    await asyncio.gather(*tasks)
    return {"max_sessions": max((s["sessions"] for s in samples), default=0),
            "max_fds": max((s["fds"] for s in samples), default=0),
            "max_rss_mb": max((s["rss_mb"] for s in samples), default=0.0),
            "max_threads": max((s["threads"] for s in samples), default=0), "samples": len(samples),
            "rss_mb_every_5s": [s["rss_mb"] for s in samples], "fds_every_5s": [s["fds"] for s in samples]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--checkpoint", help="a Qwen3-TTS folder (default: the embedded Piper engine)")
    ap.add_argument("--speakers", type=int, default=3, help="normal WebSocket clients")
    ap.add_argument("--http-speakers", type=int, default=2, help="normal HTTP clients")
    ap.add_argument("--send-timeout", type=float, default=5.0, help="the server's --send-timeout (s)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=15)
    ap.add_argument("--log", help="keep the server's log here")
    args = ap.parse_args()

    from makima_tts.testing.server import ServerProcess

    engine = ["--checkpoint", args.checkpoint, "--engine", "qwen3"] if args.checkpoint else ["--engine", "piper"]
    t = Tally()
    results: dict = {"settings": {"minutes": args.minutes, "engine": "qwen3" if args.checkpoint else "piper",
                                  "checkpoint": args.checkpoint, "speakers": args.speakers,
                                  "http_speakers": args.http_speakers, "send_timeout_s": args.send_timeout,
                                  "seed": args.seed, "loadavg_before": [round(x, 2) for x in os.getloadavg()],
                                  "tolerance": {"fds": f"+{FD_TOL}",
                                                "rss": f"+max({RSS_TOL_MB:g} MB, {RSS_TOL_FRAC:.0%})"}}}
    clip = clip_wav()
    with tempfile.TemporaryDirectory() as tmp:
        voices = Path(tmp) / "voices"
        log_path = Path(args.log) if args.log else Path(tmp) / "server.log"
        with ServerProcess(*engine, "--voices-dir", str(voices), "--threads", str(args.threads),
                           "--send-timeout", str(args.send_timeout), "--max-queue", "16",
                           log_path=log_path) as server:
            ready = server.wait_ready(timeout=900)
            results["settings"]["served_by"] = {"engine": ready.get("engine"), "model": ready.get("model")}
            pid = server.proc.pid
            import httpx

            keeper = httpx.post(server.url + "/api/v1/voices", timeout=300,           # must survive the run
                                files={"file": ("keep.wav", clip, "audio/wav")},
                                data={"voice_id": "keeper", "transcript": REF_TEXT})
            if keeper.status_code != 201:
                t.fail(f"keeper upload: {keeper.status_code} {keeper.text[:200]}")
            keeper_manifest = (voices / "keeper" / "manifest.json").read_bytes() if keeper.status_code == 201 else b""
            # warm-up: one of each kind, so lazily made things (threads, codecs, caches) are in the baseline
            reference = asyncio.run(reference_lengths(server.url))
            warm = Tally()
            wdl = time.monotonic() + 1

            async def warm_up():
                await asyncio.wait_for(asyncio.gather(
                    ws_speaker(server.url, warm, wdl, random.Random(1)),
                    http_speaker(server.url, warm, wdl, random.Random(1), reference),
                    bad_client(server.url, warm, wdl, random.Random(1)),
                    canceller(server.url, warm, wdl, random.Random(1)),
                    non_reader(server.port, warm, wdl, random.Random(1), args.send_timeout + 3),
                    disconnector(server.port, warm, wdl, random.Random(1)),
                    voice_client(server.url, warm, wdl, random.Random(2), clip, 99)), 600)
                # the longest utterance once, read whole: the engine's buffers reach their peak size
                async with httpx.AsyncClient(base_url=server.url, timeout=600) as http:
                    for r in await asyncio.gather(*(http.post("/v1/audio/speech", json={"input": LONG, "response_format": "pcm"})
                                                    for _ in range(2))):      # as many as there are slots
                        r.raise_for_status()
            asyncio.run(warm_up())
            if warm.failures:
                t.fail(f"warm-up: {warm.failures[0]}")
            time.sleep(3)
            baseline = server_state(server.url, pid)
            results["memory_map_baseline"] = memory_map(pid)
            t0 = time.monotonic()
            results["during"] = asyncio.run(soak(server, args, clip, reference, t))
            results["wall_s"] = round(time.monotonic() - t0, 1)
            after, settle = None, time.monotonic()
            rss_limit = baseline["rss_mb"] + max(RSS_TOL_MB, RSS_TOL_FRAC * baseline["rss_mb"])
            while time.monotonic() - settle < 60:          # let the server settle
                after = server_state(server.url, pid)
                if after["sessions"] == after["streams"] == after["queued"] == 0 \
                        and after["fds"] <= baseline["fds"] + FD_TOL and after["rss_mb"] <= rss_limit:
                    break
                time.sleep(1)
            results["settle_s"] = round(time.monotonic() - settle, 1)
            results["memory_map_after"] = memory_map(pid)
            m = metrics(server.url)
            results["utterances"] = {k.split('outcome="')[1].rstrip('"}'): int(v) for k, v in m.items()
                                     if k.startswith("makima_utterances_total{")}
            results["errors"] = {re.sub(r'.*code="([^"]*)".*', r"\1", k): int(v) for k, v in m.items()
                                 if k.startswith("makima_errors_total{")}
            health = httpx.get(server.url + "/health", timeout=10).status_code
            listed = {v["voice_id"] for v in httpx.get(server.url + "/api/v1/voices?limit=1000").json()["voices"]}
            keeper_ok = keeper_manifest != b"" and (voices / "keeper" / "manifest.json").read_bytes() == keeper_manifest \
                and "keeper" in listed
            folder_problems = check_voices_folder(voices)
            on_disk = {p.name for p in voices.iterdir() if p.is_dir() and not p.name.startswith(".")}
            t_stop = time.monotonic()
            server.proc.send_signal(15)
            try:
                server.proc.wait(30)
            except Exception:
                pass
            results["sigterm_exit_s"] = round(time.monotonic() - t_stop, 2)
            results["exit_code"] = server.proc.returncode
    results["baseline"], results["after"] = baseline, after
    results["clients"] = dict(t.c)
    results["failures"] = t.failures
    checks = {
        "sessions, running and queued back to 0": after["sessions"] == after["streams"] == after["queued"] == 0,
        f"fds within +{FD_TOL}": after["fds"] <= baseline["fds"] + FD_TOL,
        f"RSS within +{max(RSS_TOL_MB, RSS_TOL_FRAC * baseline['rss_mb']):.0f} MB": after["rss_mb"] <= rss_limit,
        "every well-behaved client got all its audio": t.c["failures"] == 0,
        "voices folder intact": not folder_problems and keeper_ok and on_disk <= listed,
        "server healthy, then exits on SIGTERM": health == 200 and results["exit_code"] is not None,
    }
    results["folder_problems"] = folder_problems
    results["checks"] = checks
    results["ok"] = all(checks.values())
    results["settings"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]

    c = t.c
    print(f"soak: {args.minutes:g} min, engine {results['settings']['served_by']['engine']}, wall {results['wall_s']} s")
    print(f"{'':<14}{'sessions':>9}{'slots':>7}{'queued':>7}{'fds':>6}{'RSS MB':>9}{'threads':>8}")
    for name, s in (("baseline", baseline), ("after", after)):
        print(f"{name:<14}{s['sessions']:>9}{s['streams']:>7}{s['queued']:>7}{s['fds']:>6}{s['rss_mb']:>9}{s['threads']:>8}")
    d = results["during"]
    print(f"{'peak (5 s)':<14}{d['max_sessions']:>9}{'':>7}{'':>7}{d['max_fds']:>6}{d['max_rss_mb']:>9}{d['max_threads']:>8}")
    print(f"well-behaved: ws utterances {c['ws_utterances_ok']}, ws streamed sessions {c['ws_streamed_ok']}, "
          f"http pcm {c['http_pcm_ok']}, http sse {c['http_sse_ok']}, bad-then-good {c['bad_then_good_ok']}, "
          f"voice cycles {c['voice_cycles_ok']}; OVERLOADED retries {c['overloaded_retries']}")
    print(f"abuse: cancel+close {c['cancel_and_close']}, non-readers ws/http {c['non_readers_ws']}/"
          f"{c['non_readers_http']}, abrupt ws/http {c['abrupt_ws']}/{c['abrupt_http']}, bad ws/http "
          f"{c['bad_ws_answered']}/{c['bad_http_answered']}, junk uploads {c['junk_uploads_refused']}")
    print("resident MB by mapping, baseline -> after: " + ", ".join(
        f"{k} {results['memory_map_baseline'][k]} -> {results['memory_map_after'][k]}" for k in results["memory_map_after"]))
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")
    for f in t.failures[:10]:
        print("  failure:", f)
    print(json.dumps(results))
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
