"""From text and a voice to frames of codec tokens, one 80 ms frame at a time.

Three small steps, gpt-fast style:
- `build_prompt`: the talker's input embeddings for the prefill, and the text
  embeddings still to be fed one per frame ("trailing text").
- `prefill`: run the prompt, choose codebook 0 of the first frame.
- `next_frame`: complete the frame with the code predictor (codebooks 1..15),
  feed it back to the talker, choose codebook 0 of the next one.
`generate_frames` strings them together as a generator that stops at the codec
EOS, at `max_frames`, or when the consumer cancels.
"""
from __future__ import annotations

from dataclasses import dataclass
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


@dataclass
class FrameState:
    """What carries from one frame to the next."""

    position: int                  # next talker position to write
    step: int                      # frames fed back so far
    code0: torch.Tensor            # (1,) codebook 0 of the frame being completed
    hidden: torch.Tensor           # (1, 1, hidden) talker's last hidden state
    history: list                  # codebook-0 ids chosen so far (repetition penalty)


class FrameGenerator:
    """Runs the talker and the code predictor for one utterance."""

    def __init__(self, talker: Talker, ids: SpecialIds, talker_params: SamplingParams,
                 predictor_params: SamplingParams, generator: Optional[torch.Generator] = None):
        self.talker = talker
        self.ids = ids
        self.talker_params = talker_params
        self.predictor_params = predictor_params
        self.generator = generator
        vocab = talker.codec_head.out_features
        mask = torch.zeros(vocab, dtype=torch.bool, device=talker.device)
        mask[vocab - 1024:] = True                       # control ids are never generated ...
        mask[ids.codec_eos] = False                      # ... except EOS
        self.suppress = mask

    def _choose_code0(self, logits: torch.Tensor, history: list) -> torch.Tensor:
        prev = torch.tensor([history], dtype=torch.long, device=logits.device)
        logits = apply_repetition_penalty(logits, prev, self.talker_params.repetition_penalty)
        logits = logits.masked_fill(self.suppress, float("-inf"))
        if len(history) < 2:                             # at least two tokens before EOS
            logits[:, self.ids.codec_eos] = float("-inf")
        return choose(logits, self.talker_params, self.generator)

    def prefill(self, prompt: Prompt, max_frames: int) -> FrameState:
        self.prompt = prompt
        self.talker_cache = self.talker.model.new_cache(1, prompt.embeds.shape[1] + max_frames + 1)
        self.predictor_cache = self.talker.code_predictor.model.new_cache(1, self.talker.num_groups + 1)
        logits, hidden = self.talker(prompt.embeds, 0, self.talker_cache)
        code0 = self._choose_code0(logits, [])
        return FrameState(position=prompt.embeds.shape[1], step=0, code0=code0, hidden=hidden,
                          history=[int(code0)])

    def complete_frame(self, state: FrameState) -> torch.Tensor:
        """Codebooks 1..G-1 for the frame whose codebook 0 is state.code0 -> the frame's codes (1, G)."""
        cp = self.talker.code_predictor
        codes = [state.code0]
        embeds = torch.cat([state.hidden, self.talker.embed_codec(state.code0[:, None])], dim=1)
        start = 0
        for group in range(1, self.talker.num_groups):
            logits = cp.logits(embeds, start, group, self.predictor_cache)
            params = self.predictor_params
            if params.repetition_penalty != 1.0:
                logits = apply_repetition_penalty(logits, torch.stack(codes[1:], dim=1) if group > 1 else
                                                  torch.empty(1, 0, dtype=torch.long, device=logits.device),
                                                  params.repetition_penalty)
            code = choose(logits, params, self.generator)
            codes.append(code)
            start += embeds.shape[1]
            embeds = cp.model.codec_embedding[group - 1](code[:, None])
        return torch.stack(codes, dim=1)

    def advance(self, state: FrameState, frame: torch.Tensor) -> FrameState:
        """Feed a finished frame back; choose codebook 0 of the next."""
        p = self.prompt
        text = p.trailing[:, state.step:state.step + 1] if state.step < p.trailing.shape[1] else p.pad_embed
        embeds = self.talker.embed_frame(frame[:, None, :]) + text
        logits, hidden = self.talker(embeds, state.position, self.talker_cache)
        code0 = self._choose_code0(logits, state.history)
        state.history.append(int(code0))
        return FrameState(position=state.position + 1, step=state.step + 1, code0=code0, hidden=hidden,
                          history=state.history)


def generate_frames(gen: FrameGenerator, prompt: Prompt, max_frames: int,
                    cancel: Optional[CancelToken] = None, timings: Optional[dict] = None) -> Iterator[torch.Tensor]:
    """Yield frames (G,) int64 until EOS, max_frames, or cancel. Checks `cancel` between frames."""
    import time

    clock = time.perf_counter
    t0 = clock()
    state = gen.prefill(prompt, max_frames)
    if timings is not None:
        timings["prefill_s"] = clock() - t0
        timings.setdefault("talker_s", 0.0)
        timings.setdefault("predictor_s", 0.0)
    for n in range(max_frames):
        if int(state.code0) == gen.ids.codec_eos or (cancel is not None and cancel.cancelled):
            return
        t1 = clock()
        frame = gen.complete_frame(state)
        t2 = clock()
        yield frame[0]
        if n + 1 == max_frames or (cancel is not None and cancel.cancelled):
            return
        t3 = clock()
        state = gen.advance(state, frame)
        if timings is not None:
            timings["predictor_s"] += t2 - t1
            timings["talker_s"] += clock() - t3
