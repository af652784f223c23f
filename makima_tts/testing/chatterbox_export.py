"""Build a Chatterbox-Turbo export with random weights in the layout of ResembleAI/chatterbox-turbo-ONNX.

Tests (tiny) and benchmarks (the real language model's geometry) use this:
`python -m makima_tts.testing.chatterbox_export OUT [--full] [--dtypes fp32,q4]`.

What is real and what stands in:

* The language model is the reference package `chatterbox-tts`'s Turbo T3 (its GPT-2 backbone, text and
  speech embeddings, speech head and conditioning encoder), built with random weights and exported as
  the official export's graphs are called: `embed_tokens` (input_ids -> inputs_embeds) and
  `language_model` (inputs_embeds, attention_mask, position_ids, past_key_values.N.key/value ->
  logits, present.N.key/value), with the input and output names and shapes of the model card's example.
  `reference_tokens()` runs the package's own `T3.inference_turbo` on the same weights.
* The conditional decoder is the package's S3Gen: its meanflow token-to-mel flow (conformer encoder with a
  3-token lookahead, causal flow-matching estimator, 2 steps) and its HiFT vocoder, as the official graph is
  called (speech_tokens = the voice's prompt tokens then the new ones, speaker_embeddings, speaker_features
  -> the new tokens' waveform, 960 samples per token at 24 kHz, the first 40 ms faded in). Tiny: one block
  of each, width 64 (the package's module classes with smaller arguments); --full: S3Token2Wav's own
  geometry. Its random draws (the flow's starting noise, HiFT's source phases and noise) are zeros here
  (`no_noise`), in the export and in `Reference.decode` (the package's own S3Token2Wav.inference), so the two
  compare sample by sample. For the tracer, HiFT's STFT and inverse STFT run as convolutions (same numbers to
  1e-6) and the padding masks are sized by the traced lengths.
* The speech encoder is the package's own voice cloning (`chatterbox_speech`): what
  `ChatterboxTurboTTS.prepare_conditionals` computes from a clip, in one graph as the official one is called
  (audio_values -> audio_features, audio_tokens, speaker_embeddings, speaker_features): T3's conditioning
  (the `VoiceEncoder` speaker embedding through T3's conditioning encoder, then the speech embeddings of the
  `S3Tokenizer` prompt tokens of the first 15 s), S3Gen's reference (S3Tokenizer tokens, the `CAMPPlus`
  x-vector and the 80-bin mel of the first 10 s). Random weights, tiny: the LSTM 64 wide, one tokenizer block,
  CAMPPlus growth 8; --full: the package's sizes. The 16 kHz resampling is torchaudio's sinc resampler
  throughout (the package uses soxr for T3's clip; see chatterbox_speech). `Reference.conditionals()` runs the
  package's own prepare_conditionals on the same weights (with its loudness normalisation, which the engine
  does before the graph).
* The tokenizer is a byte-level BPE (GPT-2's scheme) trained on a few sentences. This builder's tokenizer.json
  and embed_tokens are a pair of its own: text ids offset by the speech vocabulary (6563), START_SPEECH (6561)
  appended by the tokenizer, so the first step's embeddings are the package's (conditioning, text,
  start-of-speech). The official pair differs: its tokenizer.json gives GPT-2's own ids (text up to 50256, the
  tags 50257-50275) and appends two 50256 (end-of-text) tokens, and how its embed_tokens tells those from speech
  ids (both from 0) is inside the graph, documented nowhere found. What both pairs share is the model card's
  loop, which the engine follows: `tokenizer(text)` ids, unchanged, to embed_tokens on the first step (after
  the speech encoder's audio_features), the last generated speech token (0..6562) on each later one. Sources
  (ports of the model card's example): moeru-ai/ortts
  crates/backend_chatterbox_turbo/src/utils/inference.rs (tokenizer.encode(text, true) straight to
  embed_tokens, generated tokens after), strawberry-labs/chatterbox-onnx-web js/tts-engine-complete.js and
  DEBUG_SUMMARY.md (the official tokenizer's ids, tags at 50257-50275), edgevox-onnx
  csrc/offline-tts-chatterbox-model.cc ("tokenizer.json applies TemplateProcessing with two trailing EOS
  tokens", 50256), transformers.js models/chatterbox (the exporter's own runtime: input_ids alone to
  embed_tokens when the graph takes nothing else).

Graph files: `onnx/{name}{suffix}.onnx` with weights in `{file}_data`; suffix "" (fp32), "_fp16", "_q4".
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

SPEECH_VOCAB = 6563
START_SPEECH_TOKEN = 6561
STOP_SPEECH_TOKEN = 6562
TOKEN_SAMPLES = 960               # 24 kHz / 25 tokens per second
SAMPLE_RATE = 24000
GRAPHS = ("speech_encoder", "embed_tokens", "language_model", "conditional_decoder")
SUFFIXES = {"fp32": "", "fp16": "_fp16", "q4": "_q4"}

_CORPUS = [
    "Hello there, this is a test of the speech server.",
    "The quick brown fox jumps over the lazy dog.",
    "Oh, that's hilarious! Um anyway, how are you doing today?",
    "Streaming speech arrives in small pieces, one after another.",
    "Numbers like one, two, three and forty-two are spoken too.",
    "She sells sea shells by the sea shore [laugh] [sigh] [chuckle].",
]


def _geometry(tiny: bool) -> dict:
    if tiny:
        return dict(n_embd=64, n_head=4, n_layer=2, n_positions=2048, text_vocab=400, tiny_decoder=True)
    return dict(n_embd=1024, n_head=16, n_layer=24, n_positions=8196, text_vocab=50276, tiny_decoder=False)


def _t3(geo: dict, seed: int):
    """The package's Turbo T3 (hp as ChatterboxTurboTTS.from_local sets them), random weights."""
    import torch
    from chatterbox.models.t3 import T3
    from chatterbox.models.t3.llama_configs import GPT2_MEDIUM_CONFIG, LLAMA_CONFIGS
    from chatterbox.models.t3.modules.t3_config import T3Config

    name = f"GPT2_makima_{geo['n_layer']}x{geo['n_embd']}"
    LLAMA_CONFIGS[name] = dict(GPT2_MEDIUM_CONFIG, n_embd=geo["n_embd"], hidden_size=geo["n_embd"],
                               n_head=geo["n_head"], n_layer=geo["n_layer"], n_positions=geo["n_positions"],
                               n_ctx=geo["n_positions"], vocab_size=geo["text_vocab"])
    hp = T3Config(text_tokens_dict_size=geo["text_vocab"])
    hp.llama_config_name = name
    hp.speech_tokens_dict_size = SPEECH_VOCAB
    hp.input_pos_emb = None
    hp.speech_cond_prompt_len = 375
    hp.use_perceiver_resampler = False
    hp.emotion_adv = False
    torch.manual_seed(seed)
    t3 = T3(hp)
    scale, emb = 4.0, 0.2
    with torch.no_grad():
        # GPT-2's 0.02 init makes near-uniform attention, and nn.Embedding's N(0, 1) rows swamp it: the greedy
        # tokens would follow from the last token alone. Livelier weights and smaller embeddings make them
        # depend on the text and the voice.
        for name, p in t3.named_parameters():
            if name.startswith(("text_emb", "speech_emb")):
                p.mul_(emb)
            elif p.dim() >= 2:
                p.mul_(scale)
    return t3.eval()


