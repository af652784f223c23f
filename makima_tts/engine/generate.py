"""From text and a voice to frames of codec tokens, one 80 ms frame at a time.

A few small steps, gpt-fast style, over a batch of rows (one row per utterance):
- `build_prompt`: the talker's input embeddings for the prefill, and the text
  embeddings still to be fed one per frame ("trailing text").
- `FrameGenerator.join`: run new rows' prompts, choose codebook 0 of their first frame.
- `FrameGenerator.complete`: complete every row's frame with the code predictor (codebooks 1..15).
- `FrameGenerator.advance`: feed the frames back to the talker, choose codebook 0 of the next.
`generate_frames` strings them together for one utterance (a batch of one) as a generator
that stops at the codec EOS, at `max_frames`, or when the consumer cancels; batch.py's
scheduler runs the same steps for many.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

from .model import Talker
from .sampling import apply_repetition_penalty, choose, sample
from .types import CancelToken, GenerationStats, SamplingParams, VoicePrompt


@dataclass(frozen=True)
class SpecialIds:
    """Token ids the prompt is made of, read from config.json."""

    tts_bos: int
    tts_eos: int
    tts_pad: int
    codec_bos: int
    codec_eos: int
    codec_pad: int
    think: int
    nothink: int
    think_bos: int
    think_eos: int
    languages: dict

    @classmethod
    def from_config(cls, config: dict) -> "SpecialIds":
        tc = config["talker_config"]
        return cls(
            tts_bos=config.get("tts_bos_token_id", 151672), tts_eos=config.get("tts_eos_token_id", 151673),
            tts_pad=config.get("tts_pad_token_id", 151671), codec_bos=tc["codec_bos_id"],
            codec_eos=tc["codec_eos_token_id"], codec_pad=tc["codec_pad_id"], think=tc["codec_think_id"],
            nothink=tc["codec_nothink_id"], think_bos=tc["codec_think_bos_id"], think_eos=tc["codec_think_eos_id"],
            languages={k.lower(): v for k, v in (tc.get("codec_language_id") or {}).items()},
        )


@dataclass
class Prompt:
    embeds: torch.Tensor          # (1, n, hidden): the prefill (after `prefix`, when there is one)
    trailing: torch.Tensor        # (1, m, hidden): text fed one per generated frame, then tts_pad
    pad_embed: torch.Tensor       # (1, 1, hidden)
    eos_embed: torch.Tensor       # (1, 1, hidden): ends the text track (appended at a feed's close)
    prefix: Optional["Prefix"] = None   # the talker's keys and values of the first positions, computed once

    @property
    def length(self) -> int:
        """Positions the prompt fills in the talker's cache (prefix included)."""
        return (self.prefix.length if self.prefix is not None else 0) + self.embeds.shape[1]


@dataclass
class Prefix:
    """The talker's keys and values for a prompt's first `length` positions: the chat framing, the
    control and speaker positions and, in ICL mode, the positions where the reference transcript
    lies over the reference frames. They depend on the voice and the language alone (attention is
    causal), so they are computed once per voice and language and copied into each utterance's
    cache row instead of being prefilled again (see `voice_prefix_length`, `compute_prefix`)."""

    length: int
    layers: list[tuple[torch.Tensor, torch.Tensor]]     # per layer: keys, values (kv_heads, length, head_dim)


def voice_prefix_length(voice: VoicePrompt, language_id: Optional[int], ref_text_ids: Optional[list[int]]) -> int:
    """How many leading positions of `build_prompt`'s layout do not depend on the target text."""
    head = 3 + (3 if language_id is None else 4) + 2            # role, control, speaker, codec_pad
    if voice.icl and voice.ref_codes is not None and ref_text_ids is not None:
        return head + min(len(ref_text_ids), 1 + int(voice.ref_codes.shape[0]))
    return head


