"""Several streams stepped together: one scheduler thread, one batched talker and code-predictor step per frame.

At batch 1 a frame reads every talker weight once and every code-predictor weight 15 times,
so the work is bound by memory bandwidth. Stepping B streams together reads each weight once
for all of them: the cost of a frame grows far slower than B until the work is compute-bound.

    batched = BatchedEngine(engine, max_batch=8)          # engine: a loaded Qwen3Engine
    for chunk in batched.stream(text, voice, "english"):  # from any number of threads
        play(chunk.pcm)
    batched.close()

How it runs:
- `stream()` (the caller's thread) checks its arguments, builds the talker prompt, and hands a
  request to the scheduler. Frames come back through a per-stream queue; the caller's thread
  decodes them with its own streaming codec decoder and cuts chunks exactly as
  `Qwen3Engine.stream` does (`first_chunk_frames`, then `chunk_frames`, the last `is_last`).
- The scheduler thread (started on demand, gone when nothing is left to do) loops over frames.
  Between frames, streams that were cancelled, closed by their consumer, or finished (EOS,
  max_frames) leave, and waiting streams join: each joiner's prefill runs alone (it is
  compute-bound anyway) and its keys/values are copied into a free row of the batched cache.
  Then all rows run the 15 code-predictor steps in lockstep (fresh short cache per frame), the
  finished frames go to their queues, and all rows run one talker step together.
- The talker's batched KV cache has one row per stream, each with its own length: new keys and
  values are written at each row's own position, RoPE uses each row's own position, and an
  attention mask hides every position beyond a row's length. Rows are kept contiguous (a
  leaving row is replaced by the last one), and the cache grows in both dimensions on demand.
- Sampling is per row: each stream keeps its own settings, its own torch.Generator (seeded
  from `settings.seed`), its own codebook-0 history (repetition penalty) and EOS rule, drawn
  in the same order as the one-stream path, so a stream's random draws never depend on others.

Nothing here changes the modules: the batched forward below reads the Talker's and the
CodePredictor's own layers (linear layers, norms, embeddings).
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from ..errors import EngineUnavailable, VoiceNotFound
from .generate import FrameGenerator, Prompt
from .model import apply_rope, rope_tables
from .qwen3 import Qwen3Engine
from .sampling import apply_repetition_penalty, choose
from .types import CancelToken, GenerationSettings, VoicePrompt

_END = object()                 # the scheduler's last item on a stream's queue (EOS, max_frames, cancel)
_POLL_S = 0.05                  # how often a waiting consumer looks at its cancel token


# ------------------------------------------------------------------------------------------------
# Batched forward passes over the modules' own weights


def _int8_rows() -> Optional[int]:
    """Rows per call for quant.Int8Linear: above PREFILL_ROWS it dequantizes the whole matrix (a
    prefill path), and above 4 rows its VNNI fast path gives way to a slow general loop; a decode
    batch is cheaper split into calls of at most 4 rows that stay on the fast path."""
    try:
        from . import quant
        # measured on this AVX-512 VNNI CPU (1024x6144 + 3072x1024 layers): the kernel's fast path takes
        # up to 4 rows (4 rows cost 1.8x one row); 5..8 rows fall to its general path, ~10x slower
        return min(int(getattr(quant, "PREFILL_ROWS", 8)), 4)
    except Exception:                                   # pragma: no cover
        return None


_INT8_ROWS = _int8_rows()


def _linear(mod, x: torch.Tensor) -> torch.Tensor:
    rows = x.shape[0] * x.shape[1]
    if _INT8_ROWS and rows > _INT8_ROWS and type(mod).__name__ == "Int8Linear":
        flat = x.reshape(rows, x.shape[-1])
        out = torch.cat([mod(flat[i:i + _INT8_ROWS]) for i in range(0, rows, _INT8_ROWS)])
        return out.view(*x.shape[:-1], out.shape[-1])
    return mod(x)


def _layer(layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend) -> torch.Tensor:
    """One DecoderLayer of model.py over x (b, t, hidden); `attend(q, k, v)` writes the cache and attends."""
    a = layer.self_attn
    b, t, _ = x.shape
    d = a.cfg.head_dim
    h = layer.input_layernorm(x)
    if getattr(a, "qkv_proj", None) is not None:
        q, k, v = _linear(a.qkv_proj, h).split(a.split, dim=-1)
    else:
        q, k, v = _linear(a.q_proj, h), _linear(a.k_proj, h), _linear(a.v_proj, h)
    q = a.q_norm(q.view(b, t, -1, d)).transpose(1, 2)
    k = a.k_norm(k.view(b, t, -1, d)).transpose(1, 2)
    v = v.view(b, t, -1, d).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = attend(q, k, v)
    x = x + _linear(a.o_proj, out.transpose(1, 2).reshape(b, t, -1))
    m = layer.mlp
    h = layer.post_attention_layernorm(x)
    if getattr(m, "gate_up_proj", None) is not None:
        gate, up = _linear(m.gate_up_proj, h).chunk(2, dim=-1)
    else:
        gate, up = _linear(m.gate_proj, h), _linear(m.up_proj, h)
    return x + _linear(m.down_proj, F.silu(gate) * up)


class BatchCache:
    """The talker's keys and values for up to `rows` streams: per layer (rows, kv_heads, length, head_dim).

    Row i holds positions [0, lengths[i]) of its stream; both dimensions grow on demand."""

    def __init__(self, decoder, rows: int = 1, length: int = 256):
        cfg, p = decoder.cfg, decoder.norm.weight
        self.cfg, self.dtype, self.device = cfg, p.dtype, p.device
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.rows = self.length = 0
        self.cos = self.sin = None
        self.reserve(rows, length)

    def reserve(self, rows: int, length: int) -> None:
        if rows <= self.rows and length <= self.length:
            return
        new_rows, new_len = max(rows, self.rows), max(length, self.length)
        if new_len > self.length:
            new_len = max(new_len, int(self.length * 1.5))
            new_len = -(-new_len // 128) * 128
        cfg = self.cfg
        shape = (new_rows, cfg.num_kv_heads, new_len, cfg.head_dim)
        for store in (self.k, self.v):
            for i in range(cfg.num_layers):
                fresh = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if i < len(store):
                    fresh[:self.rows, :, :self.length] = store[i]
                    store[i] = fresh
                else:
                    store.append(fresh)
        if new_len > self.length:
            cos, sin = rope_tables(cfg.head_dim, cfg.rope_theta, new_len, self.device)
            self.cos, self.sin = cos.to(self.dtype), sin.to(self.dtype)
        self.rows, self.length = new_rows, new_len

    def put_prefill(self, row: int, ks: list[torch.Tensor], vs: list[torch.Tensor]) -> None:
        """Keys/values of one stream's prefill, per layer (1, kv_heads, n, head_dim), into `row`."""
        n = ks[0].shape[2]
        self.reserve(row + 1, n + 1)
        for i in range(self.cfg.num_layers):
            self.k[i][row, :, :n] = ks[i][0]
            self.v[i][row, :, :n] = vs[i][0]

    def move(self, src: int, dst: int, length: int) -> None:
        for store in (self.k, self.v):
            for t in store:
                t[dst, :, :length] = t[src, :, :length]


