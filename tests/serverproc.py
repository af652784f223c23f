"""Moved to makima_tts.testing.server; kept for older imports."""
from pathlib import Path

from makima_tts.testing.server import ServerProcess, free_port  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
