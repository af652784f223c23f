"""makima_tts.fileio: the one atomic writer (voice manifests and clips, voice prompts, the int8
weights cache)."""
from __future__ import annotations

import pytest

from makima_tts.fileio import TMP_MARK, atomic_path, atomic_write


def test_atomic_write_replaces_the_whole_file(tmp_path):
    path = tmp_path / "manifest.json"
    atomic_write(path, b"old")
    atomic_write(path, b"new content")
    assert path.read_bytes() == b"new content"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "talker.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith("talker.safetensors" + TMP_MARK)
            tmp.write_bytes(b"half of the ne")
            raise RuntimeError("killed mid-write")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["talker.safetensors"]


def test_a_writer_that_names_its_own_file(tmp_path):
    """safetensors' save_file and soundfile take a path: they write the temporary one."""
    path = tmp_path / "out.bin"
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"x" * 1000)
        assert not path.exists()                 # nothing under the real name until the block ends
    assert path.read_bytes() == b"x" * 1000 and len(list(tmp_path.iterdir())) == 1
