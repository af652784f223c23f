"""The codec decoder's causal convolutions, as computed (channels last: oneDNN's convolution over a
channels-last view, matrix products over input windows, the transposed ones in polyphase form), against
torch's own conv1d / conv_transpose1d over channels-first inputs, fed in pieces as a stream is."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from makima_tts.engine import codec
from makima_tts.engine.codec import DecoderState, _CausalConv, _CausalTransposedConv, _Slots
from makima_tts.engine.weights import Weights


def streamed(layer, slots, x, pieces):
    """The layer's output over x (B, C, L) fed channels last in pieces, from a zero state (what a fresh
    stream has), back in channels-first order (B, C_out, L_out)."""
    state = DecoderState([torch.zeros(x.shape[0], n, c, dtype=x.dtype) for c, n in slots.shapes], [], [], [0])
    xl = x.transpose(1, 2).contiguous()
    out, start = [], 0
    for n in pieces:
        out.append(layer(xl[:, start:start + n], state))
        start += n
    return torch.cat(out, dim=1).transpose(1, 2)


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
    codec._cast(layer, torch.float32)           # cast again (bench.codec copies a decoder to bfloat16): still right
    assert torch.allclose(streamed(layer, slots, x.float(), [9]), full.float(), atol=1e-4)


@pytest.mark.parametrize("c_in,k,dilation", [(codec.MATMUL_MIN_CHANNELS, 7, 1), (codec.MATMUL_MIN_CHANNELS, 7, 3),
                                             (codec.MATMUL_MIN_CHANNELS, 1, 1), (8, 7, 9), (8, 1, 1)])
def test_causal_conv_equals_torchs(c_in, k, dilation):
    torch.manual_seed(0)
    w, b = torch.randn(5, c_in, k, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    slots = _Slots()
    layer = _CausalConv(Weights({"conv.weight": w, "conv.bias": b}, "test"), slots, dilation=dilation)
    codec._cast(layer, torch.float64)           # what Codec.load does to its decoder: the weights rearranged
    assert layer.pointwise == (k == 1) and layer.as_matmul == (c_in >= codec.MATMUL_MIN_CHANNELS and k > 1)
    x = torch.randn(2, c_in, 11, dtype=torch.float64)
    full = F.conv1d(F.pad(x, ((k - 1) * dilation, 0)), w, b, dilation=dilation)
    assert torch.allclose(streamed(layer, slots, x, [3, 1, 7]), full, atol=1e-10)
    codec._cast(layer, torch.bfloat16)          # cast again (bench.codec copies a decoder to bfloat16): still right
    got = streamed(layer, slots, x.bfloat16(), [11]).double()
    assert float((got - full).abs().max()) < 0.05 * float(full.abs().max())


def test_depthwise_conv_equals_torchs():
    """The ConvNeXt's depthwise causal conv (groups = channels), on the channels-last convolution."""
    torch.manual_seed(0)
    w, b = torch.randn(6, 1, 7, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    slots = _Slots()
    layer = _CausalConv(Weights({"conv.weight": w, "conv.bias": b}, "test"), slots, groups=6)
    codec._cast(layer, torch.float64)
    x = torch.randn(2, 6, 10, dtype=torch.float64)
    full = F.conv1d(F.pad(x, (6, 0)), w, b, groups=6)
    assert torch.allclose(streamed(layer, slots, x, [4, 6]), full, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_snake_is_the_formula_rounded_once(dtype):
    """The extension's SnakeBeta: x + inv_beta * sin(x * alpha)^2 computed in float32 and rounded once, over
    arguments up to |x * alpha| ~ 100 (the reduction to [-pi/2, pi/2]); channels last, a channel's alpha per column."""
    from makima_tts.engine import quant

    ext = quant.kernel()
    if ext is None:
        pytest.fail(f"the int8 extension does not build here: {quant.kernel_error()}")
    torch.manual_seed(0)
    for channels in (24, 96):               # channels last: 24 ends with a partial vector
        x = (torch.randn(3, 37, channels) * 8).to(dtype)
        alpha = (torch.rand(channels) * 4 + 0.1).to(dtype)
        inv_beta = (torch.rand(channels) * 2 + 0.1).to(dtype)
        exact = x.double() + inv_beta.double() * torch.sin(x.double() * alpha.double()) ** 2
        got = ext.snake(x, alpha, inv_beta)
        assert got.dtype == dtype and got.shape == x.shape
        # one rounding of the result, plus float32's rounding of the argument x * alpha (through sin^2)
        bound = (exact.abs() * (2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -23)
                 + 4 * inv_beta.double() * (x.double() * alpha.double()).abs() * 2.0 ** -24 + 1e-6)
        assert bool(((got.double() - exact).abs() <= bound).all())
        torch_ops = x + inv_beta * torch.sin(x * alpha).pow(2)
        if dtype == torch.bfloat16:        # torch's five bfloat16 ops round after each: the fused op is closer
            assert (got.double() - exact).abs().mean() < (torch_ops.double() - exact).abs().mean()


def test_an_int8_engine_decodes_with_the_fused_snake(tiny_checkpoint):
    """The int8 engine gives its codec the fused activation; the audio is the torch path's within rounding
    (a float32 codec: the random tiny decoder amplifies bfloat16's roundings, which differ between the two)."""
    import numpy as np

    from makima_tts.engine.qwen3 import Qwen3Engine

    eng = Qwen3Engine.load(tiny_checkpoint, quantize="int8", weights_cache=None, codec_dtype="float32")
    acts = eng.codec.decoder.activations()
    assert len(acts) > 1 and all(a.op is not None for a in acts)
    codes = torch.randint(0, 2048, (6, 16))
    fused = eng.codec.decode(codes)
    for a in acts:
        a.op = None
    plain = eng.codec.decode(codes)
    assert fused.shape == plain.shape and np.isfinite(fused).all()
    assert float(np.abs(fused - plain).max()) < 1e-3 * max(float(np.abs(plain).max()), 1e-3)
