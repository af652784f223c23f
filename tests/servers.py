"""Helpers for the tests that start `makima-tts serve` (test_server, test_chatterbox_server, test_ray, ...):
a voices folder holding the `tester` voice, and a ServerProcess started and ready. Plain functions, not
fixtures: each module's thin fixtures call them (a fixture imported from another test module trips F811)."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from makima_tts.testing import REF_TEXT
from makima_tts.testing.server import ServerProcess


def add_voice(voices_dir, ref_clip, voice_id="tester"):
    from makima_tts.voices import VoiceLibrary

    VoiceLibrary(voices_dir).add(voice_id, ref_clip, 24000, name="Tester", transcript=REF_TEXT)


def voices_folder(tmp_path_factory, ref_clip, name: str = "voices") -> Path:
    """A new voices folder with the `tester` voice (the reference clip and its transcript)."""
    d = tmp_path_factory.mktemp(name)
    add_voice(d, ref_clip)
    return d


@contextmanager
def serving(tmp_path_factory, *args: str, log: str = "server.log") -> Iterator[ServerProcess]:
    """`makima-tts serve ARGS`, logging to a new folder, once it is ready; stopped on leaving."""
    with ServerProcess(*args, log_path=tmp_path_factory.mktemp("log") / log) as s:
        s.wait_ready()
        yield s
