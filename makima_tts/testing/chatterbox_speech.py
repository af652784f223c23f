"""The speech encoder of the test Chatterbox-Turbo export: the reference package's own voice-cloning modules.

`ChatterboxTurboTTS.prepare_conditionals` (chatterbox-tts 0.1.7) turns a 24 kHz clip into the voice's
conditionals; the official export's `speech_encoder` graph does the same in one graph (audio_values ->
audio_features, audio_tokens, speaker_embeddings, speaker_features). `SpeechEncoder` composes the package's
modules (random weights, smaller: `voice_modules`) the same way, in torch ops the ONNX tracer takes:

* audio_features (T3's conditioning, 1 + prompt positions): the package's `VoiceEncoder` speaker embedding of
  the 16 kHz clip (silence trimmed at 20 dB as librosa.effects.trim, 40-bin power mel, 1.6 s partials every
  0.77 s (rate 1.3), LSTM, mean of the normalised partial embeddings) through T3's conditioning encoder
  (`t3.cond_enc`: speaker projection, then the speech embeddings of the prompt tokens), the prompt tokens being
  the package's `S3Tokenizer` tokens of the first 15 s (at most 375, `speech_cond_prompt_len`).
* audio_tokens: S3Tokenizer tokens of S3Gen's reference (the first 10 s), cut to half its mel frames, as
  S3Gen.embed_ref does.
* speaker_embeddings: the package's `CAMPPlus` x-vector of that reference (Kaldi fbank, 80 bins, mean removed).
* speaker_features: S3Gen's 80-bin log mel (24 kHz, hop 480) of that reference.

What differs from the package, and why:

* Resampling to 16 kHz: the package resamples S3Gen's reference with torchaudio's sinc resampler but the
  clip for T3 (voice encoder, prompt tokens) with librosa.resample (soxr), which no graph op reproduces; the
  graph resamples both with torchaudio's sinc kernel (as the official export's conversion script does).
  `Reference.conditionals(..., package_resampler=True)` shows the difference that makes.
* The STFTs and the FFT run as convolutions and matrix products (the same sums; float rounding only).
* Loudness normalisation (prepare_conditionals' pyloudnorm step, -27 LUFS) is Python outside any graph, as
  in the official export: the engine's create_voice_prompt normalises the clip before running the graph
  (makima_tts.engine.chatterbox.loudness_gain), and the reference runs prepare_conditionals with it.
"""
from __future__ import annotations

import contextlib
import math
import re

S3GEN_SR = 24000
S3_SR = 16000
ENC_COND_LEN = 15 * S3_SR           # ChatterboxTurboTTS.ENC_COND_LEN: the clip T3's prompt tokens come from
DEC_COND_LEN = 10 * S3GEN_SR        # ChatterboxTurboTTS.DEC_COND_LEN: S3Gen's reference
PROMPT_LEN = 375                    # T3Config.speech_cond_prompt_len as Turbo sets it


def voice_modules(seed: int, tiny: bool = True) -> dict:
    """The package's VoiceEncoder, S3Tokenizer and CAMPPlus with random weights; tiny: smaller widths (the
    LSTM 64 wide, the tokenizer one 128-wide block with two 64-dim heads (rotary needs 64), CAMPPlus growth 8)."""
    import librosa
    import torch
    from chatterbox.models.s3gen.xvector import CAMPPlus
    from chatterbox.models.s3tokenizer import S3Tokenizer
    from chatterbox.models.voice_encoder import VoiceEncoder
    from chatterbox.models.voice_encoder.config import VoiceEncConfig
    from s3tokenizer.model_v2 import ModelConfig, S3TokenizerV2

    torch.manual_seed(seed + 3)
    if not tiny:
        ve, tok, xv = VoiceEncoder(), S3Tokenizer("speech_tokenizer_v2_25hz"), CAMPPlus(memory_efficient=False)
    else:
        class TinyVoiceEncConfig(VoiceEncConfig):
            ve_hidden_size = 64

        ve = VoiceEncoder(TinyVoiceEncConfig())
        # S3Tokenizer.__init__ builds the full-size encoder whatever config it is given; this is its body with a
        # smaller config
        tok = S3Tokenizer.__new__(S3Tokenizer)
        cfg = ModelConfig(n_mels=128, n_audio_state=128, n_audio_head=2, n_audio_layer=1)
        S3TokenizerV2.__init__(tok, "speech_tokenizer_v2_25hz", cfg)
        tok.n_fft = 400
        tok.register_buffer("_mel_filters", torch.FloatTensor(librosa.filters.mel(sr=S3_SR, n_fft=400,
                                                                                  n_mels=cfg.n_mels)))
        tok.register_buffer("window", torch.hann_window(400))
        xv = CAMPPlus(feat_dim=80, embedding_size=192, growth_rate=8, bn_size=2, init_channels=32,
                      memory_efficient=False)
    with torch.no_grad():
        # random weights leave the 8 FSQ projections near 0 (every frame the same token); spread them over
        # the three levels so the tokens follow the audio
        tok.quantizer._codebook.project_down.weight.mul_(12.0)
    return {"ve": ve.eval(), "s3": tok.eval(), "campplus": xv.eval()}