def _modules(t3, geo: dict, seed: int):
    import torch
    from torch import nn

    D = geo["n_embd"]
    H = geo["n_head"]
    hd = D // H
    tfmr = t3.tfmr

    class EmbedTokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.text_emb = t3.text_emb
            self.speech_emb = t3.speech_emb

        def forward(self, input_ids):
            is_text = input_ids >= SPEECH_VOCAB
            text = self.text_emb(torch.clamp(input_ids - SPEECH_VOCAB, min=0))
            speech = self.speech_emb(torch.clamp(input_ids, max=SPEECH_VOCAB - 1))
            return torch.where(is_text.unsqueeze(-1), text, speech)

    class LanguageModel(nn.Module):
        """GPT-2 (the package's weights) with an explicit KV cache, + the speech head."""

        def __init__(self):
            super().__init__()
            self.tfmr = tfmr
            self.speech_head = t3.speech_head

        def forward(self, inputs_embeds, attention_mask, position_ids, *past):
            x = inputs_embeds + self.tfmr.wpe(position_ids)
            S = x.shape[1]
            total = attention_mask.shape[1]
            P = total - S
            q_pos = torch.arange(S, device=x.device).unsqueeze(1) + P
            k_pos = torch.arange(total, device=x.device).unsqueeze(0)
            allowed = (k_pos <= q_pos).unsqueeze(0).unsqueeze(0) & (attention_mask[:, None, None, :] > 0)
            bias = torch.where(allowed, torch.zeros((), dtype=x.dtype), torch.full((), -1e4, dtype=x.dtype))
            presents = []

            def dense(t, m):     # GPT-2's Conv1D as MatMul + Add (what the 4-bit MatMul quantizer takes)
                return torch.matmul(t, m.weight) + m.bias

            for i, block in enumerate(self.tfmr.h):
                h = block.ln_1(x)
                qkv = dense(h, block.attn.c_attn)
                q, k, v = qkv.split(D, dim=2)
                q = q.view(q.shape[0], S, H, hd).transpose(1, 2)
                k = k.view(k.shape[0], S, H, hd).transpose(1, 2)
                v = v.view(v.shape[0], S, H, hd).transpose(1, 2)
                k = torch.cat([past[2 * i], k], dim=2)
                v = torch.cat([past[2 * i + 1], v], dim=2)
                presents += [k, v]
                att = torch.matmul(q, k.transpose(-1, -2)) / float(hd) ** 0.5 + bias
                att = torch.softmax(att, dim=-1)
                a = torch.matmul(att, v).transpose(1, 2).reshape(x.shape[0], S, D)
                x = x + dense(a, block.attn.c_proj)
                x = x + dense(block.mlp.act(dense(block.ln_2(x), block.mlp.c_fc)), block.mlp.c_proj)
            x = self.tfmr.ln_f(x)
            return (self.speech_head(x), *presents)

    flow, hift = _s3gen(geo, seed)

    class ConditionalDecoder(nn.Module):
        """The package's S3Gen (its meanflow token-to-mel flow, 2 steps, and the HiFT vocoder) as the official
        graph is called: prompt tokens + new tokens, the x-vector and the prompt's mel features in, the new
        tokens' waveform out (the prompt's frames dropped, the first 40 ms faded in, as S3Gen.inference does)."""

        def __init__(self):
            super().__init__()
            self.flow, self.hift = flow, hift
            n = TOKEN_SAMPLES // 2
            fade = torch.zeros(2 * n)
            fade[n:] = (torch.cos(torch.linspace(torch.pi, 0, n)) + 1) / 2
            self.register_buffer("trim_fade", fade)

        def forward(self, speech_tokens, speaker_embeddings, speaker_features):
            n_prompt = speaker_features.shape[1] // 2
            prompt, tokens = speech_tokens[:, :n_prompt], speech_tokens[:, n_prompt:]
            t = tokens.shape[1]
            one = torch.ones(1, dtype=torch.long)
            mel, _ = self.flow.inference(token=tokens, token_len=one * t, prompt_token=prompt,
                                         prompt_token_len=one * n_prompt, prompt_feat=speaker_features,
                                         prompt_feat_len=one * speaker_features.shape[1], embedding=speaker_embeddings,
                                         finalize=True, n_timesteps=2, noised_mels=torch.zeros(1, 80, 2 * t),
                                         meanflow=True)
            wav, _ = self.hift.inference(speech_feat=mel, cache_source=torch.zeros(1, 1, 0))
            head = wav[:, :TOKEN_SAMPLES] * self.trim_fade
            return torch.cat([head, wav[:, TOKEN_SAMPLES:]], dim=1)

    from .chatterbox_speech import speech_encoder, voice_modules

    enc = speech_encoder(t3, voice_modules(seed, tiny=geo.get("tiny_decoder", True)))
    return EmbedTokens().eval(), LanguageModel().eval(), enc, ConditionalDecoder().eval()


