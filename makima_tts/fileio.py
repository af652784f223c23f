"""Crash-safe file writes: the one atomic writer of the code base.

`atomic_write(path, data)` and `atomic_path(path)` (for writers that want a path, such as
safetensors' `save_file` or soundfile) write to a temporary name beside the target,
`<name>.tmp-<pid>-<random>`, fsync it, rename it over the target in one step (`os.replace`) and
fsync the folder. A crash at any moment leaves the old file or the new one under the real name,
never half of one; what it can leave is a `<name>.tmp-*` file, which the owners of the folders
clean up (the voice library does when it opens). A write that fails removes its temporary file.

`write_synced` writes and fsyncs without a rename, for files inside a folder that is itself
renamed into place afterwards (a new voice); `fsync_dir` makes a rename in a folder durable.

`hash_samples` feeds a hash a large file's size and samples of its bytes (the checkpoints' fingerprints).
"""
from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

__all__ = ["atomic_write", "atomic_path", "write_synced", "fsync_dir", "hash_samples", "TMP_MARK"]

PathLike = Union[str, "os.PathLike[str]"]
TMP_MARK = ".tmp-"          # in the name of every temporary file made here: `<name>.tmp-...`


def fsync_dir(path: PathLike) -> None:
    """Make the entries of a folder (a rename, a new file) durable; a no-op where folders cannot
    be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_synced(path: PathLike, data: bytes) -> None:
    """Write `data` to `path` and fsync it (no rename: not atomic by itself)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """A temporary path beside `path` to write the new content to; when the block ends without an
    error it is fsynced and renamed over `path` (then the folder fsynced); on an error it is removed
    and `path` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            try:
                os.unlink(tmp)
            except OSError:
                pass
    fsync_dir(path.parent)


def atomic_write(path: PathLike, data: bytes) -> None:
    """Replace `path` with `data` atomically (see the module's docstring)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def hash_samples(h, path: PathLike, samples: int, piece: int = 65536) -> None:
    """Update the hash `h` with the file's size and `piece` bytes at `samples` evenly spaced offsets
    (from 0) and at its end: cheap on multi-GB weights, and files of one size but other bytes differ."""
    size = os.stat(path).st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        for offset in [0] + [size * i // samples for i in range(1, samples)] + [max(0, size - piece)]:
            f.seek(offset)
            h.update(f.read(piece))
