"""A real server (uvicorn, real sockets, signals) around a stand-in engine, for the hardening tests.

`FakeServer(*serve_flags, frame_s=..., chunk_samples=...)` runs `python -m tests.fakeserver` in a
child process: the same `make_server` as `makima-tts serve`, with an engine that yields chunks of
`chunk_samples` samples every `frame_s` seconds: 5 chunks, or until cancelled when the text
contains "endless".
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

from makima_tts.testing.server import ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[1]


class FakeEngine:
    name = "fake"
    model_id = "fake"
    sample_rate = 24000
    supports_cloning = False

    def __init__(self, frame_s: float = 0.01, chunk_samples: int = 2400):
        self.frame_s = frame_s
        self.chunk_samples = chunk_samples

    def builtin_voices(self):
        from makima_tts.engine.types import VoiceInfo

        return [VoiceInfo("f", "F", "english")]

    def stream(self, text, voice=None, language="auto", settings=None, cancel=None):
        from makima_tts.engine.types import AudioChunk

        endless = "endless" in text
        i = 0
        while endless or i < 5:
            if cancel is not None and cancel.cancelled:
                return
            time.sleep(self.frame_s)
            yield AudioChunk(np.full(self.chunk_samples, 0.1, np.float32), 24000, i, i, 1, False)
            i += 1


class FakeServer(ServerProcess):
    def __init__(self, *args: str, frame_s: float = 0.01, chunk_samples: int = 2400,
                 log_path: Optional[Path] = None, log_level: str = "warning"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "tests.fakeserver", "--frame-s", str(frame_s), "--chunk-samples",
               str(chunk_samples), "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--log-level", log_level, *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.log_path = log_path
        self._log = open(log_path, "wb") if log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)


def main(argv=None) -> int:
    from makima_tts.cli import serve as cli_serve
    from makima_tts.server.app import create_app
    from makima_tts.server.serve import make_server

    parser = argparse.ArgumentParser()
    parser.add_argument("--frame-s", type=float, default=0.01)
    parser.add_argument("--chunk-samples", type=int, default=2400)
    sub = parser.add_subparsers()
    cli_serve.register(sub)
    args = parser.parse_args(argv)
    settings = cli_serve.settings_from_args(args)
    import logging

    logging.basicConfig(level=settings.log_level.upper())
    app = create_app(settings, engine=FakeEngine(args.frame_s, args.chunk_samples))
    server = make_server(app)
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
