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

from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from .model import Talker
from .sampling import apply_repetition_penalty, choose
from .types import CancelToken, SamplingParams, VoicePrompt


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
    embeds: torch.Tensor          # (1, n, hidden): the prefill
    trailing: torch.Tensor        # (1, m, hidden): text fed one per generated frame, then tts_pad
    pad_embed: torch.Tensor       # (1, 1, hidden)


def build_prompt(talker: Talker, ids: SpecialIds, text_ids: list[int], voice: VoicePrompt,
                 language_id: Optional[int], ref_text_ids: Optional[list[int]] = None) -> Prompt:
    """The talker prompt for `text_ids` (the target text's tokens, without chat framing).

    Layout (each position is a text-side embedding plus a codec-side embedding):
      <|im_start|> assistant \\n                      -- text only
      [think, think_bos, language, think_eos] or [nothink, think_bos, think_eos], speaker, pad
                                                     -- codec, with tts_pad ... tts_bos on the text side
    then in ICL mode the reference transcript + target text + tts_eos laid over
    codec_bos + the reference frames (what does not fit trails, one per frame);
    in x-vector mode the first text token over codec_bos, the rest trailing.
    `role_ids` are the 3 tokens of "<|im_start|>assistant\\n", passed in `text_ids`' caller.
    """
    dev = talker.device
    dtype = talker.dtype

    def t(x: list[int]) -> torch.Tensor:
        return torch.tensor([x], dtype=torch.long, device=dev)

    role_ids, body_ids = text_ids[:3], text_ids[3:]
    bos_e, eos_e, pad_e = talker.embed_text(t([ids.tts_bos, ids.tts_eos, ids.tts_pad])).split(1, dim=1)
    if language_id is None:
        control = [ids.nothink, ids.think_bos, ids.think_eos]
    else:
        control = [ids.think, ids.think_bos, language_id, ids.think_eos]
    speaker = voice.speaker_embedding.to(device=dev, dtype=dtype).view(1, 1, -1)
    codec_side = torch.cat([talker.embed_codec(t(control)), speaker, talker.embed_codec(t([ids.codec_pad]))], dim=1)
    text_side = torch.cat([pad_e.expand(-1, codec_side.shape[1] - 1, -1), bos_e], dim=1)
    parts = [talker.embed_text(t(role_ids)), text_side + codec_side]
    codec_bos_e = talker.embed_codec(t([ids.codec_bos]))

    if voice.icl:
        if voice.ref_codes is None or ref_text_ids is None:
            raise ValueError("an ICL voice prompt needs reference codes and a transcript")
        text_e = torch.cat([talker.embed_text(t(ref_text_ids + body_ids)), eos_e], dim=1)
        codes = voice.ref_codes.to(dev).long().unsqueeze(0)               # (1, T, G)
        codec_e = torch.cat([codec_bos_e, talker.embed_frame(codes)], dim=1)
        n_text, n_codec = text_e.shape[1], codec_e.shape[1]
        if n_text > n_codec:
            parts.append(text_e[:, :n_codec] + codec_e)
            trailing = text_e[:, n_codec:]
        else:
            parts.append(torch.cat([text_e, pad_e.expand(-1, n_codec - n_text, -1)], dim=1) + codec_e)
            trailing = pad_e
    else:
        parts.append(talker.embed_text(t(body_ids[:1])) + codec_bos_e)
        trailing = torch.cat([talker.embed_text(t(body_ids[1:])), eos_e], dim=1)
    return Prompt(embeds=torch.cat(parts, dim=1), trailing=trailing, pad_embed=pad_e)


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

    @property
    def finished(self) -> bool:
        return self.eos or self.frames >= self.max_frames


