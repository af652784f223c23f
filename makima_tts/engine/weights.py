"""Reading safetensors checkpoints into plain dicts of tensors, with errors that name the file."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from ..errors import CheckpointError


def read_json(path: Path) -> dict:
    """A JSON config file; CheckpointError (naming the file) when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read JSON ({e})") from None


def read_safetensors(path: Path, prefix: str = "", device: str | torch.device = "cpu",
                     dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """All tensors of `path` whose name starts with `prefix` (kept in the names).

    Floating tensors are cast to `dtype` when it is given; integer tensors are left alone.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.startswith(prefix):
                    t = f.get_tensor(name)
                    if dtype is not None and t.is_floating_point():
                        t = t.to(dtype)
                    out[name] = t.to(device)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or unreadable safetensors file ({e})") from None
    return out


class Weights:
    """A read-only view of a dict of tensors under a name prefix, that fails loudly.

    `w["a.b.weight"]` raises CheckpointError naming the file when the tensor is missing;
    `w.sub("a.")` narrows the prefix.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], source: str, prefix: str = ""):
        self._tensors = tensors
        self.source = source
        self.prefix = prefix

    def sub(self, prefix: str) -> "Weights":
        return Weights(self._tensors, self.source, self.prefix + prefix)

    def __contains__(self, name: str) -> bool:
        return self.prefix + name in self._tensors

    def get(self, name: str, shape: Optional[Sequence[int]] = None) -> torch.Tensor:
        full = self.prefix + name
        t = self._tensors.get(full)
        if t is None:
            raise CheckpointError(f"{self.source}: tensor {full!r} is missing")
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{self.source}: tensor {full!r} has shape {tuple(t.shape)}, "
                                  f"expected {tuple(shape)}")
        return t

    def opt(self, name: str) -> Optional[torch.Tensor]:
        return self._tensors.get(self.prefix + name)

    __getitem__ = get


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class SafetensorsFile:
    """One safetensors file, read tensor by tensor without mapping the whole file.

    safetensors' own `safe_open` maps the whole file: every page a loader touches stays resident
    for as long as any tensor of it is alive. Here `read(name)` copies one tensor into fresh memory
    (freed with it; the page cache is not this process's memory) and `mmap(name)` maps only that
    tensor's bytes (for a large table of which only looked-up rows are read, e.g. the text embedding).
    The format is a little-endian u64 header length, a JSON header, then the raw tensor bytes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if n <= 0 or n > 100 * 2**20:
                    raise ValueError("bad header length")
                header = json.loads(f.read(n))
            self.data_start = 8 + n
            self.metadata = header.pop("__metadata__", None) or {}
            self.entries = header
            size = self.path.stat().st_size
            for name, e in header.items():
                if e["dtype"] not in _DTYPES or e["data_offsets"][1] + self.data_start > size:
                    raise ValueError(f"tensor {name} is out of bounds or of an unknown dtype")
        except FileNotFoundError:
            raise CheckpointError(f"{self.path.name}: file not found") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{self.path.name}: corrupt or unreadable safetensors file ({e})") from None

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def _where(self, name: str) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        e = self.entries.get(name)
        if e is None:
            raise CheckpointError(f"{self.path.name}: tensor {name!r} is missing")
        start, end = e["data_offsets"]
        return _DTYPES[e["dtype"]], tuple(e["shape"]), self.data_start + start, end - start

    def read(self, name: str) -> torch.Tensor:
        dtype, shape, offset, nbytes = self._where(name)
        buf = torch.empty(nbytes, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(offset)
            if f.readinto(buf.numpy()) != nbytes:
                raise CheckpointError(f"{self.path.name}: tensor {name!r} is truncated")
        return buf.view(dtype).reshape(shape)

    def mmap(self, name: str) -> torch.Tensor:
        import numpy as np

        dtype, shape, offset, nbytes = self._where(name)
        # copy-on-write mapping of just these bytes (never written: a read-only view for torch)
        arr = np.memmap(self.path, dtype=np.uint8, mode="c", offset=offset, shape=(nbytes,))
        return torch.from_numpy(arr).view(dtype).reshape(shape)
