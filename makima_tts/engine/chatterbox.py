"""Chatterbox-Turbo from its official ONNX export (ResembleAI/chatterbox-turbo-ONNX), streamed.

The export is four ONNX graphs under `onnx/` plus the tokenizer (tokenizer.json) beside them:

* `speech_encoder`: audio_values (1, samples) float at 24 kHz -> audio_features (1, n, hidden: T3's conditioning,
  here cond_emb), audio_tokens (1, t) int64 (the prompt tokens), speaker_embeddings (1, 192), speaker_features
  (1, f, 80), read in that order: a voice, computed once per clip.
* `embed_tokens`: input_ids (1, s) int64 -> inputs_embeds (1, s, hidden). The first step takes the
  tokenizer's ids, later steps the last speech token.
* `language_model`: inputs_embeds, attention_mask, position_ids and past_key_values.N.key/value
  (1, kv_heads, past, head_dim) -> logits over the 6563 speech tokens and present.N.key/value.
* `conditional_decoder`: speech_tokens (the voice's prompt tokens, then the generated ones), speaker_embeddings,
  speaker_features -> the waveform of the generated tokens (960 samples per token, 24 kHz).

Each graph comes in variants chosen by `dtype`: fp32 (`name.onnx`), fp16 (`name_fp16.onnx`), q8
(`name_quantized.onnx`), q4 (`name_q4.onnx`), q4f16 (`name_q4f16.onnx`), weights in `<file>_data`.
The loop is the model card's: the conditioning embeddings, then the text's, one forward pass, then one
speech token at a time with the KV cache, until STOP_SPEECH (6562); the cache after a voice's conditioning
positions is computed once per voice and reused (voice_prefix), so an utterance's first pass runs its text
only. Input and output names, the cache's shape and the float type of each input are read from the graphs.

Streaming: the conditional decoder has no state to carry, so each chunk decodes a window, the chunk's
new tokens with LEFT_CONTEXT tokens before them, and holds back HOLD_TOKENS at the end until the tokens
after them are known (S3Gen's encoder looks 3 tokens ahead and attends across the window); consecutive windows are cross-faded over
CROSSFADE_SAMPLES. How the chunked waveform differs from decoding all tokens at once is measured in
tests/test_chatterbox.py (see CHUNK_BOUND there).

Voice cloning (create_voice_prompt): the clip, mono at 24 kHz, its first MAX_REF_SECONDS kept, is normalised
to TARGET_LUFS (-27 LUFS integrated loudness, ITU-R BS.1770-4 as pyloudnorm measures it at 24 kHz) before the
speech encoder, as the reference package's `ChatterboxTurboTTS.prepare_conditionals` does by default
(`norm_loudness=True`, same library, same target, same 24 kHz clip), so a clip recorded quietly or loudly
gives the same voice. Where the gain is not a finite positive number the clip is kept as it is, as the package
does: a silent clip, or one whose every 400 ms block is below BS.1770's -70 LUFS gate, measures -inf (its gain
would be infinite). The package measures the whole clip it is given; the engine measures the part it uses
(the first 15 s), the same for clips up to 15 s. The ONNX example in the export's model card
(ResembleAI/chatterbox-turbo-ONNX) feeds `librosa.load(path, sr=24000)` to the speech encoder without
normalising (so do ports of it, and transformers.js' ChatterboxFeatureExtractor passes the samples unchanged);
normalising is idempotent (a clip already at -27 LUFS gets a gain of 1 to float rounding), so it is harmless
should a graph normalise again. See `loudness_gain`. How a clip is prepared (VOICE_PREP) is part of the
fingerprint, so voice prompts saved before this normalisation are computed again, not loaded.

English only; voices are cloned from a clip (no transcript needed). Needs `onnxruntime`, `tokenizers` and
`pyloudnorm` (the `chatterbox` extra).
"""
from __future__ import annotations

import hashlib
import math
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np

from ..audio import prepare_reference
from ..errors import CheckpointError, CloningUnsupported, EmptyText, EngineUnavailable, UnknownLanguage, \
    VoiceNotFound
