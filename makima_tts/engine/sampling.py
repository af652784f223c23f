"""Choosing the next token from logits: penalties, suppression, temperature, top-k, top-p.

The order of operations is the one the reference applies, so greedy decoding
gives the same tokens: repetition penalty, then masks, then (only when
sampling) temperature, top-k and top-p.
"""
from __future__ import annotations

from typing import Optional

import torch

from .types import SamplingParams


def apply_repetition_penalty(logits: torch.Tensor, previous: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (b, v); previous (b, n) token ids. Seen tokens: negative logits are multiplied, positive divided."""
    if penalty == 1.0 or previous.numel() == 0:
        return logits
    seen = torch.gather(logits, 1, previous)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(1, previous, seen)


def choose(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits (b, v) -> token ids (b,). Greedy when params.do_sample is False."""
    logits = logits.float()
    if not params.do_sample:
        return logits.argmax(dim=-1)
    if params.temperature <= 0:
        raise ValueError("temperature must be > 0 when sampling")
    logits = logits / params.temperature
    if params.top_k and params.top_k > 0:
        k = min(params.top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum <= (1 - params.top_p)
        drop_sorted[..., -1:] = False
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
