"""The Qwen3-TTS talker and code predictor, in one readable file.

The talker is a Qwen3-style decoder (RMSNorm, GQA attention with q/k norms, RoPE,
SwiGLU) that reads text and codec embeddings and predicts codebook 0 of each 80 ms
frame. The code predictor is a small decoder of the same kind that, given the
talker's last hidden state and codebook 0, predicts codebooks 1..15 one by one.

Module and parameter names mirror the official checkpoint so that
`load_state_dict` takes the tensors of model.safetensors as they are.

Both use static KV caches: `prefill` writes positions [0, n), `step` writes one
position; nothing is allocated per token besides the small activations.

The talker's rotary embedding is "interleaved M-RoPE" with three position
streams (time, height, width). For speech every stream carries the same
position, so it reduces exactly to ordinary RoPE; that is what runs here.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch
import torch.nn.functional as F
from torch import nn


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
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class KVCache:
    """Keys and values for positions [0, max_len) of one layer: (batch, kv_heads, max_len, head_dim)."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


def rope_tables(head_dim: int, theta: float, max_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for positions [0, max_len): (max_len, head_dim), float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    freqs = torch.arange(max_len, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (b, heads, t, d); cos/sin: (t, d) already in x's dtype
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

        self.qkv_proj: nn.Module | None = None      # set by fuse()
        self.split = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim)

    def fuse(self) -> None:
        """One matrix-vector product for q, k and v instead of three (after the checkpoint is loaded)."""
        if self.qkv_proj is not None:
            return
        fused = nn.Linear(self.q_proj.in_features, sum(self.split), bias=False,
                          dtype=self.q_proj.weight.dtype, device=self.q_proj.weight.device)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]))
        self.qkv_proj = fused
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, start: int):
        b, t, _ = x.shape
        d = self.cfg.head_dim
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = self.q_norm(q.view(b, t, -1, d)).transpose(1, 2)
        k = self.k_norm(k.view(b, t, -1, d)).transpose(1, 2)
        v = v.view(b, t, -1, d).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_all, v_all = cache.write(start, k, v)
        out = F.scaled_dot_product_attention(q, k_all, v_all, is_causal=(t > 1 and start == 0),
                                             attn_mask=_prefix_causal_mask(t, start, x.device)
                                             if (t > 1 and start > 0) else None,
                                             enable_gqa=self.cfg.num_heads != self.cfg.num_kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


def _prefix_causal_mask(t: int, start: int, device) -> torch.Tensor:
    """Boolean mask for t new queries at positions [start, start+t) over keys [0, start+t)."""
    q_pos = torch.arange(start, start + t, device=device)[:, None]
    k_pos = torch.arange(start + t, device=device)[None, :]
    return k_pos <= q_pos


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up_proj: nn.Module | None = None  # set by fuse()

    def fuse(self) -> None:
        """gate and up as one matrix (after the checkpoint is loaded)."""
        if self.gate_up_proj is not None:
            return
        g = self.gate_proj
        fused = nn.Linear(g.in_features, 2 * g.out_features, bias=False, dtype=g.weight.dtype, device=g.weight.device)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([g.weight, self.up_proj.weight]))
        self.gate_up_proj = fused
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache: KVCache, start: int):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class Cache:
    """The per-utterance state of one decoder: a KVCache per layer and RoPE tables for max_len positions.

    Kept outside the modules so several utterances can run on one model at once.
    """

    def __init__(self, decoder: "Decoder", batch: int, max_len: int):
        cfg, p = decoder.cfg, decoder.norm.weight
        self.layers = [KVCache(batch, cfg.num_kv_heads, max_len, cfg.head_dim, p.dtype, p.device)
                       for _ in range(cfg.num_layers)]
        cos, sin = rope_tables(cfg.head_dim, cfg.rope_theta, max_len, p.device)
        self.cos, self.sin = cos.to(p.dtype), sin.to(p.dtype)
        self.max_len = max_len


class Decoder(nn.Module):
    """Layers + final norm over input embeddings."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def fuse(self) -> None:
        """Fuse q/k/v and gate/up in every layer (parameter names then no longer match the checkpoint)."""
        for layer in self.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()

    def new_cache(self, batch: int, max_len: int) -> Cache:
        return Cache(self, batch, max_len)

    def forward(self, x: torch.Tensor, start: int, cache: Cache) -> torch.Tensor:
        """x: (b, t, hidden) embeddings for positions [start, start+t) -> normed hidden states."""
        t = x.shape[1]
        if start + t > cache.max_len:
            raise RuntimeError(f"sequence of {start + t} positions exceeds the cache of {cache.max_len}")
        cos, sin = cache.cos[start:start + t], cache.sin[start:start + t]
        for layer, kv in zip(self.layers, cache.layers):
            x = layer(x, cos, sin, kv, start)
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

    def logits(self, embeds: torch.Tensor, start: int, group: int, cache: Cache) -> torch.Tensor:
        """embeds (b, t, talker_hidden) at positions [start, start+t) -> logits of codebook `group` (b, vocab)."""
        h = self.model(self.small_to_mtp_projection(embeds), start, cache)
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

    def fuse(self) -> "Talker":
        """Fused q/k/v and gate/up projections in the talker and the code predictor (call after loading)."""
        self.model.fuse()
        self.code_predictor.model.fuse()
        return self

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        """Text token ids (b, t) -> projected text embeddings (b, t, hidden)."""
        return self.text_projection(self.model.text_embedding(ids))

    def embed_codec(self, ids: torch.Tensor) -> torch.Tensor:
        """Codebook-0 / control ids (b, t) -> (b, t, hidden)."""
        return self.model.codec_embedding(ids)

    def embed_frame(self, codes: torch.Tensor) -> torch.Tensor:
        """Full frames (b, t, G) -> the sum of their G codebook embeddings (b, t, hidden)."""
        parts = [self.model.codec_embedding(codes[..., 0])]
        parts += [self.code_predictor.model.codec_embedding[g - 1](codes[..., g]) for g in range(1, codes.shape[-1])]
        return torch.stack(parts, dim=-2).sum(-2)

    def forward(self, embeds: torch.Tensor, start: int, cache: Cache) -> tuple[torch.Tensor, torch.Tensor]:
        """embeds (b, t, hidden) at [start, start+t) -> (logits of the last position (b, vocab), last hidden (b, 1, hidden))."""
        h = self.model(embeds, start, cache)
        last = h[:, -1:]
        return self.codec_head(last[:, 0]), last