from ..fileio import hash_samples
from ..text import split_sentences
from .types import LANGUAGES, AudioChunk, CancelToken, GenerationSettings, GenerationStats, SamplingParams, \
    VoiceInfo, VoicePrompt

__all__ = ["ChatterboxEngine", "is_chatterbox_export", "loudness_gain", "normalise_loudness", "DTYPES", "GRAPHS",
           "TARGET_LUFS"]

SAMPLE_RATE = 24000
TOKEN_SAMPLES = 960                 # 25 speech tokens per second
START_SPEECH_TOKEN = 6561
STOP_SPEECH_TOKEN = 6562
SPEECH_TOKENS = 6561                # tokens the decoder takes (0..6560)
SILENCE_TOKEN = 4299
TAIL_SILENCE = 3                    # silence tokens after the last one, as the reference does
GRAPHS = ("speech_encoder", "embed_tokens", "language_model", "conditional_decoder")
DTYPES = {"fp32": "", "fp16": "_fp16", "q8": "_quantized", "q4": "_q4", "q4f16": "_q4f16"}
MAX_REF_SECONDS = 15.0              # the reference uses at most 15 s of the clip
TARGET_LUFS = -27.0                 # the reference's norm_loudness target for the clip
MAX_SENTENCE_CHARS = 300
MAX_NEW_TOKENS = 1000               # the reference's max_gen_len
# streaming windows (in speech tokens, 40 ms each)
LEFT_CONTEXT = 12
HOLD_TOKENS = 4
CROSSFADE_SAMPLES = 480             # 20 ms
PREFIX_CACHE_VOICES = 4             # voices whose conditioning prefix the language model's cache keeps

_ENGLISH = {"auto", "english", "en", "en-us", "en_us", "en-gb", "en_gb"}
_HINT = "Chatterbox-Turbo speaks English only; for other languages run the Qwen3-TTS engine (--engine qwen3)"

DEFAULTS = GenerationSettings(
    talker=SamplingParams(do_sample=True, temperature=0.8, top_k=1000, top_p=0.95, repetition_penalty=1.2),
    predictor=SamplingParams(), first_chunk_frames=8, chunk_frames=24)


def loudness_gain(wav: np.ndarray, sample_rate: int = SAMPLE_RATE, target_lufs: float = TARGET_LUFS) -> float:
    """The linear gain that brings a mono float clip to `target_lufs` integrated loudness, as the reference
    package's `ChatterboxTurboTTS.norm_loudness` computes it (pyloudnorm's BS.1770-4 meter at the clip's rate,
    10 ** ((target - loudness) / 20)); 1.0, the clip kept as it is as there, where that gain is not a finite
    positive number (a silent clip, or one below the -70 LUFS absolute gate throughout, measures -inf) or the
    meter cannot measure the clip (shorter than its 400 ms block)."""
    import pyloudnorm

    try:
        loudness = pyloudnorm.Meter(sample_rate).integrated_loudness(wav)
        gain = 10.0 ** ((target_lufs - loudness) / 20.0)
    except (ValueError, OverflowError):
        return 1.0
    return gain if math.isfinite(gain) and gain > 0.0 else 1.0


def normalise_loudness(wav: np.ndarray, sample_rate: int = SAMPLE_RATE,
                       target_lufs: float = TARGET_LUFS) -> tuple[np.ndarray, float]:
    """(the clip times loudness_gain, that gain): the package's `wav * gain_linear` in float32 (as NumPy 1, which
    the package requires on Python < 3.13, computes a float32 clip times a float64 scalar); the same array where
    the gain is 1.0. Not limited: a loud peak may end above 1.0, as in the package."""
    gain = loudness_gain(wav, sample_rate, target_lufs)
    return (wav if gain == 1.0 else wav * np.float32(gain)), gain


def _onnx_dir(folder: Path) -> Path:
    return folder / "onnx"