@torch.inference_mode()
def talker_step(talker, cache: BatchCache, embeds: torch.Tensor, positions: torch.Tensor):
    """One talker position for each of b rows: embeds (b, 1, hidden); row i writes positions[i].

    -> (logits (b, vocab), hidden (b, 1, hidden)), as `Talker.forward` gives row by row."""
    b = embeds.shape[0]
    top = int(positions.max()) + 1
    cache.reserve(b, top)
    rows = torch.arange(b, device=embeds.device)
    cos = cache.cos[positions].view(b, 1, 1, -1)
    sin = cache.sin[positions].view(b, 1, 1, -1)
    mask = (torch.arange(top, device=embeds.device)[None, :] <= positions[:, None]).view(b, 1, 1, top)
    cfg = talker.model.cfg
    gqa = cfg.num_heads != cfg.num_kv_heads
    x = embeds
    for i, layer in enumerate(talker.model.layers):
        kc, vc = cache.k[i], cache.v[i]

        def attend(q, k, v, kc=kc, vc=vc):
            kc[rows, :, positions] = k[:, :, 0]
            vc[rows, :, positions] = v[:, :, 0]
            return F.scaled_dot_product_attention(q, kc[:b, :, :top], vc[:b, :, :top], attn_mask=mask,
                                                  enable_gqa=gqa)

        x = _layer(layer, x, cos, sin, attend)
    h = talker.model.norm(x)
    return _linear(talker.codec_head, h[:, -1:])[:, 0], h


