"""The Qwen3 engine against the reference package, on a tiny random-weight checkpoint."""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from makima_tts.engine.qwen3 import Qwen3Engine
from makima_tts.engine.types import CancelToken, GenerationSettings, GenerationStats, VoicePrompt
from makima_tts.errors import CheckpointError, EmptyText, InvalidAudio, UnknownLanguage
from makima_tts.testing import REF_TEXT

TEXT = "The quick brown fox jumps over the lazy dog."
MAX_NEW_TOKENS = 40        # the reference yields MAX_NEW_TOKENS - 1 frames when no EOS comes

# Waveform bounds, measured on the tiny checkpoint (float32): the reference decodes the
# reference codes and the new codes in one pass and cuts; we decode frame by frame.
# measured 6.7e-4 on an AMD EPYC (AVX2) and 1.01e-3 on an Intel Xeon with AMX (same codes; the float
# kernels differ): the bound leaves room for both, the SNR bound below is the finer check
WAVE_MAX_ABS = 2e-3
WAVE_MIN_SNR_DB = 60.0


def snr_db(ref: np.ndarray, test: np.ndarray) -> float:
    noise = np.sum((ref - test) ** 2)
    return float("inf") if noise == 0 else 10 * np.log10(np.sum(ref ** 2) / noise)


def reference_run(model, clip, text, language, x_vector_only):
    """Reference greedy generation: (prompt item, generated codes (T, 16), waveform)."""
    captured = {}
    tokenizer = model.model.speech_tokenizer
    original = tokenizer.decode

    def capture(items):
        captured["codes"] = items[0]["audio_codes"]
        return original(items)

    items = model.create_voice_clone_prompt(ref_audio=(clip, 24000), ref_text=REF_TEXT,
                                            x_vector_only_mode=x_vector_only)
    tokenizer.decode = capture
    try:
        wavs, sr = model.generate_voice_clone(text=text, language=language, voice_clone_prompt=items,
                                              do_sample=False, subtalker_dosample=False,
                                              max_new_tokens=MAX_NEW_TOKENS)
    finally:
        tokenizer.decode = original
    n_ref = 0 if x_vector_only else items[0].ref_code.shape[0]
    return items[0], captured["codes"][n_ref:], wavs[0]


def greedy(**kw) -> GenerationSettings:
    kw.setdefault("max_frames", MAX_NEW_TOKENS - 1)
    return GenerationSettings.greedy_settings(**kw)


@pytest.mark.parametrize("x_vector_only", [False, True], ids=["icl", "xvector"])
@pytest.mark.parametrize("language", ["English", "Auto"])
def test_codes_match_reference_frame_for_frame(engine, reference_model, ref_clip, x_vector_only, language):
    item, ref_codes, _ = reference_run(reference_model, ref_clip, TEXT, language, x_vector_only)
    voice = VoicePrompt(speaker_embedding=item.ref_spk_embedding, ref_codes=item.ref_code,
                        ref_text=REF_TEXT, x_vector_only=x_vector_only)
    ours = torch.stack(list(engine.frames(TEXT, voice, language, greedy())))
    assert ours.shape == ref_codes.shape == (MAX_NEW_TOKENS - 1, 16)
    assert torch.equal(ours, ref_codes)


def test_voice_prompt_matches_reference(engine, reference_model, ref_clip):
    item = reference_model.create_voice_clone_prompt(ref_audio=(ref_clip, 24000), ref_text=REF_TEXT)[0]
    ours = engine.create_voice_prompt(ref_clip, 24000, transcript=REF_TEXT)
    assert torch.equal(ours.ref_codes, item.ref_code.cpu())
    torch.testing.assert_close(ours.speaker_embedding, item.ref_spk_embedding.float().cpu(), rtol=1e-4, atol=1e-5)
    assert ours.fingerprint == engine.fingerprint and ours.ref_text == REF_TEXT


@pytest.mark.parametrize("x_vector_only", [False, True], ids=["icl", "xvector"])
def test_streamed_waveform_matches_reference(engine, reference_model, ref_clip, x_vector_only):
    _, _, ref_wav = reference_run(reference_model, ref_clip, TEXT, "English", x_vector_only)
    voice = engine.create_voice_prompt(ref_clip, 24000, transcript=REF_TEXT, x_vector_only=x_vector_only)
    chunks = list(engine.stream(TEXT, voice, "English", greedy()))
    ours = np.concatenate([c.pcm for c in chunks])
    assert len(chunks) > 3 and ours.shape == ref_wav.shape
    assert np.max(np.abs(ours - ref_wav)) < WAVE_MAX_ABS
    assert snr_db(ref_wav, ours) > WAVE_MIN_SNR_DB