def _s3gen(geo: dict, seed: int):
    """The package's S3Gen flow (token-to-mel) and HiFT vocoder, random weights: tiny (one block each, width
    64) or the real geometry (S3Token2Wav's own)."""
    import torch

    torch.manual_seed(seed + 2)
    if not geo.get("tiny_decoder", True):
        from chatterbox.models.s3gen.s3gen import S3Token2Wav

        full = S3Token2Wav(meanflow=True)
        return full.flow.eval(), full.mel2wav.eval()
    from chatterbox.models.s3gen.configs import CFM_PARAMS
    from chatterbox.models.s3gen.decoder import ConditionalDecoder
    from chatterbox.models.s3gen.f0_predictor import ConvRNNF0Predictor
    from chatterbox.models.s3gen.flow import CausalMaskedDiffWithXvec
    from chatterbox.models.s3gen.flow_matching import CausalConditionalCFM
    from chatterbox.models.s3gen.hifigan import HiFTGenerator
    from chatterbox.models.s3gen.transformer.upsample_encoder import PreLookaheadLayer, Upsample1D, \
        UpsampleConformerEncoder

    d = 64
    enc = UpsampleConformerEncoder(output_size=d, attention_heads=2, linear_units=128, num_blocks=1, dropout_rate=0.0,
                                   positional_dropout_rate=0.0, attention_dropout_rate=0.0, normalize_before=True,
                                   input_layer="linear", pos_enc_layer_type="rel_pos_espnet",
                                   selfattention_layer_type="rel_selfattn", input_size=d, use_cnn_module=False,
                                   macaron_style=False)
    enc.pre_lookahead_layer = PreLookaheadLayer(channels=d, pre_lookahead_len=3)     # 512 wide in the package
    enc.up_layer = Upsample1D(channels=d, out_channels=d, stride=2)
    est = ConditionalDecoder(in_channels=320, out_channels=80, causal=True, channels=[d], dropout=0.0,
                             attention_head_dim=32, n_blocks=1, num_mid_blocks=1, num_heads=2, act_fn="gelu",
                             meanflow=True)
    flow = CausalMaskedDiffWithXvec(input_size=d, encoder=enc,
                                    decoder=CausalConditionalCFM(spk_emb_dim=80, cfm_params=CFM_PARAMS, estimator=est))
    hift = HiFTGenerator(sampling_rate=SAMPLE_RATE, base_channels=32, upsample_rates=[8, 5, 3],
                         upsample_kernel_sizes=[16, 11, 7], source_resblock_kernel_sizes=[7, 7, 11],
                         source_resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]],
                         f0_predictor=ConvRNNF0Predictor(cond_channels=32))
    return flow.eval(), hift.eval()


