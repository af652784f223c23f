"""Build Qwen3-TTS-12Hz checkpoints with random weights in the official layout.

Tests (tiny) and benchmarks (full 0.6B-Base geometry) use this:
`python -m makima_tts.testing.checkpoints OUT [--full]`. The reference
package `qwen-tts` constructs and saves the modules, so the tensor names and
shapes are the real ones; the config files are written by hand as the hub's
files are (the reference's own save_pretrained config does not load back).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

LANGUAGE_IDS = {
    "english": 2050, "german": 2052, "spanish": 2054, "chinese": 2055, "japanese": 2058,
    "french": 2061, "korean": 2064, "russian": 2069, "italian": 2070, "portuguese": 2071,
}

SPECIAL_TEXT_TOKENS = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
    "<tts_pad>": 151671, "<tts_text_bos>": 151672, "<tts_text_eod>": 151673,
}


def _talker_config(tiny: bool, mid: bool = False) -> dict:
    if mid:         # between the two: a 151936 x 512 text embedding (311 MB in float32), 4 layers of width 256
        geo = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=64, text_hidden_size=512)
        mrope = [16, 8, 8]
        cp = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64)
    elif tiny:
        geo = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, text_hidden_size=64)
        mrope = [4, 2, 2]
        cp = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16)
    else:
        geo = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                   num_key_value_heads=8, head_dim=128, text_hidden_size=2048)
        mrope = [24, 20, 20]
        cp = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=5, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128)
    return dict(
        **geo,
        vocab_size=3072, text_vocab_size=151936, hidden_act="silu", max_position_embeddings=32768,
        rms_norm_eps=1e-6, rope_theta=1000000,
        rope_scaling={"interleaved": True, "mrope_section": mrope, "rope_type": "default", "type": "default"},
        attention_bias=False, use_sliding_window=False, num_code_groups=16,
        codec_eos_token_id=2150, codec_think_id=2154, codec_nothink_id=2155, codec_think_bos_id=2156,
        codec_think_eos_id=2157, codec_pad_id=2148, codec_bos_id=2149,
        codec_language_id=dict(LANGUAGE_IDS), spk_id={}, spk_is_dialect={},
        code_predictor_config=dict(
            **cp, vocab_size=2048, hidden_act="silu", max_position_embeddings=65536, rms_norm_eps=1e-6,
            rope_theta=1000000, attention_bias=False, use_sliding_window=False, num_code_groups=16,
        ),
    )


def model_config(tiny: bool, mid: bool = False) -> dict:
    talker = _talker_config(tiny, mid)
    if tiny or mid:
        spk = dict(mel_dim=128, enc_dim=talker["hidden_size"], enc_channels=[32, 32, 32, 32, 96],
                   enc_kernel_sizes=[5, 3, 3, 3, 1], enc_dilations=[1, 2, 3, 4, 1], enc_attention_channels=16,
                   enc_res2net_scale=4, enc_se_channels=16, sample_rate=24000)
    else:
        spk = dict(mel_dim=128, enc_dim=1024, enc_channels=[512, 512, 512, 512, 1536],
                   enc_kernel_sizes=[5, 3, 3, 3, 1], enc_dilations=[1, 2, 3, 4, 1], enc_attention_channels=128,
                   enc_res2net_scale=8, enc_se_channels=128, sample_rate=24000)
    return {
        "architectures": ["Qwen3TTSForConditionalGeneration"],
        "model_type": "qwen3_tts",
        "tokenizer_type": "qwen3_tts_tokenizer_12hz",
        "tts_model_size": "0b6",
        "tts_model_type": "base",
        "im_start_token_id": 151644, "im_end_token_id": 151645,
        "tts_pad_token_id": 151671, "tts_bos_token_id": 151672, "tts_eos_token_id": 151673,
        "talker_config": talker,
        "speaker_encoder_config": spk,
    }


def codec_config(tiny: bool) -> dict:
    if tiny:
        enc = dict(hidden_size=64, num_filters=8, num_hidden_layers=1, intermediate_size=128,
                   num_attention_heads=4, num_key_value_heads=4, head_dim=16, codebook_dim=16,
                   vector_quantization_hidden_dimension=16, num_quantizers=16, upsample_groups=64)
        dec = dict(hidden_size=64, intermediate_size=128, latent_dim=64, codebook_dim=32, num_hidden_layers=1,
                   num_attention_heads=4, num_key_value_heads=4, head_dim=16, decoder_dim=64)
    else:
        enc = dict(hidden_size=512, num_filters=64, num_hidden_layers=8, intermediate_size=2048,
                   num_attention_heads=8, num_key_value_heads=8, head_dim=64, codebook_dim=256,
                   vector_quantization_hidden_dimension=256, num_quantizers=32, upsample_groups=512)
        dec = dict(hidden_size=512, intermediate_size=1024, latent_dim=1024, codebook_dim=512, num_hidden_layers=8,
                   num_attention_heads=16, num_key_value_heads=16, head_dim=64, decoder_dim=1536)
    encoder = dict(
        enc, sampling_rate=24000, audio_channels=1, num_residual_layers=1, upsampling_ratios=[8, 6, 5, 4],
        kernel_size=7, last_kernel_size=3, residual_kernel_size=3, dilation_growth_rate=2, use_causal_conv=True,
        pad_mode="constant", compress=2, trim_right_ratio=1.0, codebook_size=2048, use_conv_shortcut=False,
        hidden_act="gelu", max_position_embeddings=8000, norm_eps=1e-5, use_cache=False, use_streaming=False,
        rope_theta=10000.0, sliding_window=250, attention_dropout=0.0, layer_scale_initial_scale=0.01,
        attention_bias=False, num_semantic_quantizers=1, frame_rate=12.5,
    )
    decoder = dict(
        dec, codebook_size=2048, max_position_embeddings=8000, rope_theta=10000, attention_bias=False,
        sliding_window=72, hidden_act="silu", layer_scale_initial_scale=0.01, rms_norm_eps=1e-5,
        num_quantizers=16, upsample_rates=[8, 5, 4, 3], upsampling_ratios=[2, 2], attention_dropout=0.0,
    )
    return {
        "architectures": ["Qwen3TTSTokenizerV2Model"],
        "model_type": "qwen3_tts_tokenizer_12hz",
        "encoder_config": encoder,
        "decoder_config": decoder,
        "encoder_valid_num_quantizers": 16,
        "input_sample_rate": 24000, "output_sample_rate": 24000,
        "decode_upsample_rate": 1920, "encode_downsample_rate": 1920,
    }


GENERATION_CONFIG = {
    "do_sample": True, "repetition_penalty": 1.05, "temperature": 0.9, "top_p": 1.0, "top_k": 50,
    "subtalker_dosample": True, "subtalker_temperature": 0.9, "subtalker_top_p": 1.0, "subtalker_top_k": 50,
    "max_new_tokens": 8192,
}

PREPROCESSOR_CONFIG = {
    "chunk_length_s": None, "feature_extractor_type": "EncodecFeatureExtractor", "feature_size": 1,
    "overlap": None, "padding_side": "right", "padding_value": 0.0, "return_attention_mask": True,
    "sampling_rate": 24000,
}

_CORPUS = [
    "Hello world. This is a tiny tokenizer for tests of a speech model.",
    "The quick brown fox jumps over the lazy dog, twice, in 2026!",
    "Voice cloning from a reference clip and its transcript; streaming audio frame by frame.",
    "assistant user system", "Guten Tag. Bonjour. Hola. 你好，世界。こんにちは。",
]


def write_text_tokenizer(out: Path) -> None:
    """A small Qwen2-style byte-level BPE: vocab.json, merges.txt, tokenizer_config.json.

    Ordinary ranks stay below 151643; the special tokens sit at their real ids.
    "assistant" and "\\n" are single tokens so `<|im_start|>assistant\\n` is 3 tokens.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS * 20 + ["assistant"] * 50, trainer=trainer)
    model_dir = out / "_bpe"
    model_dir.mkdir(exist_ok=True)
    tok.model.save(str(model_dir))
    vocab = json.loads((model_dir / "vocab.json").read_text())
    assert "assistant" in vocab and "Ċ" in vocab, "tiny tokenizer must hold 'assistant' and '\\n' as tokens"
    # Fill the ranks up to the first special id with tokens BPE never produces, as the real
    # vocabulary does, so special tokens get their real ids in every tokenizer implementation.
    first_special = min(SPECIAL_TEXT_TOKENS.values())
    vocab.update({f"<|unused_rank_{i}|>": i for i in range(len(vocab), first_special)})
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    shutil.move(str(model_dir / "merges.txt"), out / "merges.txt")
    shutil.rmtree(model_dir)
    names = {i: t for t, i in SPECIAL_TEXT_TOKENS.items()}
    added = {str(i): {"content": names.get(i, f"<|extra_special_{i}|>"), "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False, "special": True}
             for i in range(first_special, max(names) + 1)}
    cfg = {
        "add_prefix_space": False, "added_tokens_decoder": added, "bos_token": None,
        "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
        "model_max_length": 131072, "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))


def _randomize_codec(model, seed: int) -> None:
    """Random init of the reference codec gives zero codebooks and near-silence: give it real signal."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("embedding_sum"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith("cluster_usage"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif p.dim() >= 2:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(fan_in))
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)


def _randomize_model(model, seed: int, tiny: bool) -> None:
    """Larger-than-default random weights so greedy decoding of a tiny model is not degenerate."""
    import torch

    g = torch.Generator().manual_seed(seed)
    std = 0.2 if tiny else 0.02
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "speech_tokenizer" in name:
                continue
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def build_checkpoint(out: str | os.PathLike, tiny: bool = True, seed: int = 0, dtype: str = "float32",
                     mid: bool = False) -> Path:
    """Write a random-weight checkpoint in the official layout to `out` (atomically) and return it.
    mid: a mid-size talker (the tiny codec), for memory tests."""
    import torch
    from qwen_tts.core.models import Qwen3TTSConfig, Qwen3TTSForConditionalGeneration
    from qwen_tts.core import Qwen3TTSTokenizerV2Config, Qwen3TTSTokenizerV2Model

    out = Path(out)
    if (out / "model.safetensors").exists() and (out / "speech_tokenizer" / "model.safetensors").exists():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "speech_tokenizer").mkdir(parents=True)
    torch.manual_seed(seed)
    cfg = model_config(tiny, mid)
    model = Qwen3TTSForConditionalGeneration(Qwen3TTSConfig(**cfg))
    _randomize_model(model, seed, tiny or mid)
    torch_dtype = getattr(torch, dtype)
    model.to(torch_dtype).save_pretrained(tmp, safe_serialization=True)
    del model
    codec_cfg = codec_config(tiny or mid)
    codec = Qwen3TTSTokenizerV2Model(Qwen3TTSTokenizerV2Config(**codec_cfg))
    _randomize_codec(codec, seed + 1)
    codec.save_pretrained(tmp / "speech_tokenizer", safe_serialization=True)
    del codec
    for stale in ("config.json", "generation_config.json"):
        (tmp / stale).unlink(missing_ok=True)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    (tmp / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    (tmp / "speech_tokenizer" / "config.json").write_text(json.dumps(codec_cfg, indent=2))
    (tmp / "speech_tokenizer" / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2))
    write_text_tokenizer(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out")
    ap.add_argument("--full", action="store_true", help="real 0.6B-Base geometry instead of tiny")
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args()
    print(build_checkpoint(a.out, tiny=not a.full, dtype=a.dtype))