def is_chatterbox_export(path: Union[str, os.PathLike]) -> bool:
    """Whether `path` is a folder in the Chatterbox-Turbo ONNX layout (onnx/ with the four graphs in
    some variant). Looks at file names only."""
    onnx_dir = _onnx_dir(Path(path))
    if not onnx_dir.is_dir():
        return False
    names = {p.name for p in onnx_dir.glob("*.onnx")}
    return all(any(f"{g}{s}.onnx" in names for s in DTYPES.values()) for g in GRAPHS)


def _resolve(checkpoint: Union[str, os.PathLike], dtype: str) -> Path:
    path = Path(os.path.expanduser(str(checkpoint)))
    if path.is_dir():
        return path
    text = str(checkpoint)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise CheckpointError("the Chatterbox export folder does not exist (--checkpoint: a folder with onnx/ "
                              "or a Hugging Face repo id such as ResembleAI/chatterbox-turbo-ONNX)")
    patterns = ["*.json", "*.txt"]
    for d in ([dtype] if dtype in DTYPES else list(DTYPES)):
        patterns += [f"onnx/*{DTYPES[d]}.onnx", f"onnx/*{DTYPES[d]}.onnx_data"]
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=text, allow_patterns=patterns))
    except Exception as exc:
        raise CheckpointError(
            f"could not fetch the Hugging Face repo {text!r} ({type(exc).__name__}). Without network access, "
            f"download it elsewhere (`huggingface-cli download {text} --local-dir DIR`), copy DIR here and pass "
            "--checkpoint DIR") from exc


def _graph_path(folder: Path, name: str, dtype: str) -> Optional[Path]:
    path = _onnx_dir(folder) / f"{name}{DTYPES[dtype]}.onnx"
    return path if path.is_file() else None


# how create_voice_prompt prepares a clip, part of the fingerprint: voice prompts saved by an engine that
# prepared clips otherwise (before the loudness normalisation) are computed again, not loaded
VOICE_PREP = b"reference clip: 24 kHz, first 15 s, -27 LUFS (pyloudnorm)"


def _fingerprint(paths: list[Path], tokenizer: Path) -> str:
    """A short id of the export's graphs and tokenizer (each graph file, and its weights' size and samples) and
    of how a clip becomes a voice (VOICE_PREP)."""
    h = hashlib.sha256(tokenizer.read_bytes())
    h.update(VOICE_PREP)
    for path in paths:
        h.update(path.name.encode())
        h.update(path.read_bytes())
        data = path.with_name(path.name + "_data")
        if data.is_file():
            hash_samples(h, data, 8)
    return h.hexdigest()[:16]


_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32}


class _Graph:
    """An InferenceSession that takes and gives numpy arrays, casting each input to the type the graph
    declares (an fp16 graph takes float16) and float outputs to float32."""

    def __init__(self, session, name: str):
        self.session = session
        self.name = name
        self.inputs = {i.name: i for i in session.get_inputs()}
        self.input_types = {i.name: _NP_TYPES.get(i.type, np.float32) for i in session.get_inputs()}
        self.output_names = [o.name for o in session.get_outputs()]

    def run(self, feeds: dict, raw: bool = False) -> list[np.ndarray]:
        """raw: the outputs as the graph gives them (a float16 KV cache goes back in as it came out)."""
        cast = {k: np.ascontiguousarray(v, dtype=self.input_types[k]) for k, v in feeds.items()}
        outs = self.session.run(None, cast)
        return outs if raw else [o.astype(np.float32) if o.dtype == np.float16 else o for o in outs]