def test_chunks_arrive_frame_by_frame(engine, voice):
    settings = greedy(first_chunk_frames=2, chunk_frames=5)
    chunks = list(engine.stream(TEXT, voice, "english", settings))
    frames = [c.num_frames for c in chunks]
    # the first chunk, then each twice the one before up to chunk_frames
    assert frames[:2] == [2, 4] and all(n == 5 for n in frames[2:-1]) and sum(frames) == MAX_NEW_TOKENS - 1
    assert [c.num_frames for c in engine.stream(TEXT, voice, "english", greedy())][:4] == [1, 2, 4, 6]
    assert [c.is_last for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert [c.frame_index for c in chunks] == list(np.cumsum([0] + frames[:-1]))
    assert sum(len(c.pcm) for c in chunks) == 1920 * sum(frames)
    assert all(c.sample_rate == 24000 and c.pcm.dtype == np.float32 for c in chunks)


def test_stream_yields_before_generation_ends(engine, voice):
    """The first chunk is handed over while later frames are still to be generated."""
    seen = []
    stats = GenerationStats()
    stream = engine.stream(TEXT, voice, "english", greedy(first_chunk_frames=1, chunk_frames=1), stats=stats)
    first = next(stream)
    seen.append(stats.frames)        # not set until the generator finishes
    rest = list(stream)
    # one chunk per frame; the last chunk (is_last) may carry no new frame, only the decoder's tail
    assert first.num_frames == 1 and seen == [None]
    assert sum(c.num_frames for c in rest) == MAX_NEW_TOKENS - 2 and rest[-1].is_last
    assert all(c.num_frames == 1 for c in rest[:-1])
    assert stats.frames == MAX_NEW_TOKENS - 1


def test_seeded_sampling_is_reproducible(engine, voice):
    def run(seed):
        s = dataclasses.replace(engine.defaults, seed=seed, max_frames=12)
        return torch.stack(list(engine.frames(TEXT, voice, "english", s)))

    a, b, c = run(1234), run(1234), run(99)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_cancel_stops_between_frames(engine, voice):
    cancel = CancelToken()
    stats = GenerationStats()
    got = []
    for chunk in engine.stream(TEXT, voice, "english", greedy(first_chunk_frames=1, chunk_frames=1),
                               cancel=cancel, stats=stats):
        got.append(chunk)
        if len(got) == 3:
            cancel.cancel()
    assert len(got) == 3 and not any(c.is_last for c in got)
    assert stats.frames == 3


def test_closing_the_stream_stops_generation(engine, voice):
    stats = GenerationStats()
    stream = engine.stream(TEXT, voice, "english", greedy(first_chunk_frames=1, chunk_frames=1), stats=stats)
    next(stream)
    next(stream)
    stream.close()
    assert stats.frames == 2


def test_stops_at_eos(engine, voice):
    """Generation ends at the codec EOS: make a token greedy decoding produces at frame 6 the EOS."""
    settings = greedy()
    frames = torch.stack(list(engine.frames(TEXT, voice, "english", settings)))
    eos = int(frames[6, 0])
    first = next(i for i in range(2, len(frames)) if int(frames[i, 0]) == eos)
    saved = engine.ids
    engine.ids = dataclasses.replace(saved, codec_eos=eos)
    try:
        stopped = torch.stack(list(engine.frames(TEXT, voice, "english", settings)))
    finally:
        engine.ids = saved
    assert len(stopped) == first
    assert torch.equal(stopped, frames[:first])


def test_length_is_bounded_by_text(engine, voice):
    """A model that never says EOS (random weights) stops at a bound derived from the text."""
    settings = dataclasses.replace(greedy(), max_frames=None)
    short = list(engine.frames("Hi.", voice, "english", settings))
    longer = list(engine.frames("Hi. " * 10, voice, "english", settings))
    n_short = len(engine.tokenizer.encode("Hi."))
    assert len(short) == engine.max_frames_for(n_short)
    assert len(short) < len(longer) <= 8192


def test_prompt_save_load_gives_same_audio(engine, voice, tmp_path):
    path = tmp_path / "voice.safetensors"
    voice.save(path)
    loaded = VoicePrompt.load(path)
    assert torch.equal(torch.stack(list(engine.frames(TEXT, voice, "english", greedy(max_frames=8)))),
                       torch.stack(list(engine.frames(TEXT, loaded, "english", greedy(max_frames=8)))))
    a = engine.synthesize(TEXT, voice, "english", greedy(max_frames=8))
    b = engine.synthesize(TEXT, loaded, "english", greedy(max_frames=8))
    assert a.shape == b.shape and np.max(np.abs(a - b)) < WAVE_MAX_ABS


def test_reference_clip_any_rate_and_stereo(engine, ref_clip):
    import soxr

    stereo48 = np.stack([soxr.resample(ref_clip, 24000, 48000)] * 2, axis=1)
    prompt = engine.create_voice_prompt(stereo48, 48000, transcript=REF_TEXT)
    direct = engine.create_voice_prompt(ref_clip, 24000, transcript=REF_TEXT)
    assert prompt.ref_codes.shape == direct.ref_codes.shape
    agree = (prompt.ref_codes == direct.ref_codes).float().mean()
    assert agree > 0.5          # resampled twice, so not bit-equal; most codes agree


@pytest.mark.parametrize("text", ["", "   \n"])
def test_empty_text_is_refused(engine, voice, text):
    with pytest.raises(EmptyText):
        list(engine.stream(text, voice))


def test_unknown_language_is_refused(engine, voice):
    with pytest.raises(UnknownLanguage, match="klingon"):
        list(engine.stream(TEXT, voice, "klingon"))


def test_short_or_bad_reference_clip_is_refused(engine, ref_clip):
    with pytest.raises(InvalidAudio, match="at least"):
        engine.create_voice_prompt(ref_clip[:12000], 24000, transcript=REF_TEXT)
    with pytest.raises(InvalidAudio, match="empty"):
        engine.create_voice_prompt(np.zeros(0, np.float32), 24000, transcript=REF_TEXT)
    with pytest.raises(EmptyText, match="transcript"):
        engine.create_voice_prompt(ref_clip, 24000, transcript="")


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_checkpoint_missing_file(tiny_checkpoint, tmp_path):
    ck = copy_checkpoint(tiny_checkpoint, tmp_path / "ck")
    (ck / "speech_tokenizer" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="speech_tokenizer/model.safetensors"):
        Qwen3Engine.load(ck)


def test_checkpoint_corrupt_safetensors(tiny_checkpoint, tmp_path):
    ck = copy_checkpoint(tiny_checkpoint, tmp_path / "ck")
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Qwen3Engine.load(ck)


def test_checkpoint_config_mismatch(tiny_checkpoint, tmp_path):
    ck = copy_checkpoint(tiny_checkpoint, tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    cfg["talker_config"]["intermediate_size"] += 32
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        Qwen3Engine.load(ck)


def test_unreachable_repo_id_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="Qwen/Qwen3-TTS-12Hz-0.6B-Base") as err:
        Qwen3Engine.load("Qwen/Qwen3-TTS-12Hz-0.6B-Base")
    assert "--checkpoint" in str(err.value)


def test_fingerprint_tells_checkpoints_apart(tiny_checkpoint, tmp_path):
    from makima_tts.engine.checkpoint import fingerprint
    from makima_tts.testing.checkpoints import build_checkpoint

    other = build_checkpoint(tmp_path / "other", tiny=True, seed=7)
    assert fingerprint(tiny_checkpoint) == fingerprint(tiny_checkpoint)
    assert fingerprint(tiny_checkpoint) != fingerprint(other)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "makima_tts", *args], capture_output=True, text=True, timeout=300)


