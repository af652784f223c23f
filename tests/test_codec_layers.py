"""The codec decoder's causal convolutions, as computed (matrix products over input windows, the transposed
ones in polyphase form), against torch's own conv1d / conv_transpose1d, fed in pieces as a stream is."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from makima_tts.engine import codec
from makima_tts.engine.codec import DecoderState, _CausalConv, _CausalTransposedConv, _Slots
from makima_tts.engine.weights import Weights


def streamed(layer, slots, x, pieces):
    """The layer's output over x fed in pieces, from a zero state (what a fresh stream has)."""
    state = DecoderState([torch.zeros(x.shape[0], c, n, dtype=x.dtype) for c, n in slots.shapes], [], [], [0])
    out, start = [], 0
    for n in pieces:
        out.append(layer(x[..., start:start + n], state))
        start += n
    return torch.cat(out, dim=-1)


@pytest.mark.parametrize("c_in,c_out,k,stride", [(16, 8, 16, 8), (12, 6, 10, 5), (8, 8, 2, 2), (6, 4, 7, 3)])
def test_transposed_conv_equals_torchs(c_in, c_out, k, stride):
    torch.manual_seed(0)
    w, b = torch.randn(c_in, c_out, k, dtype=torch.float64), torch.randn(c_out, dtype=torch.float64)
    slots = _Slots()
    layer = _CausalTransposedConv(Weights({"conv.weight": w, "conv.bias": b}, "test"), slots, stride)
    codec._cast(layer, torch.float64)           # what Codec.load does to its decoder: the polyphase weights
    x = torch.randn(2, c_in, 9, dtype=torch.float64)
    ctx = (k - 1) // stride                     # the causal decoder: zero context, the right tail trimmed
    full = F.conv_transpose1d(F.pad(x, (ctx, 0)), w, b, stride=stride)[..., ctx * stride:(ctx + 9) * stride]
    assert torch.allclose(streamed(layer, slots, x, [4, 1, 4]), full, atol=1e-12)


@pytest.mark.parametrize("c_in,k,dilation", [(codec.MATMUL_MIN_CHANNELS, 7, 1), (codec.MATMUL_MIN_CHANNELS, 7, 3),
                                             (codec.MATMUL_MIN_CHANNELS, 1, 1), (8, 7, 9)])
def test_causal_conv_equals_torchs(c_in, k, dilation):
    torch.manual_seed(0)
    w, b = torch.randn(5, c_in, k, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    slots = _Slots()
    layer = _CausalConv(Weights({"conv.weight": w, "conv.bias": b}, "test"), slots, dilation=dilation)
    assert layer.as_matmul == (c_in >= codec.MATMUL_MIN_CHANNELS)
    x = torch.randn(2, c_in, 11, dtype=torch.float64)
    full = F.conv1d(F.pad(x, ((k - 1) * dilation, 0)), w, b, dilation=dilation)
    assert torch.allclose(streamed(layer, slots, x, [3, 1, 7]), full, atol=1e-10)
