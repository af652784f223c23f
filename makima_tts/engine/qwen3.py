"""The Qwen3-TTS-12Hz engine: load a checkpoint, clone a voice, stream speech.

    engine = Qwen3Engine.load("Qwen/Qwen3-TTS-12Hz-0.6B-Base")      # or a local folder
    voice = engine.create_voice_prompt(wav, sr, transcript="...")
    for chunk in engine.stream("Hello there.", voice, language="english"):
        play(chunk.pcm)                                              # float32, 24 kHz

Each 80 ms frame of codec tokens is decoded as soon as it exists (the codec's
streaming decoder keeps the state it needs), and chunks leave after
`first_chunk_frames` frames, then every `chunk_frames`.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from ..audio import prepare_reference  # the one clip policy (also imported from here)
from ..errors import EmptyText
from .checkpoint import Checkpoint, fingerprint, load_talker, parse_device, parse_dtype
from .codec import Codec, decoder_dtype_for
from .generate import (FrameGenerator, Prefix, Prompt, Row, SpecialIds, TextFeed, build_prompt, compute_prefix,
                       generate_frames, tokens_needed, voice_prefix_length)
from .model import Talker
from .speaker import SpeakerEncoder
from .tokenizer import TextTokenizer
from .weights import SafetensorsFile
from .types import AudioChunk, check_language, CancelToken, GenerationSettings, GenerationStats, SamplingParams, VoiceInfo, VoicePrompt

SAMPLE_RATE = 24000


def default_weights_cache() -> Path:
    """Where quantized weights are kept between starts: MAKIMA_TTS_WEIGHTS_CACHE, else the user's
    cache folder (~/.cache/makima-tts/weights on Linux)."""
    env = os.environ.get("MAKIMA_TTS_WEIGHTS_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("makima-tts")) / "weights"


def _speaker_tensors(ck: Checkpoint) -> dict[str, torch.Tensor]:
    """The speaker encoder's tensors, read into memory of their own (not mapped from the checkpoint)."""
    f = SafetensorsFile(ck.folder / "model.safetensors")
    return {k[len("speaker_encoder."):]: f.read(k) for k in f.keys() if k.startswith("speaker_encoder.")}


def _chat(text: str) -> str:
    return f"<|im_start|>assistant\n{text}<|im_end|>\n<|im_start|>assistant\n"


def _ref_chat(text: str) -> str:
    return f"<|im_start|>assistant\n{text}<|im_end|>\n"