class FrameGenerator:
    """Runs the talker and the code predictor for a batch of rows, one frame at a time.

    `join(rows)` prefills new rows (together, padded to one length) into free cache rows;
    `complete()` makes codebooks 1..G-1 of every row's current frame (15 batched code-predictor
    steps); `advance()` feeds the frames back and chooses every row's next codebook 0 (one batched
    talker step, each row at its own position); `leave(row)` frees a row. One utterance is a
    batch of one (`generate_frames`); the scheduler in batch.py only decides who joins and leaves."""

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

    def _take_code0(self, rows: list[Row], logits: torch.Tensor, hidden: torch.Tensor) -> None:
        for i, row in enumerate(rows):
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
        n = max(lengths)
        hidden = self.talker.hidden_size
        x = torch.zeros(len(rows), n, hidden, dtype=rows[0].prompt.embeds.dtype, device=self.talker.device)
        for i, r in enumerate(rows):
            x[i, :lengths[i]] = r.prompt.embeds[0]
        first = len(self.rows)
        self.cache.reserve(first + len(rows), n + 64)
        self.predictor_cache.reserve(first + len(rows), self.talker.num_groups + 1)
        positions = torch.arange(n, device=x.device).expand(len(rows), n)
        last = torch.tensor(lengths, device=x.device) - 1
        logits, h = self.talker(x, positions, self.cache, slice(first, first + len(rows)), last=last)
        for r, length in zip(rows, lengths):
            r.position, r.frames, r.history = length, 0, []
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
    def complete(self) -> torch.Tensor:
        """Codebooks 1..G-1 of every row's current frame -> frames (b, G); each row's `last` is set."""
        rows = self.rows
        talker = self.talker
        cp = talker.code_predictor
        b = len(rows)
        code0 = torch.cat([r.code0 for r in rows])                                     # (b,)
        codes = [code0]
        embeds = torch.cat([torch.cat([r.hidden for r in rows]), talker.embed_codec(code0[:, None])], dim=1)
        positions = torch.arange(2, device=code0.device).expand(b, 2)
        for group in range(1, talker.num_groups):
            logits = cp.logits(embeds, positions, group, self.predictor_cache)
            codes.append(self._choose_codes(logits, codes, group))
            positions = positions[:, -1:] + 1
            embeds = cp.model.codec_embedding[group - 1](codes[-1][:, None])
        frames = torch.stack(codes, dim=1)
        for i, r in enumerate(rows):
            r.last = frames[i:i + 1]
            r.frames += 1
        return frames

    def _choose_codes(self, logits: torch.Tensor, codes: list, group: int) -> torch.Tensor:
        """Each row's code of codebook `group` from its own logits, settings and generator
        (all-greedy rows without a penalty: one argmax)."""
        rows = self.rows
        if all(not r.predictor_params.do_sample and r.predictor_params.repetition_penalty == 1.0 for r in rows):
            return logits.float().argmax(dim=-1)
        out = []
        for i, r in enumerate(rows):
            row_logits = logits[i:i + 1]
            params = r.predictor_params
            if params.repetition_penalty != 1.0:
                prev = (torch.stack([c[i:i + 1] for c in codes[1:]], dim=1) if group > 1 else
                        torch.empty(1, 0, dtype=torch.long, device=logits.device))
                row_logits = apply_repetition_penalty(row_logits, prev, params.repetition_penalty)
            out.append(choose(row_logits, params, r.generator))
        return torch.cat(out)

    @torch.inference_mode()
    def advance(self) -> None:
        """Feed every row's completed frame back to the talker (its next text embedding added), one
        batched step; choose every row's next codebook 0."""
        rows = self.rows
        talker = self.talker
        text = []
        for r in rows:
            p, step = r.prompt, r.frames - 1
            text.append(p.trailing[:, step:step + 1] if step < p.trailing.shape[1] else p.pad_embed)
        frames = torch.cat([r.last for r in rows])                                     # (b, G)
        embeds = talker.embed_frame(frames[:, None, :]) + torch.cat(text)
        positions = torch.tensor([[r.position] for r in rows], dtype=torch.long, device=embeds.device)
        logits, hidden = talker(embeds, positions, self.cache, slice(0, len(rows)))
        for r in rows:
            r.position += 1
        self._take_code0(rows, logits, hidden)


def generate_frames(gen: FrameGenerator, row: Row, cancel: Optional[CancelToken] = None,
                    timings: Optional[dict] = None) -> Iterator[torch.Tensor]:
    """One utterance as a batch of one: yield frames (G,) int64 until EOS, max_frames, or cancel
    (checked between frames)."""
    import time

    clock = time.perf_counter
    t0 = clock()
    gen.join([row])
    if timings is not None:
        timings["prefill_s"] = clock() - t0
        timings.setdefault("talker_s", 0.0)
        timings.setdefault("predictor_s", 0.0)
    while not row.finished and not (cancel is not None and cancel.cancelled):
        t1 = clock()
        frame = gen.complete()
        t2 = clock()
        yield frame[0]
        if row.finished or (cancel is not None and cancel.cancelled):
            return
        t3 = clock()
        gen.advance()
        if timings is not None:
            timings["predictor_s"] += t2 - t1
            timings["talker_s"] += clock() - t3