class ChatterboxEngine:
    """SpeechEngine for the Chatterbox-Turbo ONNX export. Build with `ChatterboxEngine.load()`."""

    name = "chatterbox"
    sample_rate = SAMPLE_RATE
    supports_cloning = True
    batched = False                 # each stream runs the graphs on its own (GET /ready's `batched`)
    languages = ("auto", "english")  # what `ready` offers (the /speak page's picker); others are refused

    def __init__(self, folder: Path, graphs: dict, tokenizer, dtype: str, model_id: str, fingerprint: str,
                 providers: list[str], load_s: float = 0.0):
        self.folder = folder
        self.graphs = graphs
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.model_id = model_id
        self.fingerprint = fingerprint
        self.providers = providers
        self.defaults = DEFAULTS
        lm = graphs["language_model"]
        self._past = [n for n in lm.inputs if n.startswith("past_key_values")]
        shape = lm.inputs[self._past[0]].shape if self._past else [1, 16, 0, 64]
        self.kv_heads = shape[1] if isinstance(shape[1], int) else 16
        self.head_dim = shape[3] if isinstance(shape[3], int) else 64
        self.load_info = {"dtype": dtype, "load_s": round(load_s, 3), "providers": providers}
        # the conditioning prefix of the last few voices (voice_prefix); at full size 196 KB per position in
        # float32, so a 15 s clip's 376 positions hold 74 MB
        self.prefix_cache_size = PREFIX_CACHE_VOICES
        self._prefixes: OrderedDict = OrderedDict()
        self._prefix_lock = threading.Lock()
        self.prefix_computations = 0
        self.prefilled_positions = 0       # positions run through the language model's first step, summed

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, checkpoint: Union[str, os.PathLike], dtype: str = "auto", *, threads: Optional[int] = None,
             device: str = "cpu") -> "ChatterboxEngine":
        """Load an export folder (or fetch a Hugging Face repo id). `dtype`: fp32, fp16, q8, q4, q4f16 or
        auto (on the CPU: q4 where the export has it, else fp32; on CUDA: fp16, else fp32)."""
        t0 = time.perf_counter()
        try:
            import onnxruntime as ort
            import pyloudnorm  # noqa: F401  (create_voice_prompt's loudness normalisation)
            from tokenizers import Tokenizer
        except ImportError as e:
            raise EngineUnavailable(f"the Chatterbox engine needs onnxruntime, tokenizers and pyloudnorm ({e}): "
                                    "pip install 'makima-tts[chatterbox]'") from e
        if dtype != "auto" and dtype not in DTYPES:
            raise CheckpointError(f"unknown Chatterbox dtype {dtype!r}; use auto or one of: {', '.join(DTYPES)}")
        folder = _resolve(checkpoint, dtype)
        if not is_chatterbox_export(folder):
            raise CheckpointError("the folder is not a Chatterbox-Turbo ONNX export (expected onnx/ with "
                                  f"{', '.join(GRAPHS)})")
        cuda = device.startswith("cuda")
        order = [dtype] if dtype != "auto" else (["fp16", "fp32"] if cuda else ["q4", "fp32"])
        paths: dict[str, Path] = {}
        for name in GRAPHS:
            found = next((p for d in order if (p := _graph_path(folder, name, d)) is not None), None)
            if found is None:
                raise CheckpointError(f"the export has no {name} graph in {' or '.join(order)}")
            paths[name] = found
        tok_path = folder / "tokenizer.json"
        if not tok_path.is_file():
            raise CheckpointError("the export has no tokenizer.json")
        available = ort.get_available_providers()
        providers = (["CUDAExecutionProvider"] if cuda and "CUDAExecutionProvider" in available else []) + \
            ["CPUExecutionProvider"]
        graphs = {}
        try:
            for name, path in paths.items():
                opts = ort.SessionOptions()
                if threads:
                    opts.intra_op_num_threads = int(threads)
                    opts.inter_op_num_threads = 1
                graphs[name] = _Graph(ort.InferenceSession(str(path), sess_options=opts, providers=providers), name)
            tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as e:
            raise CheckpointError(f"cannot load the Chatterbox export ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200] if str(e) else ''})") from e
        used = sorted({next((d for d, s in DTYPES.items() if p.name == f"{n}{s}.onnx"), "?")
                       for n, p in paths.items()})
        fp = _fingerprint([paths["speech_encoder"], paths["embed_tokens"], paths["language_model"]], tok_path)
        model_id = str(checkpoint)
        return cls(folder, graphs, tokenizer, "+".join(used), model_id, fp, providers,
                   load_s=time.perf_counter() - t0)

    # ------------------------------------------------------------------ protocol

    def builtin_voices(self) -> list[VoiceInfo]:
        return []

    def create_voice_prompt(self, audio: np.ndarray, sample_rate: int, transcript: Optional[str] = None,
                            x_vector_only: bool = False) -> VoicePrompt:
        """A reference clip -> the speech encoder's conditionals, as a VoicePrompt (no transcript needed). The clip
        (at 24 kHz, its first MAX_REF_SECONDS) is normalised to TARGET_LUFS first, as the reference package does
        (see loudness_gain and the module docstring); the gain applied is in meta["loudness_gain_db"]
        (0.0 where the clip was kept as it is, e.g. silence)."""
        if x_vector_only:
            raise CloningUnsupported("the Chatterbox engine has no x-vector-only mode: it clones from the clip "
                                     "itself; add the voice without x_vector_only (a transcript is not needed)")
        wav = prepare_reference(audio, sample_rate, SAMPLE_RATE)[:int(MAX_REF_SECONDS * SAMPLE_RATE)]
        wav, gain = normalise_loudness(wav)
        import torch

        cond_emb, prompt_token, spk_emb, spk_feat = self.graphs["speech_encoder"].run(
            {"audio_values": wav[None, :]})[:4]
        return VoicePrompt(speaker_embedding=torch.from_numpy(np.ascontiguousarray(spk_emb, dtype=np.float32)),
                           ref_text=transcript, fingerprint=self.fingerprint,
                           meta={"engine": self.name, "ref_seconds": round(len(wav) / SAMPLE_RATE, 3),
                                 "loudness_gain_db": round(20.0 * math.log10(gain), 2)},
                           tensors={"cond_emb": torch.from_numpy(np.ascontiguousarray(cond_emb)),
                                    "prompt_token": torch.from_numpy(np.ascontiguousarray(prompt_token, np.int64)),
                                    "speaker_features": torch.from_numpy(np.ascontiguousarray(spk_feat))})

    def _voice(self, voice) -> VoicePrompt:
        if voice is None:
            raise VoiceNotFound("the Chatterbox engine has no built-in voice: name a cloned voice (or add one from "
                                "a clip)")
        if isinstance(voice, str):
            raise VoiceNotFound(f"voice {voice!r} is not a cloned voice; the Chatterbox engine has no built-in voices")
        if not isinstance(voice, VoicePrompt) or voice.engine != self.name or \
                not {"cond_emb", "prompt_token", "speaker_features"} <= set(voice.tensors or {}):
            made_by = getattr(voice, "engine", "another")
            raise VoiceNotFound(f"this voice was prepared for the {made_by} engine, not for Chatterbox; prepare it "
                                "again from its clip (the voice library does that on first use)")
        if voice.fingerprint and voice.fingerprint != self.fingerprint:
            raise VoiceNotFound("this voice was prepared with another Chatterbox export; prepare it again from its "
                                "clip (the voice library does that on first use)")
        return voice

    @staticmethod
    def check_language(language: Optional[str]) -> None:
        lang = str(language or "auto").strip().lower()
        if lang in _ENGLISH:
            return
        if lang in LANGUAGES:
            raise UnknownLanguage(f"the Chatterbox engine speaks English only, not {language}; {_HINT}")
        raise UnknownLanguage(f"unknown language {language!r}; the Chatterbox engine speaks English (or auto)")

    def stream(self, text: str, voice: Union[str, object, None] = None, language: str = "auto",
               settings: Optional[GenerationSettings] = None, cancel: Optional[CancelToken] = None,
               stats: Optional[GenerationStats] = None) -> Iterator[AudioChunk]:
        """Yield float32 AudioChunks as the speech tokens come (see the module docstring), the last with
        is_last=True. Input errors are raised by this call, before any audio. `cancel` stops the stream
        before its next token. A frame (`max_frames`, `first_chunk_frames`, `chunk_frames`) is one speech
        token, 40 ms."""
        if text is None or not str(text).strip():
            raise EmptyText("text is empty")
        self.check_language(language)
        prompt = self._voice(voice)
        sentences = split_sentences(str(text), max_chars=MAX_SENTENCE_CHARS)
        if not sentences:
            raise EmptyText("text has nothing to speak (only punctuation or whitespace)")
        return self._generate(sentences, prompt, settings or self.defaults, cancel, stats)

    # ------------------------------------------------------------------ generation

    def max_tokens_for(self, n_text_tokens: int) -> int:
        return max(16, min(MAX_NEW_TOKENS, 60 + 12 * n_text_tokens))

    def text_ids(self, text: str) -> np.ndarray:
        return np.asarray([self.tokenizer.encode(normalise_text(text)).ids], dtype=np.int64)

    def speech_tokens(self, text: str, prompt: VoicePrompt, settings: Optional[GenerationSettings] = None,
                      cancel: Optional[CancelToken] = None, stats: Optional[GenerationStats] = None,
                      t0: Optional[float] = None) -> Iterator[int]:
        """The language model's speech tokens for one sentence, one at a time, STOP_SPEECH not included."""
        settings = settings or self.defaults
        params = settings.talker
        rng = np.random.default_rng(settings.seed)
        embed, lm = self.graphs["embed_tokens"], self.graphs["language_model"]
        ids = self.text_ids(text)
        limit = int(settings.max_frames) if settings.max_frames else self.max_tokens_for(ids.shape[1])
        t0 = time.perf_counter() if t0 is None else t0
        start = time.perf_counter()
        x = embed.run({"input_ids": ids})[0]
        if self.prefix_cache_size > 0:       # the voice's conditioning positions from the cache: only the text runs
            past, n = self.voice_prefix(prompt)
        else:
            past, n = self._empty_past(), 0
            x = np.concatenate([prompt.tensors["cond_emb"].numpy().astype(np.float32), x], axis=1)
        mask = np.ones((1, n + x.shape[1]), dtype=np.int64)
        pos = np.arange(n, n + x.shape[1], dtype=np.int64)[None]
        self.prefilled_positions += x.shape[1]
        history = [START_SPEECH_TOKEN]
        for step in range(limit):
            if cancel is not None and cancel.cancelled:
                return
            logits, *present = lm.run({"inputs_embeds": x, "attention_mask": mask, "position_ids": pos, **past},
                                      raw=True)
            token = pick(logits[0, -1].astype(np.float64), history, params, rng)
            if stats is not None:
                if step == 0:
                    stats.prefill_s += time.perf_counter() - start
                else:
                    stats.talker_s += time.perf_counter() - start
            if token == STOP_SPEECH_TOKEN:
                return
            if step == 0:
                history = []
            history.append(token)
            yield token
            start = time.perf_counter()
            past = dict(zip(self._past, present))
            mask = np.ones((1, mask.shape[1] + 1), dtype=np.int64)
            pos = pos[:, -1:] + 1
            x = embed.run({"input_ids": np.asarray([[token]], dtype=np.int64)})[0]

    def _empty_past(self) -> dict:
        lm = self.graphs["language_model"]
        return {n: np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=lm.input_types[n]) for n in self._past}

    def voice_prefix(self, prompt: VoicePrompt) -> tuple[dict, int]:
        """The language model's cache after the voice's conditioning embeddings (the positions every utterance
        in that voice starts with), computed once and kept for the last `prefix_cache_size` voices. Causal
        attention: the same keys and values a whole prefill computes for those positions."""
        cond = np.ascontiguousarray(prompt.tensors["cond_emb"].numpy(), dtype=np.float32)
        key = hashlib.sha1(cond.tobytes()).hexdigest()
        with self._prefix_lock:
            hit = self._prefixes.get(key)
            if hit is not None:
                self._prefixes.move_to_end(key)
                return hit
        n = cond.shape[1]
        _, *present = self.graphs["language_model"].run({
            "inputs_embeds": cond, "attention_mask": np.ones((1, n), dtype=np.int64),
            "position_ids": np.arange(n, dtype=np.int64)[None], **self._empty_past()}, raw=True)
        entry = (dict(zip(self._past, present)), n)
        with self._prefix_lock:
            self.prefix_computations += 1
            self._prefixes[key] = entry
            while len(self._prefixes) > self.prefix_cache_size:
                self._prefixes.popitem(last=False)
        return entry

    def prepare_voice(self, prompt: VoicePrompt) -> VoicePrompt:
        """The voice's one-time work now (its conditioning prefix), not on its first utterance; the voice
        library calls this when it loads a prompt. Returns the same voice."""
        if self.prefix_cache_size > 0 and isinstance(prompt, VoicePrompt) and "cond_emb" in (prompt.tensors or {}):
            self.voice_prefix(prompt)
        return prompt

    def decode(self, tokens: list[int], prompt: VoicePrompt) -> np.ndarray:
        """The waveform of `tokens` (speech tokens < 6561) in one decoder call, as the model card does."""
        feeds = {"speech_tokens": np.concatenate([prompt.tensors["prompt_token"].numpy().astype(np.int64),
                                                  np.asarray([tokens], dtype=np.int64)], axis=1),
                 "speaker_embeddings": prompt.speaker_embedding.numpy(),
                 "speaker_features": prompt.tensors["speaker_features"].numpy()}
        return self.graphs["conditional_decoder"].run(feeds)[0][0].astype(np.float32)

    def decode_whole(self, tokens: list[int], prompt: VoicePrompt) -> np.ndarray:
        """All tokens at once, with the trailing silence: the reference for the chunked decode."""
        return self.decode([t for t in tokens if t < SPEECH_TOKENS] + [SILENCE_TOKEN] * TAIL_SILENCE, prompt)

    def _generate(self, sentences: list[str], prompt: VoicePrompt, settings: GenerationSettings,
                  cancel: Optional[CancelToken], stats: Optional[GenerationStats]) -> Iterator[AudioChunk]:
        t0 = time.perf_counter()
        index = 0
        frames = 0
        for n, sentence in enumerate(sentences):
            last_sentence = n == len(sentences) - 1
            decoder = ChunkedDecoder(self, prompt)
            first = max(1, int(settings.first_chunk_frames))
            every = max(1, int(settings.chunk_frames))
            next_at = first + HOLD_TOKENS
            for token in self.speech_tokens(sentence, prompt, settings, cancel, stats, t0):
                if token < SPEECH_TOKENS:
                    decoder.add(token)
                if len(decoder.tokens) >= next_at:
                    t1 = time.perf_counter()
                    pcm, first_token, count = decoder.chunk(final=False)
                    if stats is not None:
                        stats.decode_s += time.perf_counter() - t1
                    next_at = len(decoder.tokens) + every
                    if len(pcm):
                        if stats is not None and stats.ttfa_s is None:
                            stats.ttfa_s = time.perf_counter() - t0
                        yield AudioChunk(pcm, SAMPLE_RATE, index, frames + first_token, count, False)
                        index += 1
            if cancel is not None and cancel.cancelled:
                return
            t1 = time.perf_counter()
            pcm, first_token, count = decoder.chunk(final=True)
            if stats is not None:
                stats.decode_s += time.perf_counter() - t1
                if stats.ttfa_s is None:
                    stats.ttfa_s = time.perf_counter() - t0
            yield AudioChunk(pcm, SAMPLE_RATE, index, frames + first_token, count, last_sentence)
            index += 1
            frames += len(decoder.tokens)
        if stats is not None:
            stats.frames = frames
            stats.total_s = time.perf_counter() - t0


