"""Choosing tokens: the candidates (temperature, top-k, top-p) and the draws among them, both as torch ops
(`candidates`, `draw`) and in the int8 extension's one call (`sample`, what `choose` uses where it built)."""
import math

import pytest
import torch

from makima_tts.engine import quant
from makima_tts.engine.sampling import candidates, choose, draw, sample
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


def the_extension():
    ext = quant.kernel()
    if ext is None:
        pytest.fail(f"the int8 extension does not build here: {quant.kernel_error()}")
    return ext


@pytest.mark.parametrize("how", ["extension", "torch"])
def test_draws_follow_the_candidates_probabilities(how):
    logits = torch.tensor([[2.0, 1.0, 0.0, -8.0, 0.5]])
    params = SamplingParams(top_k=3, temperature=1.0)
    g = torch.Generator().manual_seed(7)
    if how == "extension":
        the_extension()
        got = torch.stack([choose(logits, params, g) for _ in range(4000)])[:, 0]
    else:
        got = torch.stack([draw(*candidates(logits, params), [g]) for _ in range(4000)])[:, 0]
    want = torch.softmax(torch.tensor([2.0, 1.0, 0.5]), dim=0)
    for token, p in zip((0, 1, 4), want):
        assert abs(float((got == token).float().mean()) - float(p)) < 0.03
    assert set(got.tolist()) == {0, 1, 4}                   # never outside the top 3


def test_a_row_draws_the_same_alone_or_in_a_batch():
    torch.manual_seed(0)
    logits = torch.randn(5, 2048) * 3
    params = SamplingParams()
    alone = [choose(logits[i:i + 1], params, torch.Generator().manual_seed(100 + i)) for i in range(5)]
    together = sample(logits, params, [torch.Generator().manual_seed(100 + i) for i in range(5)])
    assert together.tolist() == [int(a) for a in alone]
    probs, ids = candidates(logits, params)              # the torch ops' draws: the same alone or batched too
    alone = [draw(*candidates(logits[i:i + 1], params), [torch.Generator().manual_seed(100 + i)]) for i in range(5)]
    together = draw(probs, ids, [torch.Generator().manual_seed(100 + i) for i in range(5)])
    assert together.tolist() == [int(a) for a in alone]


def test_the_extension_draws_within_top_p_by_the_kept_probabilities():
    """One call: temperature, top-k, top-p and the draw by its uniform number (u -> the first candidate,
    largest first, whose running sum of weights passes u times their total)."""
    ext = the_extension()
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log()
    top_p = SamplingParams(top_k=0, top_p=0.8, temperature=1.0)         # keeps 0.5 and 0.3 (see above)
    for u, want in ((0.0, 1), (0.62, 1), (0.63, 3), (0.999, 3)):        # 0.5 / 0.8 = 0.625
        assert ext.sample_rows(logits, 1.0, 0, 0.8, torch.tensor([u])).tolist() == [want]
    assert ext.sample_rows(logits, 1.0, 0, 0.1, torch.tensor([0.99])).tolist() == [1]   # the largest always
    assert ext.sample_rows(logits, 1.0, 0, 1.0, torch.tensor([0.99])).tolist() == [0]   # all: 0.5+0.3+0.15 < 0.99
    g = torch.Generator().manual_seed(3)
    got = torch.cat([sample(logits, top_p, [g]) for _ in range(4000)])
    assert set(got.tolist()) == {1, 3} and abs(float((got == 1).float().mean()) - 0.625) < 0.03
    many = torch.randn(3, 2048) * 4                                      # top-k of a wide row: the k largest only
    ids = ext.sample_rows(many, 0.7, 50, 1.0, torch.rand(3))
    assert all(int(i) in set(torch.topk(many[r], 50).indices.tolist()) for r, i in enumerate(ids))


def test_sampling_needs_a_positive_temperature():
    with pytest.raises(ValueError, match="temperature"):
        choose(torch.zeros(1, 4), SamplingParams(temperature=0.0))
