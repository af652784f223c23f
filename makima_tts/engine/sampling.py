"""Choosing the next token from logits: penalties, suppression, temperature, top-k, top-p.

The order of operations is the one the reference applies, so greedy decoding
gives the same tokens: repetition penalty, then masks, then (only when
sampling) temperature, top-k and top-p.
"""
from __future__ import annotations

from typing import Optional

import torch

from .quant import kernel
from .types import SamplingParams


def apply_repetition_penalty(logits: torch.Tensor, previous: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (b, v); previous (b, n) token ids. Seen tokens: negative logits are multiplied, positive divided."""
    if penalty == 1.0 or previous.numel() == 0:
        return logits
    seen = torch.gather(logits, 1, previous)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(1, previous, seen)


def candidates(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Sampling rows' logits (b, v) -> (probabilities (b, c), their token ids (b, c), or None when the
    candidates are the whole vocabulary): temperature, then top-k (exactly k, largest first), then
    top-p (the smallest set of the largest whose probability reaches top_p; the largest is always kept).

    Only the candidates are drawn from: the code predictor draws 15 times a frame per stream over
    2048 ids, and a draw over all of them (mostly -inf) cost ~5x one over the top 50."""
    if params.temperature <= 0:
        raise ValueError("temperature must be > 0 when sampling")
    logits = logits.float() / params.temperature
    ids = None
    if params.top_k and params.top_k > 0 and params.top_k < logits.shape[-1]:
        logits, ids = torch.topk(logits, params.top_k, dim=-1)
    if params.top_p < 1.0:
        if ids is None:
            logits, ids = torch.sort(logits, descending=True, dim=-1)
        rising = logits.flip(-1)                                    # smallest first
        drop = rising.softmax(dim=-1).cumsum(dim=-1) <= (1 - params.top_p)
        drop[..., -1:] = False
        logits = rising.masked_fill(drop, float("-inf")).flip(-1)
    return logits.softmax(dim=-1), ids


def draw(probs: torch.Tensor, ids: Optional[torch.Tensor], generators: list[Optional[torch.Generator]]) -> torch.Tensor:
    """One token per row from `candidates`' output, row i with its own generator: a row draws the same
    numbers whether it is sampled alone or in a batch."""
    picks = torch.cat([torch.multinomial(probs[i:i + 1], 1, generator=g) for i, g in enumerate(generators)])
    return picks[:, 0] if ids is None else ids.gather(1, picks)[:, 0]


def sample(logits: torch.Tensor, params: SamplingParams, generators: list[Optional[torch.Generator]]) -> torch.Tensor:
    """Sampling rows' logits (b, v), all with `params`, row i with its own generator -> token ids (b,).

    Where the int8 extension built, one C++ call does what `candidates` and `draw` do (the same
    temperature, top-k and top-p) and draws by the inverse of the candidates' cumulative weights with
    one uniform number per row from its generator: a row draws the same alone or in a batch. Otherwise
    (or for logits off the CPU: the extension is CPU code, and the rows' generators are on the logits'
    device) `candidates`, then `draw`."""
    if params.temperature <= 0:
        raise ValueError("temperature must be > 0 when sampling")
    ext = kernel() if logits.device.type == "cpu" else None
    if ext is None:
        probs, ids = candidates(logits, params)
        return draw(probs, ids, generators)
    u = torch.cat([torch.rand(1, generator=g) for g in generators])
    return ext.sample_rows(logits, params.temperature, params.top_k or 0, params.top_p, u).to(logits.device)


def choose(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits (b, v) -> token ids (b,). Greedy when params.do_sample is False."""
    if not params.do_sample:
        return logits.float().argmax(dim=-1)
    return sample(logits, params, [generator] * logits.shape[0])