@torch.inference_mode()
def compute_prefix(talker: Talker, embeds: torch.Tensor) -> Prefix:
    """Run the talker over `embeds` (1, n, hidden) (a prompt's first n positions) -> their keys and values."""
    n = embeds.shape[1]
    cache = talker.model.new_cache(1, n)
    talker.model(embeds, torch.arange(n, device=embeds.device).expand(1, n), cache)
    return Prefix(n, [(kv.k[0, :, :n].clone(), kv.v[0, :, :n].clone()) for kv in cache.layers])


def build_prompt(talker: Talker, ids: SpecialIds, text_ids: list[int], voice: VoicePrompt,
                 language_id: Optional[int], ref_text_ids: Optional[list[int]] = None,
                 complete: bool = True) -> Prompt:
    """The talker prompt for `text_ids` (the target text's tokens, without chat framing).

    Layout (each position is a text-side embedding plus a codec-side embedding):
      <|im_start|> assistant \\n                      -- text only
      [think, think_bos, language, think_eos] or [nothink, think_bos, think_eos], speaker, pad
                                                     -- codec, with tts_pad ... tts_bos on the text side
    then in ICL mode the reference transcript + target text + tts_eos laid over
    codec_bos + the reference frames (what does not fit trails, one per frame);
    in x-vector mode the first text token over codec_bos, the rest trailing.
    `role_ids` are the 3 tokens of "<|im_start|>assistant\\n", passed in `text_ids`' caller.

    complete=False (text still arriving, see TextFeed): the tokens so far, no tts_eos yet; the
    rest of the text and tts_eos are appended to `trailing` as they come. The layout is the one
    above, so the codes are those of the whole text: an ICL prompt then needs at least
    `tokens_needed` tokens (its text must cover the reference frames), an x-vector prompt one.
    """
    dev = talker.device
    dtype = talker.dtype

    def t(x: list[int]) -> torch.Tensor:
        return torch.tensor([x], dtype=torch.long, device=dev)

    role_ids, body_ids = text_ids[:3], text_ids[3:]
    bos_e, eos_e, pad_e = talker.embed_fixed_text((ids.tts_bos, ids.tts_eos, ids.tts_pad)).split(1, dim=1)
    if language_id is None:
        control = [ids.nothink, ids.think_bos, ids.think_eos]
    else:
        control = [ids.think, ids.think_bos, language_id, ids.think_eos]
    speaker = voice.speaker_embedding.to(device=dev, dtype=dtype).view(1, 1, -1)
    codec_side = torch.cat([talker.embed_codec(t(control)), speaker, talker.embed_codec(t([ids.codec_pad]))], dim=1)
    text_side = torch.cat([pad_e.expand(-1, codec_side.shape[1] - 1, -1), bos_e], dim=1)
    parts = [talker.embed_fixed_text(tuple(role_ids)), text_side + codec_side]
    codec_bos_e = talker.embed_codec(t([ids.codec_bos]))

    if voice.icl:
        if voice.ref_codes is None or ref_text_ids is None:
            raise ValueError("an ICL voice prompt needs reference codes and a transcript")
        text_e = talker.embed_text(t(ref_text_ids + body_ids))
        if complete:
            text_e = torch.cat([text_e, eos_e], dim=1)
        codes = voice.ref_codes.to(dev).long().unsqueeze(0)               # (1, T, G)
        codec_e = torch.cat([codec_bos_e, talker.embed_frame(codes)], dim=1)
        n_text, n_codec = text_e.shape[1], codec_e.shape[1]
        if not complete and n_text < n_codec:
            raise ValueError(f"an ICL prompt needs {n_codec - len(ref_text_ids)} tokens of text to start")
        if n_text > n_codec or not complete:
            parts.append(text_e[:, :n_codec] + codec_e)
            trailing = text_e[:, n_codec:]
        else:
            parts.append(torch.cat([text_e, pad_e.expand(-1, n_codec - n_text, -1)], dim=1) + codec_e)
            trailing = pad_e
    else:
        parts.append(talker.embed_text(t(body_ids[:1])) + codec_bos_e)
        trailing = talker.embed_text(t(body_ids[1:]))
        if complete:
            trailing = torch.cat([trailing, eos_e], dim=1)
    return Prompt(embeds=torch.cat(parts, dim=1), trailing=trailing, pad_embed=pad_e, eos_embed=eos_e)


