"""Choosing tokens: the candidates (temperature, top-k, top-p) and the draws among them."""
import math

import pytest
import torch

from makima_tts.engine.sampling import candidates, choose, draw
from makima_tts.engine.types import SamplingParams


def test_top_k_keeps_exactly_the_k_largest_with_their_tempered_probabilities():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0, 2.5]])
    probs, ids = candidates(logits, SamplingParams(top_k=3, temperature=0.5))
    assert ids.tolist() == [[1, 5, 3]]
    want = torch.softmax(torch.tensor([3.0, 2.5, 2.0]) / 0.5, dim=0)
    assert torch.allclose(probs[0], want)


def test_top_p_keeps_the_smallest_set_that_reaches_it():
    p = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    probs, ids = candidates(p.log(), SamplingParams(top_k=0, top_p=0.8, temperature=1.0))
    kept = {int(i) for i, q in zip(ids[0], probs[0]) if q > 0}
    assert kept == {1, 3}                                    # 0.5 + 0.3 reach 0.8
    assert math.isclose(float(probs[0].sum()), 1.0, rel_tol=1e-6)
    probs, ids = candidates(p.log(), SamplingParams(top_k=0, top_p=0.1, temperature=1.0))
    assert {int(i) for i, q in zip(ids[0], probs[0]) if q > 0} == {1}     # the largest is always kept


def test_draws_follow_the_candidates_probabilities():
    logits = torch.tensor([[2.0, 1.0, 0.0, -8.0, 0.5]])
    params = SamplingParams(top_k=3, temperature=1.0)
    g = torch.Generator().manual_seed(7)
    got = torch.stack([choose(logits, params, g) for _ in range(4000)])[:, 0]
    want = torch.softmax(torch.tensor([2.0, 1.0, 0.5]), dim=0)
    for token, p in zip((0, 1, 4), want):
        assert abs(float((got == token).float().mean()) - float(p)) < 0.03
    assert set(got.tolist()) == {0, 1, 4}                   # never outside the top 3


def test_a_row_draws_the_same_alone_or_in_a_batch():
    torch.manual_seed(0)
    logits = torch.randn(5, 2048) * 3
    params = SamplingParams()
    alone = [choose(logits[i:i + 1], params, torch.Generator().manual_seed(100 + i)) for i in range(5)]
    probs, ids = candidates(logits, params)
    together = draw(probs, ids, [torch.Generator().manual_seed(100 + i) for i in range(5)])
    assert together.tolist() == [int(a) for a in alone]


def test_sampling_needs_a_positive_temperature():
    with pytest.raises(ValueError, match="temperature"):
        choose(torch.zeros(1, 4), SamplingParams(temperature=0.0))