class ChunkCutter:
    """Frames of codes in, AudioChunks out through a streaming codec decoder: the first chunk after
    `first_chunk_frames` frames, then chunks twice as long as the one before up to `chunk_frames` (1, 2,
    4, 6, 6, ...: the first audio leaves after one frame, and each chunk is ready before the audio
    before it has played out as long as generation keeps up with real time; larger chunks cost less
    codec time per frame); `finish()` gives the last (is_last), which
    carries the decoder's tail and may hold no new frame. Fills its GenerationStats: decode_s, ttfa_s, frames, total_s.

    Alone (`decode_chunks`), `push` decodes each chunk's frames in one call. The batched scheduler
    instead `add`s frames, decodes the codes of every row that is `due` in one shared codec call
    (`StreamingDecoder.push_many`) and hands each row its samples with `decoded`; the chunks are the
    same either way."""

    def __init__(self, decoder, settings: GenerationSettings, stats: GenerationStats, t_start: float):
        self.decoder, self.stats, self.t_start = decoder, stats, t_start
        self.codes: list[torch.Tensor] = []       # frames not decoded yet
        self.pcm: list[np.ndarray] = []           # decoded samples not sent yet
        self.buffered = 0                         # frames in self.pcm
        self.taken = 0                            # frames in the codes last taken
        self.index = self.frame_index = 0
        self.want = max(1, settings.first_chunk_frames)
        self.then = max(1, settings.chunk_frames)

    def push(self, frame: torch.Tensor) -> Optional[AudioChunk]:
        self.add(frame)
        if not self.due():
            return None
        t0 = time.perf_counter()
        with torch.inference_mode():
            pcm = self.decoder.push(self.take_codes())
        return self.decoded(pcm, time.perf_counter() - t0)

    def add(self, frame: torch.Tensor) -> None:
        self.codes.append(frame)

    def due(self, every: Optional[int] = None) -> bool:
        """Whether to decode now: the current chunk is complete, or (`every`) that many frames wait."""
        n = len(self.codes)
        return n > 0 and (n >= self.want - self.buffered or (every is not None and n >= every))

    def take_codes(self) -> torch.Tensor:
        """The waiting frames (never past the current chunk's end) as (n, 16) codes to decode."""
        n = min(len(self.codes), self.want - self.buffered)
        taken, self.codes = self.codes[:n], self.codes[n:]
        self.taken = n
        return torch.stack(taken)

    def decoded(self, pcm: np.ndarray, seconds: float) -> Optional[AudioChunk]:
        """The samples of the codes last taken; the chunk when it is complete."""
        self.stats.decode_s += seconds
        self.pcm.append(pcm)
        self.buffered += self.taken
        if self.buffered < self.want:
            return None
        self.want = min(self.then, 2 * self.want)
        return self._emit(last=False)

    def finish(self) -> AudioChunk:
        t0 = time.perf_counter()
        with torch.inference_mode():
            if self.codes:
                codes, self.codes = torch.stack(self.codes), []
                self.pcm.append(self.decoder.push(codes))
                self.buffered += codes.shape[0]
            self.pcm.append(self.decoder.flush())
        self.stats.decode_s += time.perf_counter() - t0
        return self._emit(last=True)

    def close(self) -> None:
        self.stats.frames = self.frame_index
        self.stats.total_s = time.perf_counter() - self.t_start

    def _emit(self, last: bool) -> AudioChunk:
        pcm = np.concatenate(self.pcm) if self.pcm else np.zeros(0, np.float32)
        chunk = AudioChunk(pcm=pcm.astype(np.float32, copy=False), sample_rate=SAMPLE_RATE, index=self.index,
                           frame_index=self.frame_index, num_frames=self.buffered, is_last=last)
        if self.index == 0:
            self.stats.ttfa_s = time.perf_counter() - self.t_start
        self.index += 1
        self.frame_index += self.buffered
        self.pcm, self.buffered = [], 0
        return chunk


def decode_chunks(frames: Iterator[torch.Tensor], decoder, settings: GenerationSettings,
                  cancel: Optional[CancelToken], stats: GenerationStats, t_start: float) -> Iterator[AudioChunk]:
    """Frames of codes -> AudioChunks (see ChunkCutter); nothing after a cancel."""
    cut = ChunkCutter(decoder, settings, stats, t_start)
    try:
        for frame in frames:
            chunk = cut.push(frame)
            if chunk is not None:
                yield chunk
        if cancel is not None and cancel.cancelled:
            return
        yield cut.finish()
    finally:
        frames.close()
        cut.close()