def tokens_needed(voice: VoicePrompt, ref_text_ids: Optional[list[int]]) -> int:
    """Tokens of the target text a prompt needs before generation can start without changing the
    codes: an x-vector voice one; an ICL voice enough for its reference transcript plus the target
    text to cover codec_bos and the reference frames."""
    if not voice.icl or voice.ref_codes is None or ref_text_ids is None:
        return 1
    return max(1, 1 + int(voice.ref_codes.shape[0]) - len(ref_text_ids))


class TextFeed:
    """The text of one utterance arriving in pieces (an LLM writing), tokenized as it comes.

    Only tokens no later text can change are released: the text up to its last run of whitespace
    (the Qwen2 pre-tokenizer never joins across it), and all of it once `close()`d (stripped, as a
    whole text is). So the tokens, and the codes made from them, are those of the whole text.
    Thread-safe: one thread pushes, the generator reads; listeners hear of every change."""

    def __init__(self, encode: Callable[[str], list[int]], max_chars: Optional[int] = None):
        self._encode = encode
        self._text = ""
        self._ids: list[int] = []
        self.closed = False
        self.max_chars = max_chars
        self._cond = threading.Condition()
        self._listeners: list[Callable[[], None]] = []

    def push(self, piece: str) -> None:
        with self._cond:
            if self.closed:
                raise ValueError("this text was already closed")
            if self.max_chars is not None and len(self._text) + len(piece) > self.max_chars:
                raise ValueError(f"the text is longer than {self.max_chars} characters")
            self._text += piece
            self._release()
        self._changed()

    def close(self) -> None:
        """No more text: the rest is released and the text track ends (tts_eos)."""
        with self._cond:
            if self.closed:
                return
            self.closed = True
            self._release()
        self._changed()

    @property
    def text(self) -> str:
        return self._text

    def _release(self) -> None:
        text = self._text.strip() if self.closed else self._text.lstrip()
        if not self.closed:
            m = _LAST_SPACE_RUN.search(text)
            text = text[:m.start()] if m else ""
        ids = self._encode(text) if text else []
        if ids[:len(self._ids)] != self._ids:        # the tokenizer broke the prefix rule: never feed twice
            raise RuntimeError("text tokens changed after release")
        self._ids = ids

    def snapshot(self) -> tuple[list[int], bool]:
        """(the released token ids, closed)."""
        with self._cond:
            return list(self._ids), self.closed

    def listen(self, fn: Callable[[], None]) -> None:
        with self._cond:
            self._listeners.append(fn)

    def _changed(self) -> None:
        with self._cond:
            self._cond.notify_all()
            listeners = list(self._listeners)
        for fn in listeners:
            fn()

    def wait(self, ready: Callable[[list[int], bool], bool], cancel: Optional[CancelToken] = None) -> bool:
        """Block until ready(ids, closed) or cancel; -> whether ready. Woken by each push or close and by
        the cancel itself (no polling)."""
        forget = cancel.on_cancel(self._wake) if cancel is not None else None
        try:
            with self._cond:
                while not ready(self._ids, self.closed):
                    if cancel is not None and cancel.cancelled:
                        return False
                    self._cond.wait()
                return True
        finally:
            if forget is not None:
                forget()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


_LAST_SPACE_RUN = re.compile(r"\s+(?=\S*$)")