@contextlib.contextmanager
def no_noise():
    """S3Gen without its random draws (the flow's starting noise, HiFT's source phases and noise): zeros, in
    the package's inference and in the export alike, so the two can be compared sample by sample."""
    import torch
    import torch.distributions.uniform as uniform

    saved = (torch.randn, torch.randn_like, uniform.Uniform.sample)
    torch.randn = lambda *a, **k: torch.zeros(*a, **{x: y for x, y in k.items() if x in ("dtype", "device")})
    torch.randn_like = lambda x, *a, **k: torch.zeros_like(x)
    uniform.Uniform.sample = lambda self, sample_shape=(): torch.zeros(sample_shape)
    try:
        yield
    finally:
        torch.randn, torch.randn_like, uniform.Uniform.sample = saved


@contextlib.contextmanager
def _traceable(hift):
    """What the ONNX tracer needs of the package's S3Gen: no tqdm over traced steps, padding masks sized by
    the traced lengths (not by .item()), and HiFT's STFT / inverse STFT as convolutions (same numbers)."""
    import chatterbox.models.s3gen.flow as flow_mod
    import chatterbox.models.s3gen.flow_matching as fm_mod
    import chatterbox.models.s3gen.transformer.upsample_encoder as ue_mod
    import torch

    def pad_mask(lengths, max_len=0):
        lengths = lengths.long()
        n = max_len if (not isinstance(max_len, int) or max_len > 0) else lengths.max()
        return torch.arange(0, n, dtype=torch.int64, device=lengths.device).unsqueeze(0) >= lengths.unsqueeze(-1)

    saved = (fm_mod.tqdm, flow_mod.make_pad_mask, ue_mod.make_pad_mask)
    fm_mod.tqdm = lambda it, **k: it
    flow_mod.make_pad_mask = ue_mod.make_pad_mask = pad_mask
    hift._stft, hift._istft = _conv_stft(hift)
    try:
        yield
    finally:
        fm_mod.tqdm, flow_mod.make_pad_mask, ue_mod.make_pad_mask = saved
        del hift._stft, hift._istft


