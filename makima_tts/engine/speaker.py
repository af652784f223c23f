"""Speaker embedding of Qwen3-TTS: an ECAPA-TDNN over a 128-bin log-mel spectrogram.

    wav (24 kHz) -> log-mel (T, 128) [n_fft 1024, hop 256, Hann 1024, 0-12 kHz, Slaney mel]
    -> TDNN -> 3 x SE-Res2Net blocks -> multi-layer aggregation -> attentive statistics pooling
    -> 1x1 conv -> embedding (D,) with D the talker's hidden size

Weights are `speaker_encoder.*` in the checkpoint's model.safetensors; the geometry is
`speaker_encoder_config` in its config.json. The mel filterbank is computed here (no librosa).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CheckpointError
from .weights import Weights, read_json, read_safetensors

Tensor = torch.Tensor

SAMPLE_RATE = 24000
N_FFT, HOP, WIN, N_MELS, F_MIN, F_MAX = 1024, 256, 1024, 128, 0.0, 12000.0
PREFIX = "speaker_encoder."


# --------------------------------------------------------------------------------------------
# Mel front end
# --------------------------------------------------------------------------------------------

# Slaney's mel scale: linear below 1 kHz (200/3 Hz per mel), logarithmic above (27 mels per x6.4).
_F_SP = 200.0 / 3
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = np.log(6.4) / 27.0


def hz_to_mel(f: np.ndarray) -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    return np.where(f >= _MIN_LOG_HZ, _MIN_LOG_MEL + np.log(np.maximum(f, 1e-10) / _MIN_LOG_HZ) / _LOGSTEP,
                    f / _F_SP)


def mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    return np.where(m >= _MIN_LOG_MEL, _MIN_LOG_HZ * np.exp(_LOGSTEP * (m - _MIN_LOG_MEL)), _F_SP * m)


@lru_cache(maxsize=8)
def mel_filterbank(sr: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS, fmin: float = F_MIN,
                   fmax: float = F_MAX) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) float32 triangular filters on the Slaney mel scale, each scaled to
    unit area ("slaney" normalisation) -- the same filters as librosa.filters.mel's defaults."""
    fft_hz = np.linspace(0.0, sr / 2, n_fft // 2 + 1)                              # (F,)
    edges_hz = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))  # (M + 2,)
    widths = np.diff(edges_hz)                                                      # (M + 1,)
    offsets = edges_hz[:, None] - fft_hz[None, :]                                   # (M + 2, F)
    rising = -offsets[:-2] / widths[:-1, None]                                      # (M, F)
    falling = offsets[2:] / widths[1:, None]
    filters = np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)
    filters *= (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]
    return filters


def log_mel(wav: Tensor) -> Tensor:
    """wav (B, S) at 24 kHz -> log-mel (B, 128, frames), frames = S // 256 (reflect-padded STFT)."""
    basis = torch.from_numpy(mel_filterbank()).to(wav.device, wav.dtype)            # (M, F)
    window = torch.hann_window(WIN, device=wav.device, dtype=wav.dtype)
    pad = (N_FFT - HOP) // 2
    wav = F.pad(wav[:, None], (pad, pad), mode="reflect")[:, 0]
    spec = torch.stft(wav, N_FFT, hop_length=HOP, win_length=WIN, window=window, center=False,
                      normalized=False, onesided=True, return_complex=True)          # (B, F, frames)
    magnitude = torch.sqrt(torch.view_as_real(spec).pow(2).sum(-1) + 1e-9)
    return torch.log(torch.clamp(basis @ magnitude, min=1e-5))


# --------------------------------------------------------------------------------------------
# ECAPA-TDNN
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SpeakerConfig:
    mel_dim: int = 128
    enc_dim: int = 1024
    enc_channels: tuple[int, ...] = (512, 512, 512, 512, 1536)
    enc_kernel_sizes: tuple[int, ...] = (5, 3, 3, 3, 1)
    enc_dilations: tuple[int, ...] = (1, 2, 3, 4, 1)
    enc_attention_channels: int = 128
    enc_res2net_scale: int = 8
    enc_se_channels: int = 128
    sample_rate: int = 24000

    @classmethod
    def from_dict(cls, d: Mapping) -> "SpeakerConfig":
        kw = {}
        for name, default in cls.__dataclass_fields__.items():
            if name in d:
                v = d[name]
                kw[name] = tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else int(v)
        cfg = cls(**kw)
        n = len(cfg.enc_channels)
        if len(cfg.enc_kernel_sizes) != n or len(cfg.enc_dilations) != n:
            raise ValueError("enc_channels, enc_kernel_sizes and enc_dilations differ in length")
        return cfg