@dataclass(eq=False)
class Row:
    """One utterance in a batch: its prompt, limit, sampling settings and random generator, and
    where it stands. Rows never share state: a row's codes do not depend on its neighbours."""

    prompt: Prompt
    max_frames: int
    talker_params: SamplingParams
    predictor_params: SamplingParams
    generator: Optional[torch.Generator] = None
    position: int = 0                          # next talker position to write
    frames: int = 0                            # frames completed
    code0: Optional[torch.Tensor] = None       # (1,) codebook 0 of the frame being completed
    hidden: Optional[torch.Tensor] = None      # (1, 1, hidden) the talker's last hidden state
    history: list = field(default_factory=list)    # codebook-0 ids chosen so far (repetition penalty)
    last: Optional[torch.Tensor] = None        # (1, G) the frame just completed
    eos: bool = False                          # codebook 0 said EOS
    pending: bool = False                      # `last` is not fed back yet
    # text still arriving (see TextFeed): the body tokens already in the prompt and trailing track,
    # whether the track is complete (tts_eos appended), and the frame limit once the text is whole
    feed: Optional[TextFeed] = None
    fed: int = 0
    text_complete: bool = True
    limit_for_tokens: Optional[Callable[[int], int]] = None

    @property
    def finished(self) -> bool:
        return self.eos or self.frames >= self.max_frames

    def next_text(self) -> Optional[torch.Tensor]:
        """The text embedding fed with the frame just completed, or None while it has not arrived."""
        p, step = self.prompt, self.frames - 1
        if step < p.trailing.shape[1]:
            return p.trailing[:, step:step + 1]
        return p.pad_embed if self.text_complete else None