def _conv_stft(hift):
    """torch.stft / torch.istft (centred, reflect padding, HiFT's window) as conv1d / conv_transpose1d."""
    import math

    import torch
    import torch.nn.functional as F

    n_fft, hop = hift.istft_params["n_fft"], hift.istft_params["hop_len"]
    win = hift.stft_window.double()
    bins = n_fft // 2 + 1
    ang = 2 * math.pi * torch.arange(bins, dtype=torch.float64)[:, None] * torch.arange(n_fft, dtype=torch.float64) / n_fft
    k_re, k_im = (torch.cos(ang) * win).float()[:, None], (-torch.sin(ang) * win).float()[:, None]
    c = torch.full((bins, 1), 2.0, dtype=torch.float64)
    c[0] = c[-1] = 1.0
    b_re, b_im = (c * torch.cos(ang) / n_fft * win).float()[:, None], (-c * torch.sin(ang) / n_fft * win).float()[:, None]
    b_im[0] = b_im[-1] = 0.0
    w2 = (win ** 2).float()[None, None]

    def stft(x):
        x = F.pad(x[:, None], (n_fft // 2, n_fft // 2), mode="reflect")
        return F.conv1d(x, k_re, stride=hop), F.conv1d(x, k_im, stride=hop)

    def istft(magnitude, phase):
        magnitude = torch.clip(magnitude, max=1e2)
        re, im = magnitude * torch.cos(phase), magnitude * torch.sin(phase)
        y = F.conv_transpose1d(re, b_re, stride=hop) + F.conv_transpose1d(im, b_im, stride=hop)
        env = F.conv_transpose1d(torch.ones_like(re[:, :1]), w2, stride=hop)
        y = y / torch.where(env > 1e-11, env, torch.ones_like(env))
        return y[:, 0, n_fft // 2: y.shape[-1] - n_fft // 2]

    return stft, istft


def _tokenizer(out: Path, text_vocab: int) -> None:
    """tokenizer.json: byte-level BPE trained on _CORPUS, ids offset by SPEECH_VOCAB, START_SPEECH appended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(text_vocab, 400), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    spec = json.loads(tok.to_str())
    spec["model"]["vocab"] = {k: v + SPEECH_VOCAB for k, v in spec["model"]["vocab"].items()}
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "[START_SPEECH]", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 0}},
                 {"SpecialToken": {"id": "[START_SPEECH]", "type_id": 0}}],
        "special_tokens": {"[START_SPEECH]": {"id": "[START_SPEECH]", "ids": [START_SPEECH_TOKEN],
                                              "tokens": ["[START_SPEECH]"]}},
    }
    (out / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1024}), encoding="utf-8")


def _export(module, args, path: Path, input_names, output_names, dynamic_axes) -> None:
    import onnx
    import torch

    import warnings

    tmp = path.with_suffix(".tmp.onnx")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")          # the tracer's notes on Python control flow (shapes are traced)
        torch.onnx.export(module, args, str(tmp), input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic_axes, opset_version=17, dynamo=False, do_constant_folding=True)
    model = onnx.load(str(tmp))
    for f in tmp.parent.glob(tmp.name + "*"):
        f.unlink()
    _save(model, path)


def _save(model, path: Path) -> None:
    import onnx

    data = path.name + "_data"
    if (path.parent / data).exists():
        (path.parent / data).unlink()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data,
                    size_threshold=0)


def _variant(src: Path, dtype: str) -> Path:
    import onnx

    dst = src.with_name(src.name[:-len(".onnx")] + SUFFIXES[dtype] + ".onnx")
    model = onnx.load(str(src))
    if dtype == "fp16":
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

        from .chatterbox_speech import FLOAT32_NODES

        # inputs and outputs as the official fp16 graphs have them: float16 where they are float. The speech
        # encoder's front ends and S3 tokenizer (FLOAT32_NODES) and its LSTM stay float32.
        keep = [n.name for n in model.graph.node if FLOAT32_NODES.match(n.name)]
        model = convert_float_to_float16(model, keep_io_types=False, op_block_list=DEFAULT_OP_BLOCK_LIST + ["LSTM"],
                                         node_block_list=keep)
    elif dtype == "q4":
        import logging

        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)

        q = MatMulNBitsQuantizer(model, block_size=32, is_symmetric=True)
        q.process()
        model = q.model.model
    _save(model, dst)
    return dst


def build_chatterbox_export(out: Path, tiny: bool = True, dtypes: Iterable[str] = ("fp32",), seed: int = 0,
                            force: bool = False) -> Path:
    """Write the export to `out` (skipped when `out/makima-test-export.json` says it is this build)."""
    import torch

    out = Path(out)
    stamp = {"format": "makima-chatterbox-test/4", "tiny": tiny, "dtypes": sorted(dtypes), "seed": seed}
    marker = out / "makima-test-export.json"
    if not force and marker.is_file() and json.loads(marker.read_text()) == stamp:
        return out
    if out.exists():
        shutil.rmtree(out)
    (out / "onnx").mkdir(parents=True)
    geo = _geometry(tiny)
    t3 = _t3(geo, seed)
    embed, lm, enc, dec = _modules(t3, geo, seed)
    from .chatterbox_speech import DERIVED

    # the speech encoder's weights without its derived constants (DFT kernels, mel banks: rebuilt the same)
    weights = {k: v for k, v in enc.state_dict().items() if not k.startswith(DERIVED)}
    torch.save({"t3": t3.state_dict(), "enc": weights, "dec": dec.state_dict(), "geo": geo,
                "seed": seed}, out / "reference.pt")
    onnx_dir = out / "onnx"
    D, H, L = geo["n_embd"], geo["n_head"], geo["n_layer"]
    hd = D // H
    _export(embed, (torch.tensor([[SPEECH_VOCAB + 5, SPEECH_VOCAB + 7, START_SPEECH_TOKEN]]),),
            onnx_dir / "embed_tokens.onnx", ["input_ids"], ["inputs_embeds"],
            {"input_ids": {0: "batch_size", 1: "sequence_length"},
             "inputs_embeds": {0: "batch_size", 1: "sequence_length"}})
    past_names = [f"past_key_values.{i}.{kv}" for i in range(L) for kv in ("key", "value")]
    present_names = [f"present.{i}.{kv}" for i in range(L) for kv in ("key", "value")]
    S, P = 3, 2
    args = (torch.randn(1, S, D), torch.ones(1, P + S, dtype=torch.int64), torch.arange(P, P + S).unsqueeze(0),
            *[torch.randn(1, H, P, hd) for _ in past_names])
    dyn = {"inputs_embeds": {0: "batch_size", 1: "sequence_length"},
           "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
           "position_ids": {0: "batch_size", 1: "sequence_length"},
           "logits": {0: "batch_size", 1: "sequence_length"}}
    dyn.update({n: {0: "batch_size", 2: "past_sequence_length"} for n in past_names})
    dyn.update({n: {0: "batch_size", 2: "total_sequence_length"} for n in present_names})
    _export(lm, args, onnx_dir / "language_model.onnx", ["inputs_embeds", "attention_mask", "position_ids", *past_names],
            ["logits", *present_names], dyn)
    from .clips import reference_clip

    _export(enc, (torch.from_numpy(reference_clip(4.0, seed=3))[None],), onnx_dir / "speech_encoder.onnx",
            ["audio_values"],
            ["audio_features", "audio_tokens", "speaker_embeddings", "speaker_features"],
            {"audio_values": {0: "batch_size", 1: "num_samples"},
             "audio_features": {0: "batch_size", 1: "sequence_length"},
             "audio_tokens": {0: "batch_size", 1: "audio_sequence_length"},
             "speaker_embeddings": {0: "batch_size"},
             "speaker_features": {0: "batch_size", 1: "feature_dim"}})
    with no_noise(), _traceable(dec.hift):
        _export(dec, (torch.randint(0, 6561, (1, 12)), torch.randn(1, 192), torch.randn(1, 8, 80)),
                onnx_dir / "conditional_decoder.onnx", ["speech_tokens", "speaker_embeddings", "speaker_features"],
                ["waveform"], {"speech_tokens": {0: "batch_size", 1: "num_speech_tokens"},
                               "speaker_embeddings": {0: "batch_size"},
                               "speaker_features": {0: "batch_size", 1: "feature_dim"},
                               "waveform": {0: "batch_size", 1: "num_samples"}})
    for dtype in dtypes:
        if dtype != "fp32":
            for name in GRAPHS:
                _variant(onnx_dir / f"{name}.onnx", dtype)
    _tokenizer(out, geo["text_vocab"])
    (out / "config.json").write_text(json.dumps({"model_type": "chatterbox_turbo", "makima_test_export": True,
                                                  "num_hidden_layers": L, "num_key_value_heads": H,
                                                  "head_dim": hd, "hidden_size": D}), encoding="utf-8")
    marker.write_text(json.dumps(stamp), encoding="utf-8")
    return out


# ---------------------------------------------------------------------------------- the package's inference


@contextlib.contextmanager
def _sinc_resampling():
    """librosa.resample as torchaudio's sinc resampler (what the speech encoder graph does), for a while."""
    import librosa
    import torch
    import torchaudio

    saved = librosa.resample

    def sinc(y, *, orig_sr, target_sr, **_):
        return torchaudio.functional.resample(torch.from_numpy(np.asarray(y, dtype=np.float32)), orig_sr,
                                              target_sr).numpy()

    librosa.resample = sinc
    try:
        yield
    finally:
        librosa.resample = saved


@contextlib.contextmanager
def _float32_norm_loudness(tts):
    """The package's norm_loudness with a float32 result, as under NumPy 1, which the package requires on Python
    < 3.13: there a float32 clip times its float64 gain stays float32; under NumPy 2 it becomes float64 and the
    package's soxr path then fails in S3Tokenizer's float32 mel filters ("expected scalar type Double")."""
    method = type(tts).norm_loudness
    tts.norm_loudness = lambda wav, sr, *a, **kw: np.asarray(method(tts, wav, sr, *a, **kw), dtype=np.float32)
    try:
        yield
    finally:
        del tts.norm_loudness


class Reference:
    """The reference package's modules on an export's weights (reference.pt): for parity tests."""

    def __init__(self, export: Path):
        import torch

        from .chatterbox_speech import DERIVED

        state = torch.load(Path(export) / "reference.pt", weights_only=False)
        self.geo = state["geo"]
        self.t3 = _t3(self.geo, state["seed"])
        self.t3.load_state_dict(state["t3"])
        _, _, self.enc, self.dec = _modules(self.t3, self.geo, state["seed"])
        missing, unexpected = self.enc.load_state_dict(state["enc"], strict=False)
        assert not unexpected and all(k.startswith(DERIVED) for k in missing), (missing, unexpected)
        self.dec.load_state_dict(state["dec"])
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(Path(export) / "tokenizer.json"))

    def package_tts(self):
        """The package's ChatterboxTurboTTS around these modules (T3, S3Gen's tokenizer, CAMPPlus, flow and HiFT,
        the voice encoder); no text tokenizer or watermarker (not needed here)."""
        import torch
        from chatterbox.models.s3gen.s3gen import S3Token2Wav
        from chatterbox.models.s3gen.utils.mel import mel_spectrogram
        from chatterbox.tts_turbo import ChatterboxTurboTTS

        if getattr(self, "_tts", None) is None:
            s3gen = S3Token2Wav.__new__(S3Token2Wav)
            torch.nn.Module.__init__(s3gen)
            s3gen.tokenizer, s3gen.speaker_encoder, s3gen.mel_extractor = self.enc.s3, self.enc.campplus, \
                mel_spectrogram
            s3gen.flow, s3gen.mel2wav, s3gen.meanflow, s3gen.resamplers = self.dec.flow, self.dec.hift, True, {}
            s3gen.register_buffer("trim_fade", self.dec.trim_fade.clone(), persistent=False)
            tts = ChatterboxTurboTTS.__new__(ChatterboxTurboTTS)
            tts.t3, tts.s3gen, tts.ve, tts.device, tts.sr, tts.conds = self.t3, s3gen.eval(), self.enc.ve, "cpu", \
                SAMPLE_RATE, None
            self._tts = tts
        return self._tts

    def conditionals(self, audio_24k: np.ndarray, package_resampler: bool = False, norm_loudness: bool = True):
        """The package's own `prepare_conditionals` for a 24 kHz clip (over 5 s, as it requires), with its
        loudness normalisation (-27 LUFS, pyloudnorm) unless norm_loudness=False, as the engine's
        create_voice_prompt normalises before the graph: its Conditionals (.t3: T3Cond, .gen: S3Gen's ref_dict).
        package_resampler=False resamples T3's clip with torchaudio's sinc resampler, as the graph does, instead
        of librosa's soxr."""
        import contextlib
        import io
        import tempfile

        import soundfile as sf
        import torch

        tts = self.package_tts()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "ref.wav"
            sf.write(str(path), np.asarray(audio_24k, dtype=np.float32), SAMPLE_RATE, subtype="FLOAT")
            with torch.no_grad(), (contextlib.nullcontext() if package_resampler else _sinc_resampling()), \
                    _float32_norm_loudness(tts), contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()):
                tts.prepare_conditionals(str(path), exaggeration=0.0, norm_loudness=norm_loudness)
        conds, tts.conds = tts.conds, None
        return conds

    def text_tokens(self, text: str):
        """The package's text token ids (this export's tokenizer ids less the offset, without START_SPEECH)."""
        import torch

        ids = [i - SPEECH_VOCAB for i in self.tokenizer.encode(text).ids if i >= SPEECH_VOCAB]
        return torch.tensor([ids], dtype=torch.long)

    def greedy_tokens(self, text: str, audio_24k: np.ndarray, max_new: int) -> list[int]:
        """The package's T3.inference_turbo, greedy (top_k=1): the speech tokens it returns."""
        import contextlib
        import io

        import torch

        cond = self.conditionals(audio_24k).t3
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            out = self.t3.inference_turbo(t3_cond=cond, text_tokens=self.text_tokens(text), temperature=1.0,
                                          top_k=1, top_p=1.0, repetition_penalty=1.0, max_gen_len=max_new - 1)
        return [int(t) for t in out[0]]

    def decode(self, speech_tokens: list[int], audio_24k: np.ndarray) -> np.ndarray:
        """The package's own `S3Token2Wav.inference` (2 meanflow steps, as ChatterboxTurboTTS.generate) on these
        weights, with prepare_conditionals' ref_dict for the clip, its random draws zeroed (no_noise) as in the
        export."""
        import contextlib
        import io

        import torch

        shell = self.package_tts().s3gen
        ref = self.conditionals(audio_24k).gen
        with no_noise(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            wav, _ = shell.inference(torch.tensor([speech_tokens], dtype=torch.long), ref_dict=ref, n_cfm_timesteps=2)
        return wav[0].numpy()


def main(argv: Optional[list] = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--full", action="store_true", help="the real language model's geometry (GPT-2 medium)")
    p.add_argument("--dtypes", default="fp32", help="comma-separated: fp32, fp16, q4")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    path = build_chatterbox_export(Path(args.out), tiny=not args.full, dtypes=[d for d in args.dtypes.split(",") if d])
    print(path)


if __name__ == "__main__":
    main()
