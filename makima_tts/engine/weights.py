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