class _TDNN:
    """relu(conv1d) with 'same' reflect padding."""

    def __init__(self, w: Weights, dilation: int = 1):
        self.weight, self.bias = w["conv.weight"], w["conv.bias"]                    # (C_out, C_in, K)
        self.dilation = dilation
        total = (self.weight.shape[-1] - 1) * dilation
        self.pad = (total // 2, total - total // 2)

    def __call__(self, x: Tensor) -> Tensor:
        return F.relu(_conv_same(x, self.weight, self.bias, self.pad, self.dilation))


def _conv_same(x: Tensor, weight: Tensor, bias: Optional[Tensor], pad: tuple[int, int], dilation: int = 1) -> Tensor:
    if pad != (0, 0):
        x = F.pad(x, pad, mode="reflect")
    return F.conv1d(x, weight, bias, dilation=dilation)


class _SERes2NetBlock:
    """x + SE(tdnn2(res2net(tdnn1(x)))): Res2Net splits channels into `scale` groups, each group
    (after the first) convolved together with the previous group's output."""

    def __init__(self, w: Weights, scale: int, dilation: int):
        self.tdnn1, self.tdnn2 = _TDNN(w.sub("tdnn1.")), _TDNN(w.sub("tdnn2."))
        self.res2 = [_TDNN(w.sub(f"res2net_block.blocks.{i}."), dilation) for i in range(scale - 1)]
        self.scale = scale
        self.se1 = (w["se_block.conv1.weight"], w["se_block.conv1.bias"])
        self.se2 = (w["se_block.conv2.weight"], w["se_block.conv2.bias"])

    def __call__(self, x: Tensor) -> Tensor:                                         # (B, C, T)
        h = self.tdnn1(x)
        parts = list(torch.chunk(h, self.scale, dim=1))
        out = [parts[0]]
        for i in range(1, self.scale):
            out.append(self.res2[i - 1](parts[i] if i == 1 else parts[i] + out[-1]))
        h = self.tdnn2(torch.cat(out, dim=1))
        gate = F.relu(F.conv1d(h.mean(dim=2, keepdim=True), *self.se1))              # (B, se, 1)
        gate = torch.sigmoid(F.conv1d(gate, *self.se2))                              # (B, C, 1)
        return h * gate + x


def _weighted_stats(x: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and std over time of x (B, C, T) under weights (B, C or 1, T) summing to 1."""
    mean = (weights * x).sum(dim=2)
    var = (weights * (x - mean[..., None]).pow(2)).sum(dim=2)
    return mean, torch.sqrt(var.clamp(min=1e-12))


class SpeakerEncoder:
    """ECAPA-TDNN speaker encoder. `embed(wav)` -> (enc_dim,) tensor."""

    def __init__(self, w: Weights, cfg: SpeakerConfig):
        self.cfg = cfg
        ch, ks, dil = cfg.enc_channels, cfg.enc_kernel_sizes, cfg.enc_dilations
        w.get("blocks.0.conv.weight", (ch[0], cfg.mel_dim, ks[0]))
        self.first = _TDNN(w.sub("blocks.0."), dil[0])
        self.blocks = [_SERes2NetBlock(w.sub(f"blocks.{i}."), cfg.enc_res2net_scale, dil[i])
                       for i in range(1, len(ch) - 1)]
        self.mfa = _TDNN(w.sub("mfa."), dil[-1])
        self.asp_tdnn = _TDNN(w.sub("asp.tdnn."))
        self.asp_conv = (w["asp.conv.weight"], w["asp.conv.bias"])
        self.fc = (w.get("fc.weight", (cfg.enc_dim, 2 * ch[-1], 1)), w["fc.bias"])
        self.dtype, self.device = self.fc[0].dtype, self.fc[0].device

    @classmethod
    def load(cls, checkpoint: Union[str, Path, Mapping[str, Tensor]], config: Optional[Mapping] = None,
             device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32) -> "SpeakerEncoder":
        """From a checkpoint folder (reads config.json and model.safetensors) or from a dict of
        tensors already loaded (names with or without the `speaker_encoder.` prefix); `config` is
        the `speaker_encoder_config` dict, read from the folder's config.json when not given."""
        if isinstance(checkpoint, (str, Path)):
            folder = Path(checkpoint)
            if config is None:
                config = read_json(folder / "config.json").get("speaker_encoder_config")
                if config is None:
                    raise CheckpointError(f"{folder / 'config.json'}: no speaker_encoder_config")
            tensors: Mapping[str, Tensor] = read_safetensors(folder / "model.safetensors", prefix=PREFIX)
            source = str(folder / "model.safetensors")
        else:
            tensors, source = checkpoint, "model.safetensors (state dict)"
        if config is None:
            raise CheckpointError("speaker encoder: no speaker_encoder_config given")
        try:
            cfg = SpeakerConfig.from_dict(config)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"speaker_encoder_config is malformed ({e})") from None
        prefix = PREFIX if any(k.startswith(PREFIX) for k in tensors) else ""
        selected = {k: v.to(device=device, dtype=dtype) for k, v in tensors.items() if k.startswith(prefix)}
        return cls(Weights(selected, source, prefix), cfg)

    def forward(self, mel: Tensor) -> Tensor:
        """mel (B, 128, T) -> embeddings (B, enc_dim)."""
        x = self.first(mel)
        outs = []
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        x = self.mfa(torch.cat(outs, dim=1))                                          # (B, C, T)
        t = x.shape[-1]
        uniform = torch.full((1, 1, t), 1.0, dtype=x.dtype, device=x.device) / t
        mean, std = _weighted_stats(x, uniform)
        context = torch.cat([x, mean[..., None].expand(-1, -1, t), std[..., None].expand(-1, -1, t)], dim=1)
        scores = F.conv1d(torch.tanh(self.asp_tdnn(context)), *self.asp_conv)        # (B, C, T)
        mean, std = _weighted_stats(x, torch.softmax(scores, dim=2))
        pooled = torch.cat([mean, std], dim=1)[..., None]                              # (B, 2C, 1)
        return F.conv1d(pooled, *self.fc)[..., 0]

    @torch.inference_mode()
    def embed(self, wav: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Tensor:
        """Mono float32 audio at 24 kHz -> speaker embedding (enc_dim,) in the encoder's dtype."""
        if sample_rate != SAMPLE_RATE:
            raise ValueError(f"the speaker encoder needs {SAMPLE_RATE} Hz audio, got {sample_rate} Hz")
        wav = np.asarray(wav)
        if wav.ndim != 1:
            raise ValueError(f"embed expects a 1-D mono waveform, got shape {wav.shape}")
        if wav.shape[0] < N_FFT:
            raise ValueError(f"audio too short for a speaker embedding ({wav.shape[0]} samples)")
        x = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))[None]
        mel = log_mel(x).to(self.device, self.dtype)
        return self.forward(mel)[0]
