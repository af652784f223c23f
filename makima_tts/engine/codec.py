"""The 12 Hz speech tokenizer of Qwen3-TTS (Qwen3-TTS-Tokenizer-12Hz): audio <-> 16 codebooks per frame.

One frame is 80 ms: 1920 samples at 24 kHz.

Encoder (used once per reference clip), Mimi-style:
    wav (B, 1, S) -> SEANet conv encoder (strides 4, 5, 6, 8: 25 Hz) -> causal transformer
    -> downsampling conv (stride 2: 12.5 Hz) -> split RVQ (1 semantic + acoustic quantizers; the
    first 16 codebooks are kept) -> codes (B, T, 16)

Decoder (the hot path), strictly causal:
    codes (B, T, 16) -> RVQ lookup -> causal conv k=3 -> transformer (sliding window 72)
    -> 2 x [transposed conv x2, ConvNeXt] (50 Hz) -> causal conv -> 4 x [SnakeBeta, transposed
    conv (x8, x5, x4, x3), 3 residual units (SnakeBeta, dilated causal conv, SnakeBeta, 1x1 conv)]
    -> SnakeBeta -> causal conv -> clamp to [-1, 1] -> wav (B, T * 1920)

Because every stage is causal, the samples of frame t depend only on frames <= t. Streaming keeps,
for each causal conv, its last (kernel - 1) * dilation input samples; for each transposed conv its
last input sample; for each transformer layer the keys/values of the last 71 frames. `decode` runs
the very same code over a fresh state, so streaming and one-shot decoding agree to float rounding
and streaming needs no lookahead.

Everything here reads `speech_tokenizer/config.json` and `speech_tokenizer/model.safetensors` with
the tensor names as stored in the official checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass, is_dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CheckpointError
from .layers import apply_rope, rms_norm, rope_tables
from .weights import Weights, read_json, read_safetensors

Tensor = torch.Tensor
CodesLike = Union[Tensor, np.ndarray]

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
}


def _activation(name: str, source: str) -> Callable[[Tensor], Tensor]:
    if name not in _ACTIVATIONS:
        raise CheckpointError(f"{source}: unsupported activation {name!r}")
    return _ACTIVATIONS[name]


# --------------------------------------------------------------------------------------------
# Shared transformer pieces
# --------------------------------------------------------------------------------------------

def _split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, L, H * Dh) -> (B, H, L, Dh)."""
    b, l, _ = x.shape
    return x.view(b, l, heads, -1).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    """(B, H, L, Dh) -> (B, L, H * Dh)."""
    b, h, l, d = x.shape
    return x.transpose(1, 2).reshape(b, l, h * d)


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CodecEncoderConfig:
    """The Mimi encoder half of the codec (`encoder_config` in speech_tokenizer/config.json)."""

    sampling_rate: int = 24000
    hidden_size: int = 512
    num_filters: int = 64
    num_residual_layers: int = 1
    upsampling_ratios: tuple[int, ...] = (8, 6, 5, 4)   # applied reversed when encoding
    kernel_size: int = 7
    last_kernel_size: int = 3
    residual_kernel_size: int = 3
    dilation_growth_rate: int = 2
    compress: int = 2
    pad_mode: str = "constant"
    use_conv_shortcut: bool = False
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 8
    head_dim: int = 64
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    hidden_act: str = "gelu"
    num_quantizers: int = 32
    num_semantic_quantizers: int = 1
    codebook_size: int = 2048
    frame_rate: float = 12.5

    @classmethod
    def from_dict(cls, d: dict) -> "CodecEncoderConfig":
        hidden = int(d.get("hidden_size", cls.hidden_size))
        heads = int(d.get("num_attention_heads", cls.num_attention_heads))
        return cls(
            sampling_rate=int(d.get("sampling_rate", cls.sampling_rate)), hidden_size=hidden,
            num_filters=int(d.get("num_filters", cls.num_filters)),
            num_residual_layers=int(d.get("num_residual_layers", cls.num_residual_layers)),
            upsampling_ratios=tuple(int(r) for r in (d.get("upsampling_ratios") or cls.upsampling_ratios)),
            kernel_size=int(d.get("kernel_size", cls.kernel_size)),
            last_kernel_size=int(d.get("last_kernel_size", cls.last_kernel_size)),
            residual_kernel_size=int(d.get("residual_kernel_size", cls.residual_kernel_size)),
            dilation_growth_rate=int(d.get("dilation_growth_rate", cls.dilation_growth_rate)),
            compress=int(d.get("compress", cls.compress)), pad_mode=str(d.get("pad_mode", cls.pad_mode)),
            use_conv_shortcut=bool(d.get("use_conv_shortcut", cls.use_conv_shortcut)),
            num_hidden_layers=int(d.get("num_hidden_layers", cls.num_hidden_layers)),
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads", heads)),
            head_dim=int(d.get("head_dim") or hidden // heads),
            norm_eps=float(d.get("norm_eps", cls.norm_eps)),
            rope_theta=float(d.get("rope_theta", cls.rope_theta)),
            hidden_act=str(d.get("hidden_act", cls.hidden_act)),
            num_quantizers=int(d.get("num_quantizers", cls.num_quantizers)),
            num_semantic_quantizers=int(d.get("num_semantic_quantizers", cls.num_semantic_quantizers)),
            codebook_size=int(d.get("codebook_size", cls.codebook_size)),
            frame_rate=float(d.get("frame_rate") or cls.frame_rate),
        )


@dataclass(frozen=True)
class CodecDecoderConfig:
    """The decoder half (`decoder_config` in speech_tokenizer/config.json)."""

    codebook_size: int = 2048
    codebook_dim: int = 512
    latent_dim: int = 1024
    hidden_size: int = 512
    intermediate_size: int = 1024
    num_hidden_layers: int = 8
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    head_dim: int = 64
    rope_theta: float = 10000.0
    sliding_window: int = 72
    rms_norm_eps: float = 1e-5
    hidden_act: str = "silu"
    num_quantizers: int = 16
    upsample_rates: tuple[int, ...] = (8, 5, 4, 3)
    upsampling_ratios: tuple[int, ...] = (2, 2)
    decoder_dim: int = 1536

    @classmethod
    def from_dict(cls, d: dict) -> "CodecDecoderConfig":
        hidden = int(d.get("hidden_size", cls.hidden_size))
        heads = int(d.get("num_attention_heads", cls.num_attention_heads))
        return cls(
            codebook_size=int(d.get("codebook_size", cls.codebook_size)),
            codebook_dim=int(d.get("codebook_dim", cls.codebook_dim)),
            latent_dim=int(d.get("latent_dim", cls.latent_dim)), hidden_size=hidden,
            intermediate_size=int(d.get("intermediate_size", cls.intermediate_size)),
            num_hidden_layers=int(d.get("num_hidden_layers", cls.num_hidden_layers)),
            num_attention_heads=heads, num_key_value_heads=int(d.get("num_key_value_heads", heads)),
            head_dim=int(d.get("head_dim") or hidden // heads),
            rope_theta=float(d.get("rope_theta", cls.rope_theta)),
            sliding_window=int(d.get("sliding_window", cls.sliding_window)),
            rms_norm_eps=float(d.get("rms_norm_eps", cls.rms_norm_eps)),
            hidden_act=str(d.get("hidden_act", cls.hidden_act)),
            num_quantizers=int(d.get("num_quantizers", cls.num_quantizers)),
            upsample_rates=tuple(int(r) for r in d.get("upsample_rates", cls.upsample_rates)),
            upsampling_ratios=tuple(int(r) for r in d.get("upsampling_ratios", cls.upsampling_ratios)),
            decoder_dim=int(d.get("decoder_dim", cls.decoder_dim)),
        )

    @property
    def samples_per_frame(self) -> int:
        return int(np.prod(self.upsampling_ratios)) * int(np.prod(self.upsample_rates))


# --------------------------------------------------------------------------------------------
# Encoder (Mimi-style; used on reference clips only, so written for clarity and exact parity)
# --------------------------------------------------------------------------------------------

class _PaddedConv:
    """A conv1d padded like Mimi's causal conv: (kernel_eff - stride) on the left, and on the right
    just enough to complete the last stride (so the output has ceil(L / stride) samples)."""

    def __init__(self, w: Weights, stride: int = 1, dilation: int = 1, pad_mode: str = "constant"):
        self.weight = w["conv.weight"]            # (C_out, C_in, K)
        self.bias = w.opt("conv.bias")
        self.stride, self.dilation = stride, dilation
        self.pad_mode = pad_mode
        kernel_eff = (self.weight.shape[-1] - 1) * dilation + 1
        self.left = kernel_eff - stride

    def __call__(self, x: Tensor) -> Tensor:      # (B, C_in, L) -> (B, C_out, ceil(L / stride))
        extra = (-x.shape[-1]) % self.stride
        if self.pad_mode == "constant":
            x = F.pad(x, (self.left, extra))
        else:
            x = F.pad(x, (self.left, extra), mode=self.pad_mode)
        return F.conv1d(x, self.weight, self.bias, stride=self.stride, dilation=self.dilation)


class _ResnetBlock:
    """x + conv_1x1(elu(conv_k(elu(x)))), the SEANet residual block."""

    def __init__(self, w: Weights, dilation: int, pad_mode: str):
        self.conv1 = _PaddedConv(w.sub("block.1."), dilation=dilation, pad_mode=pad_mode)
        self.conv2 = _PaddedConv(w.sub("block.3."), pad_mode=pad_mode)

    def __call__(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.elu(self.conv1(F.elu(x))))


class _EncoderLayer:
    """Pre-LayerNorm transformer layer with layer scale, full causal attention and RoPE."""

    def __init__(self, w: Weights, cfg: CodecEncoderConfig):
        self.cfg = cfg
        self.ln1 = (w["input_layernorm.weight"], w["input_layernorm.bias"])
        self.ln2 = (w["post_attention_layernorm.weight"], w["post_attention_layernorm.bias"])
        self.wq, self.wk = w["self_attn.q_proj.weight"], w["self_attn.k_proj.weight"]
        self.wv, self.wo = w["self_attn.v_proj.weight"], w["self_attn.o_proj.weight"]
        self.scale_attn, self.scale_mlp = w["self_attn_layer_scale.scale"], w["mlp_layer_scale.scale"]
        self.fc1, self.fc2 = w["mlp.fc1.weight"], w["mlp.fc2.weight"]
        self.act = _activation(cfg.hidden_act, w.source)

    def __call__(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:     # x: (B, L, C)
        cfg = self.cfg
        h = F.layer_norm(x, (x.shape[-1],), *self.ln1, eps=cfg.norm_eps)
        q = apply_rope(_split_heads(F.linear(h, self.wq), cfg.num_attention_heads), cos, sin)
        k = apply_rope(_split_heads(F.linear(h, self.wk), cfg.num_key_value_heads), cos, sin)
        v = _split_heads(F.linear(h, self.wv), cfg.num_key_value_heads)
        if cfg.num_key_value_heads != cfg.num_attention_heads:
            rep = cfg.num_attention_heads // cfg.num_key_value_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=x.shape[1] > 1)
        x = x + self.scale_attn * F.linear(_merge_heads(a), self.wo)
        h = F.layer_norm(x, (x.shape[-1],), *self.ln2, eps=cfg.norm_eps)
        return x + self.scale_mlp * F.linear(self.act(F.linear(h, self.fc1)), self.fc2)


class _RVQEncoder:
    """Residual vector quantizer (encode side): project, then greedily pick the nearest centroid
    in each codebook and subtract it."""

    def __init__(self, w: Weights, n_layers: int):
        self.input_proj = w.opt("input_proj.weight")                      # (D, C, 1) or None
        self.codebooks = []
        for i in range(n_layers):
            cb = w.sub(f"layers.{i}.codebook.")
            usage = cb["cluster_usage"]
            self.codebooks.append(cb["embed_sum"] / usage.clamp(min=1e-5)[:, None])   # (K, D)

    def __call__(self, x: Tensor) -> Tensor:          # x: (1, C, T) -> codes (n_layers, T)
        if self.input_proj is not None:
            x = F.conv1d(x, self.input_proj)
        residual = x[0]                                # (D, T)
        codes = []
        for embed in self.codebooks:
            dist = torch.cdist(residual.t()[None].float(), embed[None].float(), p=2)[0]  # (T, K)
            idx = dist.argmin(dim=-1)
            codes.append(idx)
            residual = residual - F.embedding(idx, embed).t()
        return torch.stack(codes)


class CodecEncoder:
    """wav (1, 1, S) -> codes (T, num_codebooks), T = ceil(S / 1920)."""

    def __init__(self, w: Weights, cfg: CodecEncoderConfig, num_codebooks: int):
        self.cfg = cfg
        pad = cfg.pad_mode
        if cfg.use_conv_shortcut:
            raise CheckpointError(f"{w.source}: encoder use_conv_shortcut=True is not supported")
        layers = w.sub("encoder.layers.")
        stack: list[Callable[[Tensor], Tensor]] = [_PaddedConv(layers.sub("0."), pad_mode=pad)]
        for ratio in reversed(cfg.upsampling_ratios):
            for j in range(cfg.num_residual_layers):
                stack.append(_ResnetBlock(layers.sub(f"{len(stack)}."), cfg.dilation_growth_rate ** j, pad))
            stack.append(F.elu)
            stack.append(_PaddedConv(layers.sub(f"{len(stack)}."), stride=ratio, pad_mode=pad))
        stack.append(F.elu)
        stack.append(_PaddedConv(layers.sub(f"{len(stack)}."), pad_mode=pad))
        self.conv_stack = stack
        self.layers = [_EncoderLayer(w.sub(f"encoder_transformer.layers.{i}."), cfg)
                       for i in range(cfg.num_hidden_layers)]
        conv_rate = cfg.sampling_rate / int(np.prod(cfg.upsampling_ratios))
        self.downsample = _PaddedConv(w.sub("downsample."), stride=int(round(conv_rate / cfg.frame_rate)),
                                      pad_mode="replicate")
        n_sem = cfg.num_semantic_quantizers
        n_acoustic = max(0, min(num_codebooks, cfg.num_quantizers) - n_sem)
        self.semantic = _RVQEncoder(w.sub("quantizer.semantic_residual_vector_quantizer."), n_sem)
        self.acoustic = _RVQEncoder(w.sub("quantizer.acoustic_residual_vector_quantizer."), n_acoustic)

    def __call__(self, wav: Tensor) -> Tensor:
        x = wav                                                  # (1, 1, S)
        for f in self.conv_stack:
            x = f(x)                                             # -> (1, hidden, ceil(S / 960))
        x = x.transpose(1, 2)                                    # (1, L, hidden)
        cos, sin = rope_tables(self.cfg.head_dim, self.cfg.rope_theta, 0, x.shape[1], x.device, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        x = self.downsample(x.transpose(1, 2))                   # (1, hidden, T)
        codes = torch.cat([self.semantic(x), self.acoustic(x)])  # (Q, T); both quantize x itself
        return codes.t()                                         # (T, Q)


# --------------------------------------------------------------------------------------------
# Decoder: stateful building blocks. Each stateful op owns a slot in a DecoderState.
# --------------------------------------------------------------------------------------------

@dataclass
class DecoderState:
    """Everything a stream carries from one push to the next (a few MB at full size).

    A state holds B rows. Rows may have consumed different numbers of frames (`DecoderState.stack`
    of several streams): each row's keys are the last min(frames, window - 1) of its layer's key
    tensor, the slots to their left are padding that attention never sees."""

    conv: list[Tensor]                       # per conv slot: last input samples (B, context, C_in)
    keys: list[Optional[Tensor]]             # per transformer layer: (B, H_kv, <= window - 1, Dh)
    values: list[Optional[Tensor]]
    frames: list[int]                        # per row: frames consumed so far (= next RoPE position)

    def clone(self) -> "DecoderState":
        c = lambda t: None if t is None else t.clone()  # noqa: E731
        return DecoderState([t.clone() for t in self.conv], [c(t) for t in self.keys],
                            [c(t) for t in self.values], list(self.frames))

    @staticmethod
    def stack(states: list["DecoderState"]) -> "DecoderState":
        """One state holding the rows of `states` in order (keys left-padded to the longest history)."""
        conv = [torch.cat(ts) for ts in zip(*(s.conv for s in states))]
        return DecoderState(conv, [_stack_kv([s.keys[i] for s in states]) for i in range(len(states[0].keys))],
                            [_stack_kv([s.values[i] for s in states]) for i in range(len(states[0].values))],
                            [f for s in states for f in s.frames])

    def split(self, keep: int) -> list["DecoderState"]:
        """One single-row state per row, each with exactly its own min(frames, keep) keys."""
        def row(t: Optional[Tensor], b: int, n: int) -> Optional[Tensor]:
            return None if t is None or n == 0 else t[b:b + 1, :, t.shape[2] - n:].clone()

        return [DecoderState([t[b:b + 1].clone() for t in self.conv], [row(t, b, min(f, keep)) for t in self.keys],
                             [row(t, b, min(f, keep)) for t in self.values], [f])
                for b, f in enumerate(self.frames)]


def _stack_kv(ts: list[Optional[Tensor]]) -> Optional[Tensor]:
    present = [t for t in ts if t is not None]
    if not present:
        return None
    longest = max(t.shape[2] for t in present)
    like = present[0]
    padded = []
    for t in ts:
        if t is None:
            t = like.new_zeros(1, like.shape[1], 0, like.shape[3])
        if t.shape[2] < longest:
            t = F.pad(t, (0, 0, longest - t.shape[2], 0))
        padded.append(t)
    return torch.cat(padded)


class _Slots:
    """Hands out conv slot numbers at build time and remembers each slot's (channels, context)."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, int]] = []

    def take(self, channels: int, context: int) -> int:
        self.shapes.append((channels, context))
        return len(self.shapes) - 1


def _with_context(x: Tensor, state: DecoderState, slot: int, context: int) -> Tensor:
    """x (B, n, C) after the last `context` inputs of its stream (kept in the state's conv slot `slot`,
    then replaced by x's own last ones)."""
    if not context:
        return x
    x = torch.cat([state.conv[slot], x], dim=1)
    state.conv[slot] = x[:, -context:].clone()
    return x


def _windows(x: Tensor, taps: int, n: int, dilation: int = 1) -> Tensor:
    """(B, n + context, C) -> (B, n, taps * C): [b, i, t * C + c] = x[b, i + t * dilation, c]."""
    return x if taps == 1 else torch.cat([x[:, t * dilation:t * dilation + n] for t in range(taps)], dim=-1)


# The decoder's convolutions work on channels-last activations (B, n, C): a pointwise conv is then one
# matrix product over the rows as they lie, a transposed conv's output needs no reordering, and torch's
# conv2d over a (B, C, 1, n) channels-last view runs oneDNN's direct convolution without copies (2-3x
# faster in bfloat16 than conv1d over (B, C, n), which reorders its input and output).
# A dense conv with at least this many input channels runs as one matrix product over its input windows
# instead: the decoder's wide layers see few rows (a few frames of a few streams), where the convolution's
# per-call set-up costs more than the arithmetic (bfloat16, 2 threads, 8 streams x 4 frames: 1024 -> 1536,
# kernel 7, 2.2 ms as a matrix product against 13.7 ms; 768 wide: 3.1 against 6.4 ms). Narrow layers over
# long inputs stay convolutions (2-25x faster there).
MATMUL_MIN_CHANNELS = 512


class _CausalConv:
    """Stride-1 causal conv1d over channels-last (B, n, C_in); its left context comes from the state
    instead of zero padding."""

    def __init__(self, w: Weights, slots: _Slots, dilation: int = 1, groups: int = 1):
        # as stored until the decoder is cast (`_cast` calls `_after_cast`): rearranged once, in its final dtype
        self.weight, self.bias = w["conv.weight"], w.opt("conv.bias")      # (C_out, C_in/groups, K)
        c_group, self.k = self.weight.shape[1:]
        self.dilation, self.groups = dilation, groups
        self.context = (self.k - 1) * dilation
        c_in = c_group * groups
        self.pointwise = groups == 1 and self.k == 1
        self.as_matmul = groups == 1 and c_in >= MATMUL_MIN_CHANNELS and not self.pointwise
        self.slot = slots.take(c_in, self.context) if self.context else -1

    def _after_cast(self) -> None:
        if self.weight.dim() != 3:      # cast again (a copy of a loaded decoder to another dtype): rearranged already
            return
        if self.pointwise:              # (C_out, C_in)
            self.weight = self.weight[:, :, 0].contiguous()
        else:                           # (C_out, C_in / groups, 1, K), channels last: in memory (C_out, K, C_in / groups)
            self.weight = self.weight[:, :, None, :].contiguous(memory_format=torch.channels_last)

    def __call__(self, x: Tensor, state: DecoderState) -> Tensor:         # (B, n, C_in) -> (B, n, C_out)
        assert self.weight.dim() != 3, "the decoder was not cast (Codec.load does it)"
        if self.pointwise:
            return F.linear(x, self.weight, self.bias)
        x = _with_context(x, state, self.slot, self.context)
        n = x.shape[1] - self.context
        if self.as_matmul:
            # [b, i, t * C_in + c] = input i - context + t * dilation of channel c: the weight's layout in memory
            windows = _windows(x, self.k, n, self.dilation)
            return F.linear(windows, self.weight.permute(0, 2, 3, 1).reshape(self.weight.shape[0], -1), self.bias)
        y = F.conv2d(x.transpose(1, 2).unsqueeze(2), self.weight, self.bias, dilation=(1, self.dilation),
                     groups=self.groups)                                 # (B, C_out, 1, n), channels last
        return y.squeeze(2).transpose(1, 2).contiguous()


class _CausalTransposedConv:
    """ConvTranspose1d(kernel K, stride S) with the right (K - S) samples trimmed, over channels-last
    (B, n, C_in): output block i (S samples) depends on inputs i, i-1, ... down to i - (K - 1) // S,
    taken from the state.

    Computed in polyphase form: block i is one matrix product of the m = ceil(K / S) inputs i - m + 1, ..,
    i (concatenated, m * C_in values) with an (m * C_in, S * C_out) weight, whose column s * C_out + c
    gives sample s of channel c: the product's rows are the output samples, channels last, as they lie.
    The same products as the transposed convolution, only for the new blocks, and on torch's matrix
    product: its conv_transpose1d took 30-90 ms in bfloat16 on the CPU for the 1536 -> 768 upsampler on
    one frame, the matrix product 3 ms."""

    def __init__(self, w: Weights, slots: _Slots, stride: int):
        # as stored until the decoder is cast (`_cast` calls `_after_cast`): rearranged once, in its final dtype
        self.weight, self.bias = w["conv.weight"], w.opt("conv.bias")      # (C_in, C_out, K)
        c_in, self.c_out, k = self.weight.shape
        self.stride, self.taps = stride, -(-k // stride)
        self.polyphase = False
        self.context = self.taps - 1
        self.slot = slots.take(c_in, self.context) if self.context else -1

    def _after_cast(self) -> None:
        if self.polyphase:              # cast again (a copy of a loaded decoder to another dtype): rearranged already
            return
        c_in, c_out, k = self.weight.shape
        m, stride = self.taps, self.stride
        w = self.weight if k == m * stride else F.pad(self.weight, (0, m * stride - k))
        # [p * C_in + c_in, s * C_out + c] = W[c_in, c, (m - 1 - p) * S + s]: window position p holds input
        # i - (m - 1) + p of block i, which tap m - 1 - p multiplies (the taps reversed here, so the windows
        # are taken as they lie)
        self.weight = (w.view(c_in, c_out, m, stride).flip(2).permute(2, 0, 3, 1)
                       .reshape(m * c_in, stride * c_out).contiguous())
        self.bias = None if self.bias is None else self.bias.repeat(stride).contiguous()
        self.polyphase = True

    def __call__(self, x: Tensor, state: DecoderState) -> Tensor:         # (B, n, C_in) -> (B, n * S, C_out)
        assert self.polyphase, "the decoder was not cast (Codec.load does it)"
        b, n, _ = x.shape
        x = _with_context(x, state, self.slot, self.context)
        # [b, i, p * C_in + c] = input i - (taps - 1) + p of channel c
        y = torch.matmul(_windows(x, self.taps, n), self.weight)             # (B, n, S * C_out)
        if self.bias is not None:
            y = y + self.bias
        return y.view(b, n * self.stride, self.c_out)


class _SnakeBeta:
    """x + sin(x * e^alpha)^2 / (e^beta + 1e-9), per channel (the last dimension).

    `op`: a fused implementation (x, alpha, inv_beta) -> y in float32 with one rounding (the int8
    extension's `snake`, set by `Codec.use_fused_ops`): 5x faster than torch's five bfloat16 ops,
    which round after each (bench/RESULTS.md)."""

    op: Optional[Callable[[Tensor, Tensor, Tensor], Tensor]] = None

    def __init__(self, w: Weights):
        self.alpha = w["alpha"].float().exp()                                  # (C,)
        self.inv_beta = 1.0 / (w["beta"].float().exp() + 1e-9)

    def __call__(self, x: Tensor) -> Tensor:
        if self.op is not None and x.device.type == "cpu":
            return self.op(x, self.alpha, self.inv_beta)
        return x + self.inv_beta * torch.sin(x * self.alpha).pow(2)


class _ConvNeXt:
    """x + gamma * pw2(gelu(pw1(layernorm(causal_depthwise_conv7(x)))))."""

    def __init__(self, w: Weights, slots: _Slots, dim: int):
        self.dwconv = _CausalConv(w.sub("dwconv."), slots, groups=dim)
        self.norm = (w["norm.weight"], w["norm.bias"])
        self.pw1 = (w["pwconv1.weight"], w["pwconv1.bias"])
        self.pw2 = (w["pwconv2.weight"], w["pwconv2.bias"])
        self.gamma = w["gamma"]

    def __call__(self, x: Tensor, state: DecoderState) -> Tensor:         # (B, n, C)
        h = F.layer_norm(self.dwconv(x, state), (x.shape[-1],), *self.norm, eps=1e-6)
        h = F.linear(F.gelu(F.linear(h, *self.pw1)), *self.pw2)
        return x + self.gamma * h


class _ResidualUnit:
    """x + conv1x1(snake(conv7_dilated(snake(x))))."""

    def __init__(self, w: Weights, slots: _Slots, dilation: int):
        self.act1, self.act2 = _SnakeBeta(w.sub("act1.")), _SnakeBeta(w.sub("act2."))
        self.conv1 = _CausalConv(w.sub("conv1."), slots, dilation=dilation)
        self.conv2 = _CausalConv(w.sub("conv2."), slots)

    def __call__(self, x: Tensor, state: DecoderState) -> Tensor:
        return x + self.conv2(self.act2(self.conv1(self.act1(x), state)), state)


class _UpsampleBlock:
    """SnakeBeta -> transposed conv (x rate) -> residual units with dilations 1, 3, 9."""

    def __init__(self, w: Weights, slots: _Slots, rate: int):
        self.act = _SnakeBeta(w.sub("block.0."))
        self.up = _CausalTransposedConv(w.sub("block.1."), slots, rate)
        self.units = [_ResidualUnit(w.sub(f"block.{2 + i}."), slots, d) for i, d in enumerate((1, 3, 9))]

    def __call__(self, x: Tensor, state: DecoderState) -> Tensor:
        x = self.up(self.act(x), state)
        for unit in self.units:
            x = unit(x, state)
        return x


class _DecoderLayer:
    """Pre-RMSNorm transformer layer with layer scale, sliding-window causal attention, SwiGLU."""

    def __init__(self, w: Weights, cfg: CodecDecoderConfig):
        self.cfg = cfg
        self.norm1, self.norm2 = w["input_layernorm.weight"], w["post_attention_layernorm.weight"]
        a = w.sub("self_attn.")
        self.wqkv = torch.cat([a["q_proj.weight"], a["k_proj.weight"], a["v_proj.weight"]])
        biases = [a.opt(f"{p}_proj.bias") for p in "qkv"]
        self.bqkv = torch.cat(biases) if all(b is not None for b in biases) else None
        self.wo, self.bo = a["o_proj.weight"], a.opt("o_proj.bias")
        self.w_gate_up = torch.cat([w["mlp.gate_proj.weight"], w["mlp.up_proj.weight"]])
        self.w_down = w["mlp.down_proj.weight"]
        self.scale_attn, self.scale_mlp = w["self_attn_layer_scale.scale"], w["mlp_layer_scale.scale"]
        self.act = _activation(cfg.hidden_act, w.source)
        self.q_size = cfg.num_attention_heads * cfg.head_dim
        self.kv_size = cfg.num_key_value_heads * cfg.head_dim

    def attention(self, h: Tensor, cos: Tensor, sin: Tensor, state: DecoderState, i: int) -> Tensor:
        cfg = self.cfg
        n = h.shape[1]
        q, k, v = F.linear(h, self.wqkv, self.bqkv).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = apply_rope(_split_heads(q, cfg.num_attention_heads), cos, sin)     # (B, H, n, Dh)
        k = apply_rope(_split_heads(k, cfg.num_key_value_heads), cos, sin)
        v = _split_heads(v, cfg.num_key_value_heads)
        past = 0
        if state.keys[i] is not None:
            past = state.keys[i].shape[2]
            k, v = torch.cat([state.keys[i], k], dim=2), torch.cat([state.values[i], v], dim=2)
        keep = cfg.sliding_window - 1                    # a future query needs this many past keys
        state.keys[i], state.values[i] = k[:, :, -keep:].clone(), v[:, :, -keep:].clone()
        history = [min(f, keep) for f in state.frames]   # each row's real keys: the last `history` of `past`
        if all(m == past for m in history):
            mask = _window_mask(n, past, cfg.sliding_window, h.device)
        else:
            mask = _rows_window_mask(n, past, history, cfg.sliding_window, h.device)
        if cfg.num_key_value_heads != cfg.num_attention_heads:
            rep = cfg.num_attention_heads // cfg.num_key_value_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if isinstance(mask, bool):
            a = F.scaled_dot_product_attention(q, k, v, is_causal=mask)
        else:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return F.linear(_merge_heads(a), self.wo, self.bo)

    def __call__(self, x: Tensor, cos: Tensor, sin: Tensor, state: DecoderState, i: int) -> Tensor:
        eps = self.cfg.rms_norm_eps
        x = x + self.scale_attn * self.attention(rms_norm(x, self.norm1, eps), cos, sin, state, i)
        gate, up = F.linear(rms_norm(x, self.norm2, eps), self.w_gate_up).chunk(2, dim=-1)
        return x + self.scale_mlp * F.linear(self.act(gate) * up, self.w_down)


def _window_mask(n: int, past: int, window: int, device: torch.device) -> Union[bool, Tensor]:
    """Attention mask for n new queries over (past + n) keys: key j is visible to query i when
    0 <= (i + past) - j < window. Returns is_causal (a bool) when no explicit mask is needed."""
    if past == 0 and n <= window:
        return n > 1
    if n == 1 and past + 1 <= window:
        return False
    qpos = torch.arange(n, device=device)[:, None] + past
    kpos = torch.arange(past + n, device=device)[None, :]
    return (kpos <= qpos) & (kpos > qpos - window)


def _rows_window_mask(n: int, past: int, history: list[int], window: int, device: torch.device) -> Tensor:
    """(B, 1, n, past + n) mask for rows whose first (past - history[b]) key slots are padding."""
    qpos = torch.arange(n, device=device)[:, None] + past
    kpos = torch.arange(past + n, device=device)[None, :]
    causal = (kpos <= qpos) & (kpos > qpos - window)                               # (n, past + n)
    first = past - torch.tensor(history, device=device)                             # (B,)
    real = kpos[None] >= first[:, None, None]                                       # (B, 1, past + n)
    return (causal[None] & real)[:, None]


class CodecDecoder:
    """codes (B, n, Q) + state -> wav (B, n * 1920): the next n frames of a stream."""

    def __init__(self, w: Weights, cfg: CodecDecoderConfig):
        self.cfg = cfg
        q = w.sub("quantizer.")
        self.codebooks = []                                      # Q x (K, D/2)
        for name, count in (("rvq_first", 1), ("rvq_rest", cfg.num_quantizers - 1)):
            for i in range(count):
                cb = q.sub(f"{name}.vq.layers.{i}._codebook.")
                self.codebooks.append(cb["embedding_sum"].float() / cb["cluster_usage"].float().clamp(min=1e-5)[:, None])
        self.proj_first = q["rvq_first.output_proj.weight"][..., 0]     # (D, D/2)
        self.proj_rest = q["rvq_rest.output_proj.weight"][..., 0]
        self.rest_codebooks = torch.stack(self.codebooks[1:])           # (Q-1, K, D/2)

        slots = _Slots()
        self.pre_conv = _CausalConv(w.sub("pre_conv."), slots)
        t = w.sub("pre_transformer.")
        self.input_proj = (t["input_proj.weight"], t["input_proj.bias"])
        self.output_proj = (t["output_proj.weight"], t["output_proj.bias"])
        self.final_norm = t["norm.weight"]
        self.layers = [_DecoderLayer(t.sub(f"layers.{i}."), cfg) for i in range(cfg.num_hidden_layers)]
        self.upsample = [(_CausalTransposedConv(w.sub(f"upsample.{i}.0."), slots, r),
                          _ConvNeXt(w.sub(f"upsample.{i}.1."), slots, cfg.latent_dim))
                         for i, r in enumerate(cfg.upsampling_ratios)]
        d = w.sub("decoder.")
        self.conv_in = _CausalConv(d.sub("0."), slots)
        self.blocks = [_UpsampleBlock(d.sub(f"{1 + i}."), slots, r) for i, r in enumerate(cfg.upsample_rates)]
        n = len(cfg.upsample_rates)
        self.act_out = _SnakeBeta(d.sub(f"{1 + n}."))
        self.conv_out = _CausalConv(d.sub(f"{2 + n}."), slots)
        self.slot_shapes = slots.shapes
        self.dtype, self.device = self.proj_first.dtype, self.proj_first.device

    def activations(self) -> list["_SnakeBeta"]:
        """Every SnakeBeta of the decoder: each upsampling block's, its residual units' two, the output's."""
        return [self.act_out] + [a for block in self.blocks
                                 for a in [block.act] + [u for unit in block.units for u in (unit.act1, unit.act2)]]

    def new_state(self, batch: int = 1) -> DecoderState:
        conv = [torch.zeros(batch, k, c, dtype=self.dtype, device=self.device) for c, k in self.slot_shapes]
        n = len(self.layers)
        return DecoderState(conv, [None] * n, [None] * n, [0] * batch)

    def embed(self, codes: Tensor) -> Tensor:
        """codes (B, n, Q) -> (B, n, D): sum of the codebook vectors, projected."""
        first = F.embedding(codes[..., 0], self.codebooks[0])                         # (B, n, D/2)
        q = torch.arange(1, codes.shape[-1], device=codes.device)
        rest = self.rest_codebooks[q - 1, codes[..., 1:]].sum(dim=2)                 # (B, n, D/2)
        return F.linear(first, self.proj_first) + F.linear(rest, self.proj_rest)

    def __call__(self, codes: Tensor, state: DecoderState) -> Tensor:
        n = codes.shape[1]
        # channels last throughout: (B, samples, channels)
        x = self.pre_conv(self.embed(codes), state)                                  # (B, n, latent)
        x = F.linear(x, *self.input_proj)                                             # (B, n, hidden)
        cos, sin = self._rope(state.frames, n, x.dtype, x.device)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, state, i)
        x = F.linear(rms_norm(x, self.final_norm, self.cfg.rms_norm_eps), *self.output_proj)   # (B, n, latent)
        for up, convnext in self.upsample:
            x = convnext(up(x, state), state)                                         # (B, 4n, latent)
        x = self.conv_in(x, state)                                                    # (B, 4n, decoder_dim)
        for block in self.blocks:
            x = block(x, state)                                                       # x rate, channels / 2
        wav = self.conv_out(self.act_out(x), state)                                   # (B, 1920n, 1)
        state.frames = [f + n for f in state.frames]
        return wav[..., 0].clamp(-1.0, 1.0)

    def _rope(self, frames: list[int], n: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos/sin for n new frames of each row: (n, Dh) when the rows share their position, else (B, 1, n, Dh)."""
        cfg = self.cfg
        if len(set(frames)) == 1:
            return rope_tables(cfg.head_dim, cfg.rope_theta, frames[0], n, device, dtype)
        tables = [rope_tables(cfg.head_dim, cfg.rope_theta, f, n, device, dtype) for f in frames]
        return torch.stack([c for c, _ in tables])[:, None], torch.stack([s for _, s in tables])[:, None]


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def _cast(obj: object, dtype: torch.dtype) -> None:
    """Cast, in place, every floating tensor held by a decoder building block (attributes, lists, tuples)."""
    def conv(v):
        if isinstance(v, Tensor):
            return v.to(dtype) if v.is_floating_point() else v
        if isinstance(v, (list, tuple)):
            return type(v)(conv(x) for x in v)
        if type(v).__module__ == __name__ and hasattr(v, "__dict__") and not is_dataclass(v):
            _cast(v, dtype)
        return v
    for name, value in vars(obj).items():
        setattr(obj, name, conv(value))
    after = getattr(obj, "_after_cast", None)
    if after is not None:
        after()


def decoder_dtype_for(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The codec decoder's precision for "auto": bfloat16 on a CPU with native bfloat16 arithmetic
    (AVX-512 BF16 or AMX: the convolutions run 2-3x faster, see bench/RESULTS.md for the error), the
    model's dtype otherwise (float32 on an AVX2 CPU, where bfloat16 would be emulated and slower)."""
    if device.type == "cpu" and dtype == torch.float32 and cpu_has_native_bf16():
        return torch.bfloat16
    return dtype


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


class Codec:
    """The 12 Hz speech tokenizer. Load with `Codec.load(checkpoint / "speech_tokenizer")`.

    Only the decoder stays in memory: the encoder (used once per reference clip) is read from the
    file for each `encode` and freed afterwards."""

    sample_rate: int
    frame_samples: int
    num_codebooks: int
    # decode() works through long inputs this many frames at a time (exactly, carrying the state),
    # which bounds its memory: ~10 MB of activations per audio second per tensor at full size.
    decode_chunk_frames: int = 150

    def __init__(self, decoder: CodecDecoder, encoder_config: CodecEncoderConfig, *, sample_rate: int,
                 frame_samples: int, num_codebooks: int, source: str, device: torch.device, dtype: torch.dtype):
        self.decoder, self.encoder_config = decoder, encoder_config
        self.sample_rate, self.frame_samples, self.num_codebooks = sample_rate, frame_samples, num_codebooks
        self.codebook_size = decoder.cfg.codebook_size
        self.source = source
        self.device, self.dtype = device, dtype          # the encoder's (the model's) device and dtype

    @classmethod
    def load(cls, folder: Union[str, Path], device: Union[str, torch.device] = "cpu",
             dtype: torch.dtype = torch.float32, decoder_dtype: Optional[torch.dtype] = None) -> "Codec":
        """`decoder_dtype`: the decoder's precision (None: `dtype`; see `decoder_dtype_for`)."""
        folder = Path(folder)
        cfg = read_json(folder / "config.json")
        source = str(folder / "model.safetensors")
        try:
            enc_cfg = CodecEncoderConfig.from_dict(cfg.get("encoder_config") or {})
            dec_cfg = CodecDecoderConfig.from_dict(cfg.get("decoder_config") or {})
            num_codebooks = int(cfg.get("encoder_valid_num_quantizers", 16))
            in_sr, out_sr = int(cfg.get("input_sample_rate", 24000)), int(cfg.get("output_sample_rate", 24000))
            hop = int(cfg.get("decode_upsample_rate", dec_cfg.samples_per_frame))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{folder / 'config.json'}: malformed codec config ({e})") from None
        if in_sr != out_sr or enc_cfg.sampling_rate != in_sr:
            raise CheckpointError(f"{folder / 'config.json'}: input/output sample rates differ ({in_sr}, {out_sr})")
        if hop != dec_cfg.samples_per_frame or num_codebooks != dec_cfg.num_quantizers:
            raise CheckpointError(f"{folder / 'config.json'}: inconsistent frame size or codebook count")
        device = torch.device(device)
        # read as stored and cast once (what is computed from the weights at build time is computed in
        # float32 first): a bfloat16 checkpoint's decoder in bfloat16 is never widened and narrowed again
        tensors = read_safetensors(folder / "model.safetensors", prefix="decoder.", device=device)
        with torch.inference_mode():
            decoder = CodecDecoder(Weights(tensors, source).sub("decoder."), dec_cfg)
            del tensors
            _cast(decoder, decoder_dtype or dtype)
            decoder.dtype = decoder_dtype or dtype
        codec = cls(decoder, enc_cfg, sample_rate=out_sr, frame_samples=hop, num_codebooks=num_codebooks,
                    source=source, device=device, dtype=dtype)
        return codec

    def use_fused_ops(self, snake: Callable[[Tensor, Tensor, Tensor], Tensor]) -> int:
        """Give every SnakeBeta of the decoder a fused implementation (the int8 extension's `snake`,
        see _SnakeBeta); -> how many."""
        acts = self.decoder.activations()
        for act in acts:
            act.op = snake
        return len(acts)

    def load_encoder(self) -> CodecEncoder:
        """The encoder, read from the checkpoint (it is not kept: one clip per voice needs it)."""
        tensors = read_safetensors(Path(self.source), prefix="encoder.", device=self.device, dtype=self.dtype)
        with torch.inference_mode():
            return CodecEncoder(Weights(tensors, self.source).sub("encoder."), self.encoder_config,
                                self.num_codebooks)

    # -- encoding --------------------------------------------------------------------------

    @torch.inference_mode()
    def encode(self, wav: np.ndarray) -> Tensor:
        """Mono float32 audio at 24 kHz -> codes (ceil(len / 1920), 16), int64, on the CPU."""
        wav = np.asarray(wav)
        if wav.ndim != 1 or wav.size == 0:
            raise ValueError(f"encode expects a non-empty 1-D mono waveform, got shape {wav.shape}")
        x = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))
        x = x.to(device=self.device, dtype=self.dtype)[None, None]                   # (1, 1, S)
        codes = self.load_encoder()(x)                                               # (T', Q)
        frames = -(-wav.shape[0] // self.frame_samples)
        return codes[:frames, :self.num_codebooks].to("cpu", torch.int64)

    # -- decoding --------------------------------------------------------------------------

    def check_codes(self, codes: CodesLike) -> Tensor:
        """(n, 16) integer codes -> int64 tensor on the codec's device; ValueError when malformed."""
        if isinstance(codes, np.ndarray):
            codes = torch.from_numpy(codes)
        if not isinstance(codes, Tensor) or codes.dim() != 2 or codes.shape[1] != self.num_codebooks:
            shape = tuple(codes.shape) if hasattr(codes, "shape") else type(codes).__name__
            raise ValueError(f"codes must have shape (frames, {self.num_codebooks}), got {shape}")
        if codes.is_floating_point() or codes.is_complex():
            raise ValueError("codes must be integers")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got [{int(codes.min())}, "
                             f"{int(codes.max())}]")
        return codes.to(device=self.decoder.device, dtype=torch.int64)

    @torch.inference_mode()
    def decode(self, codes: CodesLike) -> np.ndarray:
        """codes (n, 16) -> float32 audio (n * 1920,), all frames decoded from a fresh state."""
        codes = self.check_codes(codes)
        state = self.decoder.new_state()
        chunks = [self.decoder(codes[None, s:s + self.decode_chunk_frames], state)[0]
                  for s in range(0, codes.shape[0], self.decode_chunk_frames)]
        if not chunks:
            return np.zeros(0, dtype=np.float32)
        return torch.cat(chunks).float().cpu().numpy()

    def streaming_decoder(self, context: Optional[CodesLike] = None) -> "StreamingDecoder":
        """A stream; `context` (e.g. the voice's reference codes) is decoded first and not emitted."""
        return StreamingDecoder(self, context)


class StreamingDecoder:
    """Incremental decoding: push(codes of n new frames) returns their n * 1920 samples at once.

    The decoder is causal end to end, so there is no lookahead: push() never holds samples back
    and flush() returns an empty array (it exists so that callers need not know). The audio
    equals `Codec.decode` of all frames pushed (context included, then cut) to float rounding.
    Cost per push is proportional to the new frames: the state is bounded (conv tails plus 71
    frames of keys/values per layer), whatever the length of the utterance.
    """

    def __init__(self, codec: Codec, context: Optional[CodesLike] = None,
                 state: Optional[DecoderState] = None):
        self.codec = codec
        self.state = state if state is not None else codec.decoder.new_state()
        self.frames_pushed = 0            # frames whose audio was returned (context excluded)
        if context is not None:
            self.prime(context)

    @torch.inference_mode()
    def prime(self, codes: CodesLike) -> None:
        """Run left-context frames through the decoder without emitting their audio."""
        codes = self.codec.check_codes(codes)
        step = self.codec.decode_chunk_frames
        for s in range(0, codes.shape[0], step):
            self.codec.decoder(codes[None, s:s + step], self.state)

    @torch.inference_mode()
    def push(self, codes: CodesLike) -> np.ndarray:
        """Audio (n * 1920 float32 samples) of the n frames in `codes` (n, 16)."""
        codes = self.codec.check_codes(codes)
        if codes.shape[0] == 0:
            return np.zeros(0, dtype=np.float32)
        wav = self.codec.decoder(codes[None], self.state)[0]
        self.frames_pushed += codes.shape[0]
        return wav.float().cpu().numpy()

    @staticmethod
    @torch.inference_mode()
    def push_many(streams: list["StreamingDecoder"], codes: list[CodesLike]) -> list[np.ndarray]:
        """`push` for several streams in one decoder call per frame count: stream i gets the audio of
        codes[i], as its own push would give it (to float rounding). This is how a batch of streams
        shares the codec: one call over B rows costs far less than B calls."""
        checked = [s.codec.check_codes(c) for s, c in zip(streams, codes)]
        out: list[np.ndarray] = [np.zeros(0, dtype=np.float32)] * len(streams)
        groups: dict[int, list[int]] = {}
        for i, c in enumerate(checked):
            if c.shape[0]:
                groups.setdefault(c.shape[0], []).append(i)
        for rows in groups.values():
            if len(rows) == 1:
                out[rows[0]] = streams[rows[0]].push(checked[rows[0]])
                continue
            decoder = streams[rows[0]].codec.decoder
            state = DecoderState.stack([streams[i].state for i in rows])
            wav = decoder(torch.stack([checked[i] for i in rows]), state).float().cpu().numpy()
            for j, (i, row_state) in enumerate(zip(rows, state.split(decoder.cfg.sliding_window - 1))):
                streams[i].state = row_state
                streams[i].frames_pushed += checked[i].shape[0]
                out[i] = wav[j]
        return out

    def flush(self) -> np.ndarray:
        """Samples still owed at the end of the utterance: none, as the decoder has no lookahead."""
        return np.zeros(0, dtype=np.float32)

    def fork(self) -> "StreamingDecoder":
        """An independent copy of this stream's state: prime once per voice, fork per utterance."""
        clone = StreamingDecoder(self.codec, state=self.state.clone())
        clone.frames_pushed = self.frames_pushed
        return clone

    @property
    def frames_decoded(self) -> int:
        """All frames through the decoder, context included (the next RoPE position)."""
        return self.state.frames[0]