def test_cli_say_writes_wav(tiny_checkpoint, ref_clip, tmp_path):
    import soundfile as sf

    ref = tmp_path / "ref.wav"
    sf.write(ref, ref_clip, 24000)
    out = tmp_path / "out.wav"
    r = run_cli("say", TEXT, "--checkpoint", str(tiny_checkpoint), "--ref-audio", str(ref), "--ref-text", REF_TEXT,
                "-o", str(out), "--seed", "3", "--max-frames", "10", "--language", "english")
    assert r.returncode == 0, r.stderr
    wav, sr = sf.read(out)
    assert sr == 24000 and len(wav) == 10 * 1920 and np.abs(wav).max() > 0.01


def test_cli_say_reports_bad_clip(tiny_checkpoint, tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x00\x00not a wav")
    r = run_cli("say", TEXT, "--checkpoint", str(tiny_checkpoint), "--ref-audio", str(bad), "--ref-text", "x",
                "-o", str(tmp_path / "o.wav"))
    assert r.returncode == 2 and "INVALID_AUDIO" in r.stderr and "Traceback" not in r.stderr


def test_push_many_equals_each_push(engine):
    """Several streams at different points (no history, a short one, one past the attention window)
    decoded in one codec call get the audio each gets alone: same length, equal to float rounding."""
    from makima_tts.engine.codec import StreamingDecoder

    codec = engine.codec
    g = torch.Generator().manual_seed(3)
    codes = [torch.randint(0, codec.codebook_size, (100, 16), generator=g) for _ in range(3)]
    contexts = [None, codes[1][:5], codes[2][:80]]
    alone = [codec.streaming_decoder(c) for c in contexts]
    shared = [codec.streaming_decoder(c) for c in contexts]
    got, want = [[], [], []], [[], [], []]
    for t in range(0, 12, 2):
        for i in range(3):
            want[i].append(alone[i].push(codes[i][80 + t:82 + t]))
        for i, pcm in enumerate(StreamingDecoder.push_many(shared, [c[80 + t:82 + t] for c in codes])):
            got[i].append(pcm)
    for i in range(3):
        a, b = np.concatenate(got[i]), np.concatenate(want[i])
        assert a.shape == b.shape == (12 * 1920,)
        assert np.max(np.abs(a - b)) < WAVE_MAX_ABS
        assert shared[i].frames_decoded == alone[i].frames_decoded
    # a different frame count per stream: each still gets its own frames' audio
    mixed = StreamingDecoder.push_many(shared, [codes[0][:1], codes[1][:3], codes[2][:0]])
    assert [m.shape[0] for m in mixed] == [1920, 3 * 1920, 0]


def test_codec_precision_follows_the_path(tiny_checkpoint):
    """quantize="none" keeps the codec in float32; the default int8 path runs it in bfloat16 where the
    CPU has bfloat16 arithmetic; the encoder is not kept in memory."""
    from makima_tts.engine.codec import cpu_has_native_bf16

    exact = Qwen3Engine.load(tiny_checkpoint, quantize="none")
    assert exact.codec.decoder.dtype == torch.float32 and exact.load_info["codec_dtype"] == "float32"
    fast = Qwen3Engine.load(tiny_checkpoint)
    want = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert fast.codec.decoder.dtype == want and fast.codec.decoder.proj_first.dtype == want
    assert not hasattr(fast.codec, "encoder")
    forced = Qwen3Engine.load(tiny_checkpoint, codec_dtype="bfloat16")
    assert forced.codec.decoder.dtype == torch.bfloat16
    pcm = np.concatenate([c.pcm for c in forced.stream("Hello there.", forced.create_voice_prompt(
        np.sin(np.arange(72000) / 20).astype(np.float32) * 0.3, 24000, x_vector_only=True), "english",
        GenerationSettings.greedy_settings(max_frames=6))])
    assert pcm.dtype == np.float32 and pcm.size and pcm.size % 1920 == 0 and np.isfinite(pcm).all()


def test_a_kv_cache_takes_memory_only_as_it_is_written():
    """A KV cache is reserved for more positions than its rows have reached (8 streams x 4096 positions of
    one full-size layer here: 2 x 128 MB). Its memory is taken as it is written, it reads as zeros until
    then, and growing it keeps what was written."""
    from makima_tts.engine.model import KVCache
    from makima_tts.testing import proc_status_kb

    def rss() -> int:                            # bytes resident now
        return proc_status_kb("VmRSS") * 1024

    before = rss()
    kv = KVCache(rows=8, kv_heads=8, length=4096, head_dim=128, dtype=torch.float32, device="cpu")
    assert rss() - before < 32 * 2**20
    kv.k[:, :, :64] = 1.0                        # what a prefill of 64 positions writes (16 MB of keys)
    assert rss() - before < 64 * 2**20
    assert float(kv.k[:, :, 64:128].abs().sum()) == 0.0 and float(kv.k[:, :, :64].sum()) == 8 * 8 * 64 * 128
    kv.resize(9, 4160)
    assert kv.k.shape == (9, 8, 4160, 128) and float(kv.k[:8, :, :64].sum()) == 8 * 8 * 64 * 128
    assert float(kv.k[8].abs().sum()) == 0.0 and float(kv.v.abs().sum()) == 0.0


def test_default_float_dtype_follows_the_device():
    """dtype "auto" (the default of Qwen3Engine.load, the server and the CLI): float32 on the CPU (where
    the int8 path takes over), bfloat16 on CUDA, as the reference runs on a GPU; names still parse."""
    from makima_tts.engine.checkpoint import parse_dtype

    assert parse_dtype("auto", torch.device("cpu")) == torch.float32
    assert parse_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert parse_dtype("float16", torch.device("cuda")) == torch.float16
    with pytest.raises(ValueError):
        parse_dtype("int8", torch.device("cpu"))


def test_prompt_special_tokens_are_projected_once(tiny_checkpoint, ref_clip):
    """The prompt's fixed text tokens (tts bos/eos/pad, the role) go through the text MLP once per talker:
    a later prompt projects only its own text, and comes out the same as the first."""
    engine = Qwen3Engine.load(tiny_checkpoint)
    voice = engine.create_voice_prompt(ref_clip, 24000, transcript=REF_TEXT)
    rows = []
    hook = engine.talker.text_projection.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[1]))
    try:
        first = engine.plan(TEXT, voice, "english", greedy(), None).prompt
        calls_first = len(rows)
        rows.clear()
        again = engine.plan(TEXT, voice, "english", greedy(), None).prompt
    finally:
        hook.remove()
    assert calls_first >= 3 and len(rows) == 1        # only the reference transcript + the text
    assert torch.equal(first.embeds, again.embeds) and torch.equal(first.trailing, again.trailing)