def _mel_dft(n_fft: int, bins: int):
    """Real and imaginary DFT bases (n_fft, bins) in float64."""
    import torch

    ang = 2 * math.pi * torch.arange(n_fft, dtype=torch.float64)[:, None] * \
        torch.arange(bins, dtype=torch.float64)[None] / n_fft
    return torch.cos(ang), -torch.sin(ang)


def _stft_kernels(n_fft: int, window):
    """Conv1d kernels (bins, 1, n_fft): windowed DFT rows, real and imaginary."""
    cos, sin = _mel_dft(n_fft, n_fft // 2 + 1)
    w = window.double()[:, None]
    return (cos * w).T.float()[:, None].contiguous(), (sin * w).T.float()[:, None].contiguous()


def _modules():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Resample(nn.Module):
        """torchaudio.functional.resample(x, 24000, 16000) (sinc, Hann, width 6): its kernel, its steps."""

        def __init__(self):
            super().__init__()
            import torchaudio

            r = torchaudio.transforms.Resample(S3GEN_SR, S3_SR)
            self.width = r.width
            self.register_buffer("kernel", r.kernel.clone())
            self.orig, self.new = S3GEN_SR // r.gcd, S3_SR // r.gcd

        def forward(self, x):                     # (1, n) -> (1, ceil(n * 2 / 3))
            n = x.shape[1]
            y = F.conv1d(F.pad(x, (self.width, self.width + self.orig))[:, None], self.kernel, stride=self.orig)
            y = y.transpose(1, 2).reshape(1, -1)
            return y[:, :(self.new * n + self.orig - 1) // self.orig]

    class S3LogMel(nn.Module):
        """S3Tokenizer.log_mel_spectrogram: centred STFT (400, hop 160, reflect), power, 128 mels, log10,
        floored 8 below the peak, (x + 4) / 4; the last frame dropped as the package does."""

        def __init__(self, tok):
            super().__init__()
            re, im = _stft_kernels(400, tok.window)
            self.register_buffer("re", re)
            self.register_buffer("im", im)
            self.register_buffer("filters", tok._mel_filters.clone())

        def forward(self, x, max_frames: int = 0):
            xp = F.pad(x[:, None], (200, 200), mode="reflect")
            re, im = F.conv1d(xp, self.re, stride=160), F.conv1d(xp, self.im, stride=160)
            power = (re * re + im * im)[..., :-1]
            log = torch.clamp(torch.matmul(self.filters, power), min=1e-10).log10()
            log = torch.maximum(log, log.max() - 8.0)
            mel = (log + 4.0) / 4.0
            return mel[..., :max_frames] if max_frames else mel

    class VoiceMel(nn.Module):
        """VoiceEncoder.embeds_from_wavs' front end: librosa.effects.trim(top_db=20) (RMS of 2048-sample frames
        every 512, centred, zero padded), then melspectrogram (centred STFT 400 / hop 160 / reflect, power, 40
        mels 0-8 kHz), (frames, 40)."""

        def __init__(self, ve):
            super().__init__()
            import librosa

            hp = ve.hp
            re, im = _stft_kernels(hp.n_fft, torch.hann_window(hp.win_size))
            self.register_buffer("re", re)
            self.register_buffer("im", im)
            basis = librosa.filters.mel(sr=hp.sample_rate, n_fft=hp.n_fft, n_mels=hp.num_mels, fmin=hp.fmin,
                                        fmax=hp.fmax)
            self.register_buffer("basis", torch.from_numpy(basis).float())
            self.n_fft, self.hop = hp.n_fft, hp.hop_size

        def forward(self, x):
            y = x[0]
            n = y.shape[0]
            power = F.avg_pool1d(F.pad(y * y, (1024, 1024))[None, None], 2048, 512)[0, 0]
            rms = torch.sqrt(power)
            floor = torch.tensor(1e-10, dtype=y.dtype)
            db = 10.0 * torch.log10(torch.maximum(rms * rms, floor)) - \
                10.0 * torch.log10(torch.maximum(rms.max() * rms.max(), floor))
            loud = (db > -20.0).long()
            first = torch.argmax(loud)
            last = loud.shape[0] - 1 - torch.argmax(torch.flip(loud, [0]))
            end = torch.minimum((last + 1) * 512, torch.full_like(last, 0) + n)
            y = torch.index_select(y, 0, torch.arange(first * 512, end))
            yp = F.pad(y[None, None], (self.n_fft // 2, self.n_fft // 2), mode="reflect")
            re, im = F.conv1d(yp, self.re, stride=self.hop), F.conv1d(yp, self.im, stride=self.hop)
            mag = torch.sqrt(re * re + im * im)
            return torch.matmul(self.basis, mag * mag)[0].T

    class KaldiFbank(nn.Module):
        """torchaudio.compliance.kaldi.fbank(x, num_mel_bins=80) with its defaults (25 ms / 10 ms frames, snip
        edges, DC removed, pre-emphasis 0.97, Povey window, 512-point power spectrum, log), mean removed
        over time as CAMPPlus' extract_feature does: (1, frames, 80)."""

        def __init__(self):
            super().__init__()
            from torchaudio.compliance import kaldi

            self.register_buffer("window", kaldi._feature_window_function("povey", 400, 0.42, torch.device("cpu"),
                                                                          torch.float32))
            cos, sin = _mel_dft(512, 257)
            self.register_buffer("cos", cos.float())
            self.register_buffer("sin", sin.float())
            banks, _ = kaldi.get_mel_banks(80, 512, 16000.0, 20.0, 0.0, 100.0, -500.0, 1.0)
            self.register_buffer("banks", F.pad(banks.float(), (0, 1)).T.contiguous())
            self.register_buffer("eps", torch.tensor(torch.finfo(torch.float).eps))

        def forward(self, x):
            y = x[0]
            m = 1 + (y.shape[0] - 400) // 160
            frames = y[torch.arange(m)[:, None] * 160 + torch.arange(400)[None]]
            frames = frames - frames.mean(dim=1, keepdim=True)
            frames = frames - 0.97 * torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
            frames = F.pad(frames * self.window, (0, 112))
            re, im = torch.matmul(frames, self.cos), torch.matmul(frames, self.sin)
            mag = torch.sqrt(re * re + im * im)
            fb = torch.maximum(torch.matmul(mag * mag, self.banks), self.eps).log()
            return (fb - fb.mean(dim=0, keepdim=True))[None]

    class S3GenMel(nn.Module):
        """S3Gen's mel_spectrogram (24 kHz, STFT 1920 / hop 480, reflect padded by 720 each side, not centred,
        80 mels 0-8 kHz, log of the magnitude floored at 1e-5): (1, frames, 80)."""

        def __init__(self):
            super().__init__()
            from librosa.filters import mel as librosa_mel_fn

            re, im = _stft_kernels(1920, torch.hann_window(1920))
            basis = torch.from_numpy(librosa_mel_fn(sr=S3GEN_SR, n_fft=1920, n_mels=80, fmin=0, fmax=8000)).float()
            # the bins above 8 kHz have no mel weight: left out (the same sums, a third of the kernel)
            used = int(torch.nonzero(basis.abs().sum(dim=0)).max()) + 1
            self.register_buffer("re", re[:used].contiguous())
            self.register_buffer("im", im[:used].contiguous())
            self.register_buffer("basis", basis[:, :used].contiguous())

        def forward(self, x):
            xp = F.pad(x[:, None], (720, 720), mode="reflect")
            re, im = F.conv1d(xp, self.re, stride=480), F.conv1d(xp, self.im, stride=480)
            spec = torch.sqrt(re * re + im * im + 1e-9)
            return torch.log(torch.clamp(torch.matmul(self.basis, spec), min=1e-5)).transpose(1, 2)

    return Resample, S3LogMel, VoiceMel, KaldiFbank, S3GenMel


FRONT_ENDS = ("resample", "s3_mel", "voice_mel", "fbank", "s3gen_mel")
# the speech encoder's buffers that are constants of its construction, not weights (state_dict key prefixes)
DERIVED = tuple(f + "." for f in FRONT_ENDS) + ("rotary", "powers")
# the speech encoder's nodes a float16 variant keeps in float32: the signal front ends (their STFT power sums
# overflow float16) and the S3 tokenizer (its FSQ rounding turns float16 noise into other tokens); by the
# ONNX exporter's node names ("/module/Op", "/module_1/Op" for a second call)
FLOAT32_NODES = re.compile(r"^/(%s|conv1|conv2|blocks\.\d+|project_down)(_\d+)?/" % "|".join(FRONT_ENDS))


def speech_encoder(t3, voice: dict):
    """The speech_encoder graph's module: audio_values (1, samples) at 24 kHz -> (audio_features (1, 1 + p,
    hidden), audio_tokens (1, t), speaker_embeddings (1, 192), speaker_features (1, 2t, 80))."""
    import torch
    import torch.nn.functional as F
    from chatterbox.models.t3.modules.cond_enc import T3Cond
    from torch import nn

    Resample, S3LogMel, VoiceMel, KaldiFbank, S3GenMel = _modules()

    class SpeechEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.ve, self.s3, self.campplus = voice["ve"], voice["s3"], voice["campplus"]
            self.cond_enc, self.speech_emb = t3.cond_enc, t3.speech_emb
            self.resample = Resample()
            self.s3_mel = S3LogMel(self.s3)
            self.voice_mel = VoiceMel(self.ve)
            self.fbank = KaldiFbank()
            self.s3gen_mel = S3GenMel()
            freqs = torch.view_as_real(self.s3.encoder.freqs_cis)          # (positions, 64, [cos, sin])
            self.register_buffer("rotary", freqs.clone())
            self.register_buffer("powers", 3 ** torch.arange(8))

        def tokens(self, wav16, max_frames: int = 0):
            """S3Tokenizer.forward for one clip: log mel, AudioEncoderV2 (no padding: masks all ones), FSQ."""
            enc = self.s3.encoder
            x = F.gelu(enc.conv1(self.s3_mel(wav16, max_frames)))
            x = F.gelu(enc.conv2(x)).permute(0, 2, 1)
            t = x.shape[1]
            ones = torch.ones_like(x[:, :, :1])
            with _real_rotary():
                for block in enc.blocks:
                    x = block(x, None, ones, self.rotary[:t])
            cb = self.s3.quantizer._codebook
            h = torch.tanh(cb.project_down(x).float()) * 0.9990000128746033
            # the package sums the levels times powers of 3 in float (exact in float32); in integers here, so a
            # float16 graph gives the same index
            levels = torch.round(h).long() + 1
            return torch.sum(levels * self.powers, dim=-1)

        def voice_embedding(self, wav16):
            """VoiceEncoder.embeds_from_wavs([wav16], 16000) (rate 1.3, min coverage 0.8), one clip."""
            hp = self.ve.hp
            mel = self.voice_mel(wav16)                                    # (frames, 40)
            win = hp.ve_partial_frames
            step = int(round((hp.sample_rate / 1.3) / win))
            n_frames = mel.shape[0]
            over = torch.clamp(torch.full((), 0, dtype=torch.long) + n_frames - win + step, min=0)
            n = over // step
            rem = over - n * step
            min_rem = math.ceil(0.8 * win) - (win - step)                    # (rem + win - step) / win >= 0.8
            n = n + ((n == 0) | (rem >= min_rem)).long()
            mel = F.pad(mel, (0, 0, 0, win))
            partials = mel[torch.arange(n)[:, None] * step + torch.arange(win)[None]]
            embeds = self.ve(partials)
            mean = embeds.mean(dim=0, keepdim=True)
            return mean / torch.linalg.norm(mean, dim=1, keepdim=True)

        def forward(self, audio_values):
            wav16 = self.resample(audio_values)
            t3_tokens = self.tokens(wav16[:, :ENC_COND_LEN], max_frames=4 * PROMPT_LEN)
            cond = T3Cond(speaker_emb=self.voice_embedding(wav16), cond_prompt_speech_tokens=t3_tokens,
                          cond_prompt_speech_emb=self.speech_emb(t3_tokens))
            audio_features = self.cond_enc(cond)
            ref24 = audio_values[:, :DEC_COND_LEN]
            features = self.s3gen_mel(ref24)
            ref16 = self.resample(ref24)
            xvector = self.campplus(self.fbank(ref16))
            prompt = self.tokens(ref16)[:, :features.shape[1] // 2]
            return audio_features, prompt, xvector, features

    return SpeechEncoder().eval()


@contextlib.contextmanager
def _real_rotary():
    """s3tokenizer's rotary embedding with its (cos, sin) as a real (positions, 64, 2) tensor: the same numbers
    (view_as_real of the package's complex table), without the complex type the ONNX tracer cannot take."""
    import torch
    from s3tokenizer import model_v2

    def apply(xq, xk, freqs):
        cos = freqs[..., 0].unsqueeze(0).unsqueeze(2).to(xq.dtype)
        sin = freqs[..., 1].unsqueeze(0).unsqueeze(2).to(xq.dtype)
        d = xq.shape[-1]
        xq_r = torch.cat((-xq[..., d // 2:], xq[..., :d // 2]), dim=-1)
        d = xk.shape[-1]
        xk_r = torch.cat((-xk[..., d // 2:], xk[..., :d // 2]), dim=-1)
        return xq * cos + xq_r * sin, xk * cos + xk_r * sin

    saved = model_v2.apply_rotary_emb
    model_v2.apply_rotary_emb = lambda xq, xk, freqs_cis: apply(xq, xk, freqs_cis)
    try:
        yield
    finally:
        model_v2.apply_rotary_emb = saved