class Qwen3Engine:
    name = "qwen3"
    supports_cloning = True
    sample_rate = SAMPLE_RATE
    quantize = "none"          # set by load(): "none", "int8", "int4" or "int8-dynamic"
    load_info: dict = {}       # set by load(): quantize, weights ("checkpoint" or "cache"), load_s

    def __init__(self, checkpoint: Checkpoint, talker: Talker, speaker: SpeakerEncoder, codec: Codec,
                 tokenizer: TextTokenizer, device: torch.device, dtype: torch.dtype, model_id: str):
        self.checkpoint = checkpoint
        self.talker = talker
        self.speaker = speaker
        self.codec = codec
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.model_id = model_id
        self.ids = SpecialIds.from_config(checkpoint.config)
        self.fingerprint = fingerprint(checkpoint.folder)
        self.defaults = self._defaults(checkpoint.generation_config)
        self._seed_lock = threading.Lock()
        self._prefix_lock = threading.Lock()

    # ---- loading -------------------------------------------------------------------------------

    @classmethod
    def load(cls, checkpoint: str | os.PathLike, device: str = "cpu", dtype: str = "auto",
             quantize: Optional[str] = "auto", weights_cache: Optional[str | os.PathLike] = "auto",
             codec_dtype: str = "auto") -> "Qwen3Engine":
        """`dtype`: "auto" (default: float32 on the CPU, bfloat16 on CUDA, the reference's GPU setting) or a
        dtype name. `quantize`: "auto" (default: "int8" on the CPU, the float `dtype` on CUDA), "none" (weights in
        `dtype`), or int8 weights for the talker's and the code predictor's linear layers (CPU, float32):
        "int8" (blocks of 32, our kernel; activations kept to 16 bits), "int4" (the same with the code
        predictor's weights in 4 bits: faster, less accurate, see bench/RESULTS.md) or "int8-dynamic" (torch's
        dynamic quantization: activations rounded to 8 bits, more error). See engine/quant.py and
        bench/RESULTS.md. `weights_cache`: a folder where "int8" weights are stored once and
        memory-mapped on the next load ("auto": the user cache folder, see `default_weights_cache`;
        None: quantize at every load). `codec_dtype`: the codec decoder's precision: "auto" (with int8
        weights: bfloat16 on a CPU with native bfloat16, see `codec.decoder_dtype_for`; otherwise `dtype`),
        or a dtype name."""
        from . import quant
        from .quant import QUANTIZE_CHOICES

        quantize = (quantize or "auto").lower()
        if quantize not in QUANTIZE_CHOICES:
            raise ValueError(f"unknown quantize={quantize!r}; use one of: {', '.join(QUANTIZE_CHOICES)}")
        dev = parse_device(device)
        dt = parse_dtype(dtype, dev)
        if quantize == "auto":
            quantize = "int8" if dev.type == "cpu" and dt == torch.float32 else "none"
        if quantize != "none" and (dev.type != "cpu" or dt != torch.float32):
            raise ValueError("int8 weights run on the CPU with dtype float32")
        t0 = time.perf_counter()
        ck = Checkpoint.open(checkpoint)
        if weights_cache == "auto":
            weights_cache = default_weights_cache()
        talker, method, source = load_talker(ck, dev, dt, quantize,
                                             Path(weights_cache) if weights_cache is not None else None)
        speaker = SpeakerEncoder.load(_speaker_tensors(ck), ck.config.get("speaker_encoder_config", {}),
                                      device=dev, dtype=dt)
        if codec_dtype == "auto":
            dec_dt = decoder_dtype_for(dev, dt) if quantize != "none" else dt
        else:
            dec_dt = parse_dtype(codec_dtype)
        codec = Codec.load(ck.folder / "speech_tokenizer", device=dev, dtype=dt, decoder_dtype=dec_dt)
        if method in ("int8", "int4"):               # the int8 extension is built: its fused codec ops too
            codec.use_fused_ops(quant.kernel().snake)
        tokenizer = TextTokenizer(ck.folder)
        engine = cls(ck, talker, speaker, codec, tokenizer, dev, dt, model_id=str(checkpoint))
        engine.quantize = method
        engine.load_info = {"quantize": method, "weights": source, "codec_dtype": str(dec_dt).removeprefix("torch."),
                            "load_s": round(time.perf_counter() - t0, 2)}
        return engine

    @staticmethod
    def _defaults(gc: dict) -> GenerationSettings:
        talker = SamplingParams(do_sample=gc.get("do_sample", True), temperature=gc.get("temperature", 0.9),
                                top_k=gc.get("top_k", 50), top_p=gc.get("top_p", 1.0),
                                repetition_penalty=gc.get("repetition_penalty", 1.05))
        predictor = SamplingParams(do_sample=gc.get("subtalker_dosample", True),
                                   temperature=gc.get("subtalker_temperature", 0.9),
                                   top_k=gc.get("subtalker_top_k", 50), top_p=gc.get("subtalker_top_p", 1.0))
        return GenerationSettings(talker=talker, predictor=predictor)

    # ---- voices --------------------------------------------------------------------------------

    def builtin_voices(self) -> list[VoiceInfo]:
        return []

    @torch.inference_mode()
    def create_voice_prompt(self, audio: np.ndarray, sample_rate: int, transcript: Optional[str] = None,
                            x_vector_only: bool = False) -> VoicePrompt:
        """Reference clip (+ its transcript, unless x_vector_only) -> a reusable VoicePrompt."""
        wav = prepare_reference(audio, sample_rate, SAMPLE_RATE)
        if not x_vector_only and not (transcript and transcript.strip()):
            raise EmptyText("a transcript of the reference clip is needed to clone a voice "
                            "(or use x-vector-only mode)")
        embedding = self.speaker.embed(wav).float().cpu()
        codes = None if x_vector_only else self.codec.encode(wav).cpu()
        return VoicePrompt(speaker_embedding=embedding, ref_codes=codes,
                           ref_text=None if x_vector_only else transcript, x_vector_only=x_vector_only,
                           fingerprint=self.fingerprint,
                           meta={"engine": self.name, "ref_seconds": round(len(wav) / SAMPLE_RATE, 3)})

    # ---- generation ----------------------------------------------------------------------------

    def max_frames_for(self, n_text_tokens: int) -> int:
        """A bound on the utterance's length, from its text: ~0.5 s per token + 4 s, at most 8192 frames."""
        cap = int(self.checkpoint.generation_config.get("max_new_tokens", 8192))
        return max(8, min(cap, 50 + 6 * n_text_tokens))

    def _generator(self, seed: Optional[int]) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") & (2**63 - 1))
        return g

    def frames(self, text: "str | TextFeed", voice: VoicePrompt, language: str = "auto",
               settings: Optional[GenerationSettings] = None, cancel: Optional[CancelToken] = None,
               stats: Optional[GenerationStats] = None) -> Iterator[torch.Tensor]:
        """Codec frames (16,) int64 as they are generated (a batch of one). `text` may be a TextFeed
        (see new_feed): generation starts once the voice has the tokens it needs and waits for the
        text as it runs dry; the codes are those of the whole text."""
        row = self.plan(text, voice, language, settings or self.defaults, cancel)
        if row is None:                       # cancelled while waiting for text
            return
        gen = FrameGenerator(self.talker, self.ids, rows=1, length=row.prompt.length + 64)
        yield from generate_frames(gen, row, cancel, stats)

    def new_feed(self, max_chars: Optional[int] = None) -> TextFeed:
        """A TextFeed for text arriving in pieces: push() them, close() at the end."""
        return TextFeed(self.tokenizer.encode, max_chars)

    def tokens_needed(self, voice: VoicePrompt) -> int:
        """Text tokens a streamed utterance in this voice needs before it can start (x-vector 1)."""
        return tokens_needed(voice, self._ref_ids(voice))

    def _ref_ids(self, voice: VoicePrompt) -> Optional[list[int]]:
        return self.tokenizer.encode(_ref_chat(voice.ref_text))[3:-2] if voice.icl and voice.ref_text else None

    def plan(self, text: "str | TextFeed", voice: VoicePrompt, language: str, settings: GenerationSettings,
             cancel: Optional[CancelToken] = None) -> Optional[Row]:
        """Check the request and set up its generation: a Row with the talker prompt, the frame
        limit, and the request's sampling settings and seeded generator. A TextFeed is waited on until
        the voice can start (None when cancelled meanwhile)."""
        if not isinstance(voice, VoicePrompt):
            raise TypeError("the Qwen3 engine needs a VoicePrompt (see create_voice_prompt)")
        lang = check_language(language)
        ref_ids = self._ref_ids(voice)
        feed = text if isinstance(text, TextFeed) else None
        if feed is None:
            if not text or not text.strip():
                raise EmptyText("the text to speak is empty")
            text_ids = self.tokenizer.encode(_chat(text.strip()))
            role_ids, body_ids, complete = text_ids[:3], text_ids[3:-5], True
        else:
            need = tokens_needed(voice, ref_ids)
            if not feed.wait(lambda ids, closed: closed or len(ids) >= need, cancel):
                return None
            body_ids, complete = feed.snapshot()
            if complete and not body_ids:
                raise EmptyText("the text to speak is empty")
            role_ids = self.tokenizer.encode(_chat(""))[:3]
        max_frames = settings.max_frames or (self.max_frames_for(len(body_ids)) if complete else
                                             self.max_frames_for(10**6))
        language_id = self.ids.languages.get(lang)
        with torch.inference_mode():
            prompt = build_prompt(self.talker, self.ids, role_ids + body_ids, voice, language_id,
                                  ref_ids, complete=complete)
        prompt = self._with_prefix(prompt, voice, language_id, ref_ids)
        return Row(prompt=prompt, max_frames=max_frames, talker_params=settings.talker,
                   predictor_params=settings.predictor, generator=self._generator(settings.seed),
                   feed=feed, fed=len(body_ids), text_complete=complete,
                   limit_for_tokens=None if settings.max_frames else self.max_frames_for)

    def prepare_voice(self, voice: VoicePrompt) -> VoicePrompt:
        """Do a voice's one-time work now (run its reference codes through the codec; the talker's
        prefix for language "auto"), so that its first utterance starts as fast as the next ones.
        Returns the same voice."""
        self._streaming_decoder(voice)
        if not voice.icl or voice.ref_text:
            self.plan("a", voice, "auto", self.defaults)
        return voice

    def _with_prefix(self, prompt: Prompt, voice: VoicePrompt, language_id: Optional[int],
                     ref_ids: Optional[list[int]]) -> Prompt:
        """`prompt` with its voice-only first positions taken from the talker prefix kept on the voice
        object (computed on first use per language): an utterance prefills only what its text changes.
        Same codes either way (tested)."""
        n = voice_prefix_length(voice, language_id, ref_ids)
        if n == 0 or n >= prompt.embeds.shape[1]:
            return prompt
        cached = getattr(voice, "_talker_prefixes", None)
        if cached is None or cached[0] is not self.talker or cached[1] is not voice.speaker_embedding:
            prefixes: dict[Optional[int], Prefix] = {}
            cached = (self.talker, voice.speaker_embedding, prefixes)
            voice._talker_prefixes = cached     # not a dataclass field: not saved, not compared
        with self._prefix_lock:
            prefix = cached[2].get(language_id)
            if prefix is None or prefix.length != n:
                prefix = cached[2][language_id] = compute_prefix(self.talker, prompt.embeds[:, :n])
        return dataclasses.replace(prompt, embeds=prompt.embeds[:, n:], prefix=prefix)

    def _streaming_decoder(self, voice: VoicePrompt):
        """A codec stream primed with the voice's reference codes (ICL), forked from a primed state kept
        on the voice object: the reference frames are decoded once per voice, not once per utterance
        (they cost ~0.3 s per reference second here, before the first audio). Same samples either way."""
        if not voice.icl or voice.ref_codes is None:
            return self.codec.streaming_decoder()
        cached = getattr(voice, "_primed_decoder", None)
        if cached is None or cached[0] is not self.codec or cached[1] is not voice.ref_codes:
            with torch.inference_mode():
                cached = (self.codec, voice.ref_codes, self.codec.streaming_decoder(context=voice.ref_codes))
            voice._primed_decoder = cached          # not a dataclass field: not saved, not compared
        with torch.inference_mode():
            return cached[2].fork()

    def stream(self, text: str, voice: Optional[VoicePrompt] = None, language: str = "auto",
               settings: Optional[GenerationSettings] = None, cancel: Optional[CancelToken] = None,
               stats: Optional[GenerationStats] = None) -> Iterator[AudioChunk]:
        """Audio chunks (float32, 24 kHz) as frames are generated; the last has is_last=True."""
        if voice is None:
            from ..errors import VoiceNotFound

            raise VoiceNotFound("the Qwen3-TTS Base model needs a voice: clone one from a 3-10 s clip and its transcript")
        if not isinstance(voice, VoicePrompt):
            raise TypeError("the Qwen3 engine needs a VoicePrompt (see create_voice_prompt)")
        settings = settings or self.defaults
        stats = stats if stats is not None else GenerationStats()
        t_start = time.perf_counter()
        frames = self.frames(text, voice, language, settings, cancel, stats)
        return decode_chunks(frames, self._streaming_decoder(voice), settings, cancel, stats, t_start)

    def synthesize(self, text: str, voice: VoicePrompt, language: str = "auto",
                   settings: Optional[GenerationSettings] = None) -> np.ndarray:
        """The whole utterance at once (float32, 24 kHz)."""
        chunks = [c.pcm for c in self.stream(text, voice, language, settings)]
        return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