class ChunkedDecoder:
    """Decodes a growing token sequence window by window (see the module docstring)."""

    def __init__(self, engine: ChatterboxEngine, prompt: VoicePrompt, left: int = LEFT_CONTEXT,
                 hold: int = HOLD_TOKENS, crossfade: int = CROSSFADE_SAMPLES):
        self.engine = engine
        self.prompt = prompt
        self.left, self.hold, self.crossfade = left, hold, crossfade
        self.tokens: list[int] = []
        self.done = 0                        # tokens whose audio is out (less the cross-fade tail)
        self.tail: Optional[np.ndarray] = None

    def add(self, token: int) -> None:
        self.tokens.append(int(token))

    def chunk(self, final: bool) -> tuple[np.ndarray, int, int]:
        """(pcm, first token, tokens) of the audio now known; final: everything, with the tail silence."""
        end = len(self.tokens)
        upto = end if final else end - self.hold
        if not final and upto <= self.done:
            return np.zeros(0, np.float32), self.done, 0
        start = max(0, self.done - self.left)
        window = self.tokens[start:end] + ([SILENCE_TOKEN] * TAIL_SILENCE if final else [])
        wav = self.engine.decode(window, self.prompt)
        offset = (self.done - start) * TOKEN_SAMPLES
        stop = len(wav) if final else (upto - start) * TOKEN_SAMPLES
        pcm = wav[offset:stop].copy()
        if self.tail is not None and len(self.tail):
            n = min(len(self.tail), len(pcm))
            ramp = (np.arange(n, dtype=np.float32) + 0.5) / n
            pcm[:n] = self.tail[:n] * (1.0 - ramp) + pcm[:n] * ramp
        self.tail = None if final else wav[stop:stop + self.crossfade].copy()
        first, count = self.done, upto - self.done
        self.done = upto
        return pcm.astype(np.float32), first, count


