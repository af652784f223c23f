"""The Qwen3-TTS talker and code predictor, in one readable file.

The talker is a Qwen3-style decoder (RMSNorm, GQA attention with q/k norms, RoPE,
SwiGLU) that reads text and codec embeddings and predicts codebook 0 of each 80 ms
frame. The code predictor is a small decoder of the same kind that, given the
talker's last hidden state and codebook 0, predicts codebooks 1..15 one by one.

Module and parameter names mirror the official checkpoint, except that q/k/v and
gate/up are fused into one projection each (`checkpoint_names` maps them back; the
loader in weights.py stacks the parts as it reads them).

Batch-first, gpt-fast style: every forward pass takes embeddings (b, t, hidden), their
positions (b, t) as a tensor, and the cache rows it writes. The KV cache is written by
index, so a prefill (one row, t positions), a frame step of many streams (b rows, each at
its own position) and joiners' prefills padded to one length are the same forward pass.

The talker's rotary embedding is "interleaved M-RoPE" with three position
streams (time, height, width). For speech every stream carries the same
position, so it reduces exactly to ordinary RoPE; that is what runs here.
"""
from __future__ import annotations

import math
import mmap
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .layers import apply_rope, rms_norm, rope_tables


@dataclass(frozen=True)
class DecoderConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float

    @classmethod
    def from_dict(cls, d: dict) -> "DecoderConfig":
        heads = d["num_attention_heads"]
        return cls(
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rope_theta=float(d.get("rope_theta", 10000.0)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        )


class RMSNorm(nn.Module):
    """`kernel`: a fused float32 implementation (x, weight, eps) -> y, set on int8 models by
    `quant.use_kernel_ops` (one C++ call in place of torch's seven small ops per norm)."""

    kernel: Optional[Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = None

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None and x.dtype == torch.float32:
            return self.kernel(x, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)


def zeros_on_demand(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """A zero tensor whose memory is only taken as it is written: on the CPU, a fresh anonymous mapping
    (the kernel hands out zeroed pages at their first touch). A KV cache is reserved for more positions
    than its rows have reached; zeroing all of it up front cost 0.15-0.23 s before a burst of 8 streams
    could prefill (256 positions x 8 rows: 470 MB at full size), and the rows' pages are touched anyway
    as they are written. Elsewhere (or if the mapping fails) torch.zeros."""
    numel = math.prod(shape)
    if torch.device(device).type == "cpu" and numel:
        try:
            region = mmap.mmap(-1, numel * dtype.itemsize)
        except (OSError, ValueError):
            pass
        else:
            return torch.frombuffer(region, dtype=dtype).view(shape)    # the tensor keeps the mapping alive
    return torch.zeros(shape, dtype=dtype, device=device)


class KVCache:
    """Keys and values of one layer for `rows` sequences: (rows, kv_heads, length, head_dim).

    Written by index: row r's keys for positions p land at [r, :, p], so rows at different
    positions (streams of a batch) and many positions at once (a prefill) go through the same
    `update`. What a row has not written yet is never read: attention masks keys beyond each
    query's own position."""

    def __init__(self, rows: int, kv_heads: int, length: int, head_dim: int, dtype, device):
        shape = (rows, kv_heads, length, head_dim)
        self.k = zeros_on_demand(shape, dtype, device)
        self.v = zeros_on_demand(shape, dtype, device)

    def update(self, rows: slice, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               top: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (b, kv_heads, t, d) of rows `rows` at positions (b, t) -> the keys/values [0, top) of those rows."""
        kc, vc = self.k[rows], self.v[rows]
        b, t = positions.shape
        if t == 1:
            r = torch.arange(b, device=k.device)
            kc[r, :, positions[:, 0]] = k[:, :, 0]
            vc[r, :, positions[:, 0]] = v[:, :, 0]
        else:
            r = torch.arange(b, device=k.device)[:, None]
            kc[r, :, positions] = k.transpose(1, 2)
            vc[r, :, positions] = v.transpose(1, 2)
        return kc[:, :, :top], vc[:, :, :top]

    def resize(self, rows: int, length: int) -> None:
        old_rows, old_len = self.k.shape[0], self.k.shape[2]
        shape = (rows, self.k.shape[1], length, self.k.shape[3])
        for name in ("k", "v"):
            old = getattr(self, name)
            fresh = zeros_on_demand(shape, old.dtype, old.device)
            r, n = min(rows, old_rows), min(length, old_len)
            fresh[:r, :, :n] = old[:r, :, :n]
            setattr(self, name, fresh)

    def move(self, src: int, dst: int, length: int) -> None:
        """Row `src`'s first `length` positions into row `dst` (a leaving row's slot is refilled)."""
        self.k[dst, :, :length] = self.k[src, :, :length]
        self.v[dst, :, :length] = self.v[src, :, :length]


@dataclass
class Step:
    """Where one forward pass writes and what it may read, shared by every layer.

    rows: the cache rows of the batch (contiguous); positions (b, t): each token's position;
    cos/sin (b, 1, t, head_dim); mask (b, 1, t, top): key j is visible to a query at position p
    when j <= p (None: every key [0, top) is visible to every query); top: keys [0, top) are read;
    lengths (b,): each row's keys [0, position + 1) of its last token (what one query per row sees)."""

    rows: slice
    positions: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    mask: Optional[torch.Tensor]
    top: int
    lengths: torch.Tensor


class Attention(nn.Module):
    """GQA attention with q/k norms and RoPE; q, k, v are one fused projection (see `fuse_checkpoint`).

    `kernel`: one float32 op doing the q/k norms, RoPE and the cache write (the C++ extension's
    qk_rope_cache, set on int8 models by `quant.use_kernel_ops`); `attend`: the attention of one query
    per row over its cached keys (decode_attention), used with it for decode steps."""

    kernel: Optional[Callable[..., torch.Tensor]] = None
    attend: Optional[Callable[..., torch.Tensor]] = None

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.split = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim)
        self.qkv_proj = nn.Linear(cfg.hidden_size, sum(self.split), bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, step: Step, cache: KVCache) -> torch.Tensor:
        b, t, _ = x.shape
        d = self.cfg.head_dim
        if self.kernel is not None and x.dtype == torch.float32:
            q = self.kernel(self.qkv_proj(x), self.q_norm.weight, self.k_norm.weight, self.q_norm.eps, step.cos,
                            step.sin, step.positions, cache.k, cache.v, step.rows.start, self.cfg.num_heads,
                            self.cfg.num_kv_heads)
            if t == 1 and self.attend is not None:        # a decode step: one query per row
                return self.o_proj(self.attend(q, cache.k, cache.v, step.rows.start, step.lengths))
            k_all, v_all = cache.k[step.rows, :, :step.top], cache.v[step.rows, :, :step.top]
        else:
            q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
            q = self.q_norm(q.view(b, t, -1, d)).transpose(1, 2)
            k = self.k_norm(k.view(b, t, -1, d)).transpose(1, 2)
            v = v.view(b, t, -1, d).transpose(1, 2)
            q, k = apply_rope(q, step.cos, step.sin), apply_rope(k, step.cos, step.sin)
            k_all, v_all = cache.update(step.rows, step.positions, k, v, step.top)
        out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=step.mask,
                                             enable_gqa=self.cfg.num_heads != self.cfg.num_kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    """SwiGLU; gate and up are one fused projection (see `fuse_checkpoint`). `kernel`: silu(gate) * up in
    one float32 op (the extension's silu_mul, set on int8 models by `quant.use_kernel_ops`)."""

    kernel: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate_up_proj(x)
        if self.kernel is not None and h.dtype == torch.float32:
            return self.down_proj(self.kernel(h))
        gate, up = h.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, step: Step, cache: KVCache) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), step, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Cache:
    """The state of one decoder for a batch of rows: a KVCache per layer and RoPE tables.

    Kept outside the modules so that several batches (or utterances) can share one model.
    `reserve` grows rows and length on demand (existing rows keep their keys)."""

    def __init__(self, decoder: "Decoder", rows: int, length: int):
        self.cfg = decoder.cfg
        p = decoder.norm.weight
        self.dtype, self.device = p.dtype, p.device
        self.rows = self.length = 0
        self.layers: list[KVCache] = []
        self.cos = self.sin = torch.empty(0)
        self.reserve(rows, length)

    def reserve(self, rows: int, length: int) -> None:
        if rows <= self.rows and length <= self.length:
            return
        cfg = self.cfg
        new_rows = max(rows, self.rows)
        new_len = self.length
        if length > self.length:
            new_len = -(-max(length, int(self.length * 1.5)) // 64) * 64
            cos, sin = rope_tables(cfg.head_dim, cfg.rope_theta, 0, new_len, self.device)
            self.cos, self.sin = cos.to(self.dtype), sin.to(self.dtype)
        if not self.layers:
            self.layers = [KVCache(new_rows, cfg.num_kv_heads, new_len, cfg.head_dim, self.dtype, self.device)
                           for _ in range(cfg.num_layers)]
        else:
            for kv in self.layers:
                kv.resize(new_rows, new_len)
        self.rows, self.length = new_rows, new_len

    def move(self, src: int, dst: int, length: int) -> None:
        for kv in self.layers:
            kv.move(src, dst, length)

    def write_prefix(self, row: int, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keys and values computed elsewhere (kv_heads, n, head_dim per layer) into row `row`'s first n positions."""
        for kv, (k, v) in zip(self.layers, layers):
            n = k.shape[1]
            kv.k[row, :, :n] = k
            kv.v[row, :, :n] = v

    def step(self, rows: slice, positions: torch.Tensor) -> Step:
        """The per-pass tables for rows `rows` writing `positions` (b, t) (grows the cache as needed)."""
        top = int(positions.max()) + 1
        self.reserve(rows.stop, top)
        b, t = positions.shape
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        mask: Optional[torch.Tensor] = None
        if t > 1 or (b > 1 and not bool((positions == top - 1).all())):
            keys = torch.arange(top, device=positions.device)
            mask = (keys[None, None, :] <= positions[:, :, None]).unsqueeze(1)
        # else one position per row, every row's the last: all of [0, top) is visible, no mask (the same
        # attention without converting a mask in every layer: a lone stream's steps, the code predictor's)
        return Step(rows=rows, positions=positions, cos=cos, sin=sin, mask=mask, top=top, lengths=positions[:, -1] + 1)


class FusedStep(Protocol):
    """Every layer of a decode step (one new position per row, float32, at most `max_rows` rows) in one
    call: (x, step, cache) -> x."""

    max_rows: int

    def __call__(self, x: torch.Tensor, step: Step, cache: "Cache") -> torch.Tensor: ...


class Decoder(nn.Module):
    """Layers + final norm over input embeddings.

    `fused_step`: a decode step's layers in one call (the extension's decode_layers, set on int8 models
    by `quant.use_kernel_ops`; see FusedStep)."""

    fused_step: Optional[FusedStep] = None

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def new_cache(self, rows: int, length: int) -> Cache:
        return Cache(self, rows, length)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: Cache,
                rows: Optional[slice] = None) -> torch.Tensor:
        """x (b, t, hidden) embeddings at positions (b, t), written to cache rows `rows` (default
        [0, b)) -> normed hidden states (b, t, hidden)."""
        rows = rows if rows is not None else slice(0, x.shape[0])
        step = cache.step(rows, positions)
        fused = self.fused_step
        if fused is not None and x.shape[1] == 1 and x.shape[0] <= fused.max_rows and x.dtype == torch.float32:
            return self.norm(fused(x, step, cache))
        for layer, kv in zip(self.layers, cache.layers):
            x = layer(x, step, kv)
        return self.norm(x)


class TalkerModel(Decoder):
    def __init__(self, cfg: DecoderConfig, vocab_size: int, text_vocab_size: int, text_hidden_size: int):
        super().__init__(cfg)
        self.codec_embedding = nn.Embedding(vocab_size, cfg.hidden_size)
        self.text_embedding = nn.Embedding(text_vocab_size, text_hidden_size)


class TextProjection(nn.Module):
    def __init__(self, text_hidden: int, hidden: int):
        super().__init__()
        self.linear_fc1 = nn.Linear(text_hidden, text_hidden, bias=True)
        self.linear_fc2 = nn.Linear(text_hidden, hidden, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.silu(self.linear_fc1(x)))


class CodePredictorModel(Decoder):
    def __init__(self, cfg: DecoderConfig, num_groups: int, vocab_size: int, embedding_dim: int):
        super().__init__(cfg)
        self.codec_embedding = nn.ModuleList([nn.Embedding(vocab_size, embedding_dim) for _ in range(num_groups - 1)])


class CodePredictor(nn.Module):
    """Predicts codebooks 1..G-1 of a frame from the talker's hidden state and codebook 0."""

    def __init__(self, cfg: DecoderConfig, num_groups: int, vocab_size: int, talker_hidden: int):
        super().__init__()
        self.num_groups = num_groups
        self.model = CodePredictorModel(cfg, num_groups, vocab_size, talker_hidden)
        self.lm_head = nn.ModuleList([nn.Linear(cfg.hidden_size, vocab_size, bias=False)
                                      for _ in range(num_groups - 1)])
        self.small_to_mtp_projection = (nn.Linear(talker_hidden, cfg.hidden_size, bias=True)
                                        if cfg.hidden_size != talker_hidden else nn.Identity())

    def logits(self, embeds: torch.Tensor, positions: torch.Tensor, group: int, cache: Cache) -> torch.Tensor:
        """embeds (b, t, talker_hidden) at positions (b, t) -> logits of codebook `group` (b, vocab)."""
        h = self.model(self.small_to_mtp_projection(embeds), positions, cache)
        return self.lm_head[group - 1](h[:, -1])


class Talker(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        tc = config["talker_config"]
        cc = tc["code_predictor_config"]
        self.config = tc
        self.num_groups = int(tc["num_code_groups"])
        cfg = DecoderConfig.from_dict(tc)
        self.model = TalkerModel(cfg, tc["vocab_size"], tc["text_vocab_size"], tc["text_hidden_size"])
        self.text_projection = TextProjection(tc["text_hidden_size"], cfg.hidden_size)
        self.codec_head = nn.Linear(cfg.hidden_size, tc["vocab_size"], bias=False)
        self.code_predictor = CodePredictor(DecoderConfig.from_dict(cc), self.num_groups, cc["vocab_size"],
                                            cfg.hidden_size)
        self._fixed_text: dict[tuple[int, ...], torch.Tensor] = {}          # see embed_fixed_text

    @property
    def hidden_size(self) -> int:
        return self.model.cfg.hidden_size

    @property
    def device(self) -> torch.device:
        return self.model.codec_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (embeddings and norms stay in it when the linear layers are int8)."""
        return self.model.codec_embedding.weight.dtype

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        """Text token ids (b, t) -> projected text embeddings (b, t, hidden)."""
        return self.text_projection(self.model.text_embedding(ids).to(self.dtype))

    def embed_fixed_text(self, ids: tuple[int, ...]) -> torch.Tensor:
        """`embed_text` of a token sequence every prompt holds (the special tokens, the role's tokens)
        (1, t, hidden), computed once: each projection reads the text MLP's 24 MB of weights, a third of
        a prompt's set-up. The same call as the first, so the same values."""
        got = self._fixed_text.get(ids)
        if got is None:
            got = self._fixed_text[ids] = self.embed_text(torch.tensor([ids], dtype=torch.long, device=self.device))
        return got

    def embed_codec(self, ids: torch.Tensor) -> torch.Tensor:
        """Codebook-0 / control ids (b, t) -> (b, t, hidden)."""
        return self.model.codec_embedding(ids)

    def embed_frame(self, codes: torch.Tensor) -> torch.Tensor:
        """Full frames (b, t, G) -> the sum of their G codebook embeddings (b, t, hidden)."""
        parts = [self.model.codec_embedding(codes[..., 0])]
        parts += [self.code_predictor.model.codec_embedding[g - 1](codes[..., g]) for g in range(1, codes.shape[-1])]
        return torch.stack(parts, dim=-2).sum(-2)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, cache: Cache, rows: Optional[slice] = None,
                last: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """embeds (b, t, hidden) at positions (b, t) -> (logits (b, vocab), hidden (b, 1, hidden)) of each
        row's last real token: index `last` (b,) when rows are padded to a common length, else t - 1."""
        h = self.model(embeds, positions, cache, rows)
        if last is None:
            h = h[:, -1:]
        else:
            h = h[torch.arange(h.shape[0], device=h.device), last].unsqueeze(1)
        return self.codec_head(h[:, 0]), h


FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def checkpoint_names(name: str) -> tuple[str, ...]:
    """The official checkpoint's tensor names behind one of our parameters: a fused projection's
    weight is its parts' weights stacked along the outputs (q, k, v and gate, up)."""
    for fused, parts in FUSED.items():
        if f".{fused}." in name:
            return tuple(name.replace(f".{fused}.", f".{p}.") for p in parts)
    return (name,)