class _PredictorCache:
    """A code-predictor cache for b rows that all sit at the same position (lockstep)."""

    def __init__(self, decoder, rows: int, length: int):
        cfg, p = decoder.cfg, decoder.norm.weight
        shape = (rows, cfg.num_kv_heads, length, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in range(cfg.num_layers)]
        cos, sin = rope_tables(cfg.head_dim, cfg.rope_theta, length, p.device)
        self.cos, self.sin = cos.to(p.dtype), sin.to(p.dtype)


@torch.inference_mode()
def predictor_logits(cp, cache: _PredictorCache, embeds: torch.Tensor, start: int, group: int) -> torch.Tensor:
    """`CodePredictor.logits` for b rows at the same positions [start, start + t)."""
    b, t, _ = embeds.shape
    cfg = cp.model.cfg
    gqa = cfg.num_heads != cfg.num_kv_heads
    x = _linear(cp.small_to_mtp_projection, embeds)
    cos, sin = cache.cos[start:start + t], cache.sin[start:start + t]
    end = start + t
    for i, layer in enumerate(cp.model.layers):
        kc, vc = cache.k[i][:b], cache.v[i][:b]

        def attend(q, k, v, kc=kc, vc=vc):
            kc[:, :, start:end] = k
            vc[:, :, start:end] = v
            return F.scaled_dot_product_attention(q, kc[:, :, :end], vc[:, :, :end], is_causal=(t > 1 and start == 0),
                                                  enable_gqa=gqa)

        x = _layer(layer, x, cos, sin, attend)
    h = cp.model.norm(x)
    return _linear(cp.lm_head[group - 1], h[:, -1:])[:, 0]


# ------------------------------------------------------------------------------------------------
# Streams and the scheduler


@dataclass
class _Stream:
    prompt: Prompt
    max_frames: int
    gen: FrameGenerator                  # per-stream params, generator, suppress mask, EOS rule
    cancel: Optional[CancelToken]
    out: "queue.Queue" = field(default_factory=queue.Queue)
    closed: threading.Event = field(default_factory=threading.Event)    # the consumer went away
    submitted: float = field(default_factory=time.perf_counter)
    timings: dict = field(default_factory=dict)
    # set by the scheduler
    position: int = 0                    # next talker position to write
    step: int = 0                        # frames fed back so far
    frames: int = 0                      # frames sent
    code0: Optional[torch.Tensor] = None     # (1,)
    hidden: Optional[torch.Tensor] = None    # (1, 1, hidden)
    history: list = field(default_factory=list)
    last: Optional[torch.Tensor] = None      # (1, G) the frame just sent

    def gone(self) -> bool:
        return self.closed.is_set() or (self.cancel is not None and self.cancel.cancelled)