def pick(logits: np.ndarray, history: list[int], params: SamplingParams, rng: np.random.Generator) -> int:
    """The next speech token. Greedy: the repetition penalty, then the arg max (the model card's loop).
    Sampling: temperature, top-k, top-p, repetition penalty, in the reference's order, then a draw."""
    scores = logits.copy()
    penalty = float(params.repetition_penalty or 1.0)

    def penalise(s: np.ndarray) -> np.ndarray:
        if penalty != 1.0 and history:
            idx = np.unique(np.asarray(history, dtype=np.int64))
            idx = idx[idx < len(s)]
            v = s[idx]
            s[idx] = np.where(v < 0, v * penalty, v / penalty)
        return s

    if not params.do_sample:
        return int(np.argmax(penalise(scores)))
    temperature = float(params.temperature or 1.0)
    if temperature > 0 and temperature != 1.0:
        scores = scores / temperature
    k = int(params.top_k or 0)
    if 0 < k < len(scores):
        kth = np.partition(scores, -k)[-k]
        scores = np.where(scores < kth, -np.inf, scores)
    top_p = float(params.top_p if params.top_p is not None else 1.0)
    if top_p < 1.0:
        order = np.argsort(scores)                      # ascending, as transformers' TopPLogitsWarper
        probs = np.exp(scores[order] - np.max(scores))
        probs /= probs.sum()
        remove = np.cumsum(probs) <= (1 - top_p)
        remove[-1] = False
        scores[order[remove]] = -np.inf
    scores = penalise(scores)
    finite = np.isfinite(scores)
    if not finite.any():
        return STOP_SPEECH_TOKEN
    p = np.exp(scores - np.max(scores[finite]))
    p[~finite] = 0.0
    p /= p.sum()
    return int(rng.choice(len(p), p=p))


_PUNCT = [("…", ", "), (":", ","), ("—", "-"), ("–", "-"), (" ,", ","), ("“", "\""), ("”", "\""),
          ("‘", "'"), ("’", "'")]


def normalise_text(text: str) -> str:
    """The reference's punctuation clean-up: a capital first letter, single spaces, common typographic
    punctuation replaced, and a full stop when the text ends without one."""
    text = " ".join(str(text).split())
    if not text:
        return text
    if text[0].islower():
        text = text[0].upper() + text[1:]
    for old, new in _PUNCT:
        text = text.replace(old, new)
    text = text.rstrip(" ")
    if not text.endswith((".", "!", "?", "-", ",")):
        text += "."
    return text
