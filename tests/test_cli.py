"""The `makima-tts` command: its four subcommands, and `bench` on the tiny checkpoint."""
from __future__ import annotations

import json
import subprocess
import sys


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "makima_tts", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_every_subcommand():
    out = cli("--help")
    assert out.returncode == 0
    for name in ("serve", "say", "voices", "bench"):
        assert name in out.stdout


def test_bench_times_the_engine(tiny_checkpoint):
    out = cli("bench", "--checkpoint", str(tiny_checkpoint), "--frames", "6", "--threads", "1")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    run = result["runs"][0]
    assert run["frames"] == 6 and run["audio_s"] == 0.48 and run["rtf"] > 0 and run["ttfa_s"] > 0


def test_bench_reports_a_bad_checkpoint(tmp_path):
    out = cli("bench", "--checkpoint", str(tmp_path))
    assert out.returncode == 2 and "error [CHECKPOINT_ERROR]" in out.stderr


def test_serve_rejects_a_bad_setting():
    out = cli("serve", "--engine", "nonsense")
    assert out.returncode == 2 and "INVALID_SETTING" in out.stderr and "engine" in out.stderr


def test_serve_reads_makima_tts_environment_variables():
    import os

    env = {**os.environ, "MAKIMA_TTS_MAX_STREAMS": "not-a-number"}
    out = subprocess.run([sys.executable, "-m", "makima_tts", "serve"], capture_output=True, text=True, timeout=120,
                         env=env)
    assert out.returncode == 2 and "INVALID_SETTING" in out.stderr and "max_streams" in out.stderr
