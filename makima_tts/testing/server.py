"""A real `makima-tts serve` in a child process on a free loopback port, and its /metrics."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import httpx

# The source tree this package sits in (the child runs there, as it always has); None when installed.
_TREE = Path(__file__).resolve().parents[2]
SOURCE_ROOT: Optional[Path] = _TREE if (_TREE / "pyproject.toml").exists() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, *args: str, env: Optional[dict] = None, log_path: Optional[Path] = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "makima_tts", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--log-level", "warning", *args]
        full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
                    **(env or {})}
        self.log_path = log_path
        self._log = open(log_path, "wb") if log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, cwd=SOURCE_ROOT, env=full_env, stdout=self._log,
                                     stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120.0, status: int = 200) -> dict:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log()}")
            try:
                r = httpx.get(self.url + "/ready", timeout=2)
                last = r
                if r.status_code == status:
                    return r.json()
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready: {last and last.text} {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not subprocess.DEVNULL:
            self._log.close()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


_LABEL = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')


def _labels(text: str) -> dict:
    text = text.strip()
    if text.startswith("{") and text.endswith("}"):
        text = text[1:-1]
    out, pos = {}, 0
    while pos < len(text):
        m = _LABEL.match(text, pos)
        if not m:
            raise ValueError(f"bad label set {{{text}}}")
        out[m.group(1)] = m.group(2)
        pos = m.end()
    return out


def parse_metric(exposition: str, name: str, labels: str = "") -> float:
    """The value of the series `name{labels}` (labels as Prometheus writes them: '{k="v",...}', all of
    them) in a Prometheus text exposition. Raises KeyError when there is no such series: a renamed
    metric or label must fail a test, never read as 0."""
    want = _labels(labels) if labels else {}
    seen = []
    for line in exposition.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        brace = series.find("{")
        sname, slabels = (series, {}) if brace < 0 else (series[:brace], _labels(series[brace:]))
        if sname == name and slabels == want:
            return float(value)
        if sname == name:
            seen.append(series)
    raise KeyError(f"no series {name}{labels or ''} in /metrics" + (f" (there is: {', '.join(seen)})" if seen else ""))


def metric(server, name: str, labels: str = "") -> float:
    """`parse_metric` on the /metrics of `server` (a ServerProcess, or anything with a .url)."""
    return parse_metric(httpx.get(server.url + "/metrics").text, name, labels)


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Poll `predicate` until it is true (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False