class BatchedEngine:
    """A Qwen3Engine whose streams share one batched talker / code-predictor step per frame.

    Same streaming API as Qwen3Engine (`stream`, `create_voice_prompt`, ...); `max_batch` caps
    the rows stepped together (more streams wait to join). Thread-safe: call `stream()` from
    as many threads as you like. `close()` ends the scheduler; streams still running then end
    with EngineUnavailable."""

    def __init__(self, engine, max_batch: int = 8, join_budget_s: float = 0.25):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.engine = engine
        self.max_batch = int(max_batch)
        # while streams are running, joiners' prefills in one pause between frames stop after this
        # long (at least one joins per pause): a burst of joiners does not stall running streams long
        self.join_budget_s = join_budget_s
        self._cond = threading.Condition()
        self._waiting: list[_Stream] = []
        self._active: list[_Stream] = []
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        self._cache: Optional[BatchCache] = None
        self._pcache: dict[int, _PredictorCache] = {}
        # frames made, batched steps, the most rows in one step, scheduler threads started so far
        self.counters = {"frames": 0, "steps": 0, "max_rows": 0, "threads_started": 0}
        # called by the scheduler thread after every frame step with the rows it stepped (tests, metrics)
        self.on_step = None
        self._hold = 0

    # ---- pass-through -------------------------------------------------------------------------

    name = property(lambda self: self.engine.name)
    model_id = property(lambda self: self.engine.model_id)
    sample_rate = property(lambda self: self.engine.sample_rate)
    supports_cloning = property(lambda self: self.engine.supports_cloning)
    fingerprint = property(lambda self: self.engine.fingerprint)
    defaults = property(lambda self: self.engine.defaults)

    def __getattr__(self, item):             # quantize, device, codec, tokenizer, ... of the engine
        if item == "engine":
            raise AttributeError(item)
        return getattr(self.engine, item)

    def builtin_voices(self):
        return self.engine.builtin_voices()

    def create_voice_prompt(self, *args, **kw) -> VoicePrompt:
        return self.engine.create_voice_prompt(*args, **kw)

    @property
    def running(self) -> bool:
        """Whether the scheduler thread is alive."""
        t = self._thread
        return t is not None and t.is_alive()

    @property
    def active_streams(self) -> int:
        with self._cond:
            return len(self._active) + len(self._waiting)

    def hold(self) -> None:
        """Let no stream join until resume() (running streams go on): several streams submitted
        meanwhile then join together, at one pause between frames."""
        with self._cond:
            self._hold += 1

    def resume(self) -> None:
        with self._cond:
            self._hold = max(0, self._hold - 1)
            self._cond.notify_all()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the scheduler (streams still running end with EngineUnavailable); idempotent."""
        with self._cond:
            self._closed = True
            thread = self._thread
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # ---- a stream, on the caller's thread -----------------------------------------------------

    def _request(self, text, voice, language, settings, cancel) -> _Stream:
        if voice is None:
            raise VoiceNotFound("the Qwen3-TTS Base model needs a voice: clone one from a 3-10 s clip and its transcript")
        prompt, max_frames, gen = self.engine.plan(text, voice, language, settings)
        return _Stream(prompt=prompt, max_frames=max_frames, gen=gen, cancel=cancel)

    def _submit(self, s: _Stream) -> None:
        with self._cond:
            if self._closed:
                raise EngineUnavailable("the batched engine is closed")
            self._waiting.append(s)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="makima-batch", daemon=True)
                self.counters["threads_started"] += 1
                self._thread.start()
            self._cond.notify_all()

    def frames(self, text: str, voice: VoicePrompt, language: str = "auto",
               settings: Optional[GenerationSettings] = None, cancel: Optional[CancelToken] = None,
               stats: Optional[dict] = None) -> Iterator[torch.Tensor]:
        """Codec frames (16,) int64 as the scheduler makes them (like Qwen3Engine.frames)."""
        settings = settings or self.engine.defaults
        s = self._request(text, voice, language, settings, cancel)
        self._submit(s)
        try:
            while True:
                if s.gone():
                    return
                try:
                    item = s.out.get(timeout=_POLL_S)
                except queue.Empty:
                    continue
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            s.closed.set()
            if stats is not None:
                stats.update(s.timings)

    def _streaming_decoder(self, voice: VoicePrompt):
        eng = self.engine
        make = getattr(eng, "_streaming_decoder", None)
        if make is not None:
            return make(voice)
        with torch.inference_mode():
            return eng.codec.streaming_decoder(context=voice.ref_codes if voice.icl else None)

    # Chunks and samples are those of Qwen3Engine.stream for the same frames: the same code, over
    # this class's frames() and _streaming_decoder() (defaults come from the engine).
    stream = Qwen3Engine.stream
    synthesize = Qwen3Engine.synthesize

    # ---- the scheduler thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                self._loop()
        except BaseException as exc:               # a bug: fail every stream rather than hang them
            with self._cond:
                for s in self._active + self._waiting:
                    s.out.put(exc)
                self._active, self._waiting = [], []
                self._thread = None
                self._cache = None
            raise

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    err = EngineUnavailable("the batched engine was closed")
                    for s in self._active + self._waiting:
                        s.out.put(err)
                    self._active, self._waiting = [], []
                self._drop_finished()
                joiners = []
                if not self._active and not self._waiting:
                    self._thread = None            # idle: the thread ends; _submit starts a new one
                    self._cache, self._pcache = None, {}
                    return
                room = self.max_batch - len(self._active)
                if room > 0 and self._waiting and not self._hold:
                    joiners, self._waiting = self._waiting[:room], self._waiting[room:]
            if joiners:
                self._join(joiners)
                continue                            # drop any that ended at prefill, join more
            if not self._active:                    # only held joiners: wait for resume()
                with self._cond:
                    if self._hold and not self._closed:
                        self._cond.wait(_POLL_S)
                continue
            self._frame()

    def _drop_finished(self) -> None:
        """Remove streams that ended (EOS reached, cancelled, consumer gone); keep rows contiguous."""
        self._waiting = [s for s in self._waiting if not s.gone()]
        i = 0
        while i < len(self._active):
            s = self._active[i]
            done = s.gone() or s.frames >= s.max_frames or (s.code0 is not None and int(s.code0) == s.gen.ids.codec_eos)
            if not done:
                i += 1
                continue
            s.out.put(_END)
            last = len(self._active) - 1
            if i != last:
                moved = self._active[last]
                self._cache.move(last, i, moved.position)
                self._active[i] = moved
            self._active.pop()

    def _join(self, joiners: list[_Stream]) -> None:
        t_pause = time.perf_counter()
        busy = bool(self._active)
        for n, s in enumerate(joiners):
            if busy and n > 0 and time.perf_counter() - t_pause > self.join_budget_s:
                with self._cond:                    # the rest wait for the next pause, first in line
                    self._waiting[:0] = joiners[n:]
                return
            if s.gone():
                continue
            try:
                self._prefill(s)
            except Exception as exc:
                s.out.put(exc)
                continue
            with self._cond:
                self._active.append(s)

    def _prefill(self, s: _Stream) -> None:
        t0 = time.perf_counter()
        s.timings["queue_s"] = t0 - s.submitted
        talker = self.engine.talker
        n = s.prompt.embeds.shape[1]
        solo = talker.model.new_cache(1, n)
        logits, hidden = talker(s.prompt.embeds, 0, solo)
        s.code0 = s.gen._choose_code0(logits, [])
        s.hidden, s.history, s.position, s.step = hidden, [int(s.code0)], n, 0
        if self._cache is None:
            self._cache = BatchCache(talker.model, rows=self.max_batch, length=max(256, n + 64))
        self._cache.put_prefill(len(self._active), [kv.k for kv in solo.layers], [kv.v for kv in solo.layers])
        s.timings.update(prefill_s=time.perf_counter() - t0, talker_s=0.0, predictor_s=0.0, batch_rows_sum=0)
        if s.max_frames <= 0:
            s.closed.set()

    def _frame(self) -> None:
        rows = list(self._active)
        b = len(rows)
        t1 = time.perf_counter()
        frames = self._complete(rows)                # (b, G)
        dt = time.perf_counter() - t1
        for i, s in enumerate(rows):
            s.last = frames[i:i + 1]
            s.out.put(frames[i].clone())
            s.frames += 1
            s.timings["predictor_s"] += dt
            s.timings["batch_rows_sum"] += b
        self.counters["frames"] += b
        self.counters["steps"] += 1
        self.counters["max_rows"] = max(self.counters["max_rows"], b)
        try:
            self._step_rows(rows)
        finally:
            if self.on_step is not None:
                self.on_step(b)

    def _step_rows(self, rows: list[_Stream]) -> None:
        # streams that end with this frame (max_frames, cancel, consumer gone) leave before the talker step
        if any(s.frames >= s.max_frames or s.gone() for s in rows):
            with self._cond:
                self._drop_finished()
            rows = list(self._active)
            if not rows:
                return
        t3 = time.perf_counter()
        self._advance(rows)
        dt = time.perf_counter() - t3
        for s in rows:
            s.timings["talker_s"] += dt

    def _complete(self, rows: list[_Stream]) -> torch.Tensor:
        """Codebooks 1..G-1 for every row's current frame (as FrameGenerator.complete_frame) -> (b, G)."""
        talker = self.engine.talker
        cp = talker.code_predictor
        b, groups = len(rows), talker.num_groups
        pc = self._pcache.get(b)
        if pc is None:
            pc = self._pcache[b] = _PredictorCache(cp.model, b, groups + 1)
        code0 = torch.cat([s.code0 for s in rows])                                     # (b,)
        hidden = torch.cat([s.hidden for s in rows])                                   # (b, 1, hidden)
        codes = [code0]
        embeds = torch.cat([hidden, talker.embed_codec(code0[:, None])], dim=1)
        start = 0
        for group in range(1, groups):
            logits = predictor_logits(cp, pc, embeds, start, group)
            code = self._choose_rows(rows, logits, codes, group)
            codes.append(code)
            start += embeds.shape[1]
            embeds = cp.model.codec_embedding[group - 1](code[:, None])
        return torch.stack(codes, dim=1)

    @staticmethod
    def _choose_rows(rows: list[_Stream], logits: torch.Tensor, codes: list, group: int) -> torch.Tensor:
        """Each row's code from its own logits, params and generator (greedy rows in one argmax)."""
        plain = [not s.gen.predictor_params.do_sample and s.gen.predictor_params.repetition_penalty == 1.0
                 for s in rows]
        if all(plain):
            return logits.float().argmax(dim=-1)
        out = []
        for i, s in enumerate(rows):
            row = logits[i:i + 1]
            params = s.gen.predictor_params
            if params.repetition_penalty != 1.0:
                prev = (torch.stack([c[i:i + 1] for c in codes[1:]], dim=1) if group > 1 else
                        torch.empty(1, 0, dtype=torch.long, device=logits.device))
                row = apply_repetition_penalty(row, prev, params.repetition_penalty)
            out.append(choose(row, params, s.gen.generator))
        return torch.cat(out)

    def _advance(self, rows: list[_Stream]) -> None:
        """Feed every row's finished frame back to the talker, one batched step; choose codebook 0 of the next."""
        talker = self.engine.talker
        text = []
        for s in rows:
            p = s.prompt
            text.append(p.trailing[:, s.step:s.step + 1] if s.step < p.trailing.shape[1] else p.pad_embed)
        frames = torch.cat([s.last for s in rows])                                     # (b, G)
        embeds = talker.embed_frame(frames[:, None, :]) + torch.cat(text)
        positions = torch.tensor([s.position for s in rows], dtype=torch.long, device=embeds.device)
        logits, hidden = talker_step(talker, self._cache, embeds, positions)
        for i, s in enumerate(rows):
            s.code0 = s.gen._choose_code0(logits[i:i + 1], s.history)
            s.history.append(int(s.code0))
            s.hidden = hidden[i:i + 1]
            s.position += 1
            s.step += 1
