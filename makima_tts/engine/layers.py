"""Building blocks shared by the talker (model.py) and the codec's decoder transformer (codec.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def rope_tables(head_dim: int, theta: float, start: int, length: int, device: torch.device | str | None = None,
                dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (length, head_dim) for positions start .. start + length - 1 (rotate-half
    layout). Angles are computed in float32 as inv_freq * position, as the reference does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    pos = torch.arange(start, start + length, device=device, dtype=torch.float32)
    angles = pos[:, None] * inv_freq[None, :]                      # (L, Dh/2)
    angles = torch.cat([angles, angles], dim=-1)                   # (L, Dh)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE. x: (b, heads, t, d); cos/sin broadcast to it ((t, d) or (b, 1, t, d))."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMS norm computed in float32 whatever x's dtype (one fused op when x is float32)."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)