class FrameGenerator:
    """Runs the talker and the code predictor for a batch of rows, one frame at a time.

    `join(rows)` prefills new rows (together, padded to one length) into free cache rows;
    `complete()` makes codebooks 1..G-1 of every row's current frame (15 batched code-predictor
    steps); `advance()` feeds the frames back and chooses every row's next codebook 0 (one batched
    talker step, each row at its own position); `leave(row)` frees a row. One utterance is a
    batch of one (`generate_frames`); the scheduler in batch.py only decides who joins and leaves.
    A row whose text has not arrived yet (a TextFeed) waits: it is carried through the batched
    passes without taking their results (nor drawing random numbers) until its next token is in."""

    def __init__(self, talker: Talker, ids: SpecialIds, rows: int = 1, length: int = 256):
        self.talker = talker
        self.ids = ids
        self.rows: list[Row] = []
        self.cache = talker.model.new_cache(rows, length)
        self.predictor_cache = talker.code_predictor.model.new_cache(rows, talker.num_groups + 1)
        vocab = talker.codec_head.out_features
        mask = torch.zeros(vocab, dtype=torch.bool, device=talker.device)
        mask[vocab - 1024:] = True                       # control ids are never generated ...
        mask[ids.codec_eos] = False                      # ... except EOS
        self.suppress = mask

    def choose_code0(self, row: Row, logits: torch.Tensor) -> torch.Tensor:
        """Codebook 0 for `row` from its logits (1, vocab): repetition penalty over its history,
        control ids suppressed, no EOS before two frames, then its own sampling."""
        prev = torch.tensor([row.history], dtype=torch.long, device=logits.device)
        logits = apply_repetition_penalty(logits, prev, row.talker_params.repetition_penalty)
        logits = logits.masked_fill(self.suppress, float("-inf"))
        if len(row.history) < 2:                         # at least two tokens before EOS
            logits[:, self.ids.codec_eos] = float("-inf")
        return choose(logits, row.talker_params, row.generator)

    def _take_code0(self, rows: list[Row], logits: torch.Tensor, hidden: torch.Tensor,
                    take: Optional[list[bool]] = None) -> None:
        for i, row in enumerate(rows):
            if take is not None and not take[i]:
                continue
            row.code0 = self.choose_code0(row, logits[i:i + 1])
            row.history.append(int(row.code0))
            row.eos = int(row.code0) == self.ids.codec_eos
            row.hidden = hidden[i:i + 1]

    @torch.inference_mode()
    def join(self, rows: list[Row]) -> None:
        """Prefill `rows` together into the cache rows after the current ones; choose their first codebook 0."""
        if not rows:
            return
        lengths = [r.prompt.embeds.shape[1] for r in rows]
        starts = [r.prompt.prefix.length if r.prompt.prefix is not None else 0 for r in rows]
        n = max(lengths)
        hidden = self.talker.hidden_size
        x = torch.zeros(len(rows), n, hidden, dtype=rows[0].prompt.embeds.dtype, device=self.talker.device)
        for i, r in enumerate(rows):
            x[i, :lengths[i]] = r.prompt.embeds[0]
        first = len(self.rows)
        self.cache.reserve(first + len(rows), max(starts) + n + 64)
        self.predictor_cache.reserve(first + len(rows), self.talker.num_groups + 1)
        for i, r in enumerate(rows):
            if r.prompt.prefix is not None:
                self.cache.write_prefix(first + i, r.prompt.prefix.layers)
        positions = torch.tensor(starts, device=x.device)[:, None] + torch.arange(n, device=x.device)
        last = torch.tensor(lengths, device=x.device) - 1
        logits, h = self.talker(x, positions, self.cache, slice(first, first + len(rows)), last=last)
        for r, start, length in zip(rows, starts, lengths):
            r.position, r.frames, r.history, r.pending = start + length, 0, [], False
        self._take_code0(rows, logits, h)
        self.rows.extend(rows)

    def leave(self, row: Row) -> None:
        """Free `row`'s cache row (the last row moves into it: rows stay contiguous)."""
        i = self.rows.index(row)
        last = len(self.rows) - 1
        if i != last:
            moved = self.rows[last]
            self.cache.move(last, i, moved.position)
            self.rows[i] = moved
        self.rows.pop()

    @torch.inference_mode()
    def complete(self) -> list[tuple[Row, torch.Tensor]]:
        """Codebooks 1..G-1 of the current frame of every row that has none pending -> [(row, frame (G,))]."""
        rows = self.rows
        live = [not r.pending for r in rows]
        if not any(live):
            return []
        talker = self.talker
        cp = talker.code_predictor
        b = len(rows)
        code0 = torch.cat([r.code0 for r in rows])                                     # (b,)
        codes = [code0]
        embeds = torch.cat([torch.cat([r.hidden for r in rows]), talker.embed_codec(code0[:, None])], dim=1)
        positions = torch.arange(2, device=code0.device).expand(b, 2)
        for group in range(1, talker.num_groups):
            logits = cp.logits(embeds, positions, group, self.predictor_cache)
            codes.append(self._choose_codes(logits, codes, group, live))
            positions = positions[:, -1:] + 1
            embeds = cp.model.codec_embedding[group - 1](codes[-1][:, None])
        frames = torch.stack(codes, dim=1)
        out = []
        for i, r in enumerate(rows):
            if live[i]:
                r.last, r.pending = frames[i:i + 1], True
                r.frames += 1
                out.append((r, frames[i]))
        return out

    def _choose_codes(self, logits: torch.Tensor, codes: list, group: int, live: list[bool]) -> torch.Tensor:
        """Each row's code of codebook `group` from its own logits, settings and generator
        (all-greedy rows without a penalty: one argmax; rows sampled with the same settings and no
        penalty: one sampling call, a draw each; rows not live draw nothing)."""
        rows = self.rows
        if all(not r.predictor_params.do_sample and r.predictor_params.repetition_penalty == 1.0 for r in rows):
            return logits.float().argmax(dim=-1)
        out = logits.float().argmax(dim=-1)                       # rows not live keep this
        alike: dict[SamplingParams, list[int]] = {}
        for i, r in enumerate(rows):
            params = r.predictor_params
            if not live[i]:
                continue
            if params.do_sample and params.repetition_penalty == 1.0:
                alike.setdefault(params, []).append(i)
                continue
            row_logits = logits[i:i + 1]
            if params.repetition_penalty != 1.0:
                prev = (torch.stack([c[i:i + 1] for c in codes[1:]], dim=1) if group > 1 else
                        torch.empty(1, 0, dtype=torch.long, device=logits.device))
                row_logits = apply_repetition_penalty(row_logits, prev, params.repetition_penalty)
            out[i] = choose(row_logits, params, r.generator)[0]
        for params, idx in alike.items():
            out[idx] = sample(logits[idx], params, [rows[i].generator for i in idx])
        return out

    def refill(self, row: Row) -> None:
        """Move newly arrived tokens of the row's TextFeed onto its text track (tts_eos once closed)."""
        if row.feed is None or row.text_complete:
            return
        ids, closed = row.feed.snapshot()
        p = row.prompt
        if len(ids) > row.fed:
            new = torch.tensor([ids[row.fed:]], dtype=torch.long, device=self.talker.device)
            with torch.inference_mode():
                p.trailing = torch.cat([p.trailing, self.talker.embed_text(new)], dim=1)
            row.fed = len(ids)
        if closed:
            p.trailing = torch.cat([p.trailing, p.eos_embed], dim=1)
            row.text_complete = True
            if row.limit_for_tokens is not None:
                row.max_frames = row.limit_for_tokens(len(ids))

    def waiting(self, row: Row) -> bool:
        """The row's completed frame cannot be fed back: its next text token has not arrived."""
        self.refill(row)
        return row.pending and row.next_text() is None

    @torch.inference_mode()
    def advance(self) -> bool:
        """Feed every pending frame whose text is in back to the talker (its next text embedding added),
        one batched step; choose those rows' next codebook 0. -> whether any row moved."""
        rows = self.rows
        talker = self.talker
        texts = [r.next_text() if r.pending and not self.waiting(r) else None for r in rows]
        take = [t is not None for t in texts]
        if not any(take):
            return False
        pad = rows[0].prompt.pad_embed
        frames = torch.cat([r.last if r.last is not None else
                            torch.zeros(1, talker.num_groups, dtype=torch.long, device=talker.device)
                            for r in rows])                                             # (b, G)
        embeds = talker.embed_frame(frames[:, None, :]) + torch.cat([t if t is not None else pad for t in texts])
        positions = torch.tensor([[r.position] for r in rows], dtype=torch.long, device=embeds.device)
        logits, hidden = talker(embeds, positions, self.cache, slice(0, len(rows)))
        for r, moved in zip(rows, take):
            if moved:
                r.position += 1
                r.pending = False
        self._take_code0(rows, logits, hidden, take)
        return True


def generate_frames(gen: FrameGenerator, row: Row, cancel: Optional[CancelToken] = None,
                    timings: Optional[GenerationStats] = None) -> Iterator[torch.Tensor]:
    """One utterance as a batch of one: yield frames (G,) int64 until EOS, max_frames, or cancel
    (checked between frames); with a TextFeed, waits for its text as it runs dry."""
    import time

    clock = time.perf_counter
    t0 = clock()
    gen.join([row])
    if timings is not None:
        timings.prefill_s = clock() - t0

    def stopped() -> bool:
        return cancel is not None and cancel.cancelled

    while not row.finished and not stopped():
        t1 = clock()
        done = gen.complete()
        t2 = clock()
        if done:
            yield done[0][1]
        if row.finished or stopped():
            return
        while gen.waiting(row):
            if row.feed is not None and not row.feed.wait(lambda ids, closed: closed or len(ids) > row.fed, cancel):
                return
        t3 = clock()
        gen.advance()
        if timings is not None:
            timings.predictor_s += t2 - t1
            timings.talker_s += clock() - t3
