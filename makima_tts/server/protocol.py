"""The WebSocket protocol's client messages (docs/protocol.md is the contract)."""
from __future__ import annotations

import json
from typing import Annotated, Literal, Optional, Sequence, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from ..engine.types import LANGUAGES
from ..errors import InvalidInput, UnsupportedFormat
from .stream import SAMPLE_RATES

FORMATS = ("pcm_s16le", "pcm_f32le", "mulaw", "alaw")   # mulaw / alaw: G.711, one byte a sample


class StageSampling(BaseModel):
    model_config = ConfigDict(extra="forbid")
    do_sample: Optional[bool] = None
    temperature: Optional[float] = Field(None, ge=0.0, le=5.0)
    top_k: Optional[int] = Field(None, ge=0, le=10000)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    repetition_penalty: Optional[float] = Field(None, gt=0.0, le=5.0)


class Sampling(StageSampling):
    """Talker settings at the top level; the code predictor's under `predictor`."""
    seed: Optional[int] = None
    predictor: Optional[StageSampling] = None


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Start(_Msg):
    type: Literal["start"]
    voice: Optional[str] = Field(None, max_length=128)
    language: str = Field("auto", max_length=64)
    format: str = "pcm_s16le"
    sample_rate: int = 24000
    sampling: Optional[Sampling] = None
    # how `text` pieces are spoken: "token" (fed into the model as they arrive; the default where the
    # engine can) or "sentence" (each sentence once it is complete)
    text_mode: Optional[Literal["token", "sentence"]] = None


class Speak(_Msg):
    type: Literal["speak"]
    text: str
    id: Optional[str] = Field(None, max_length=128)
    voice: Optional[str] = Field(None, max_length=128)
    language: Optional[str] = Field(None, max_length=64)
    interrupt: bool = False


class Text(_Msg):
    type: Literal["text"]
    text: str


class Flush(_Msg):
    type: Literal["flush"]


class Cancel(_Msg):
    type: Literal["cancel"]


class Stop(_Msg):
    type: Literal["stop"]


class Played(_Msg):
    """How much of an utterance the client has played (heard) so far, in ms."""
    type: Literal["played"]
    id: str = Field(..., min_length=1, max_length=128)
    ms: float = Field(..., ge=0, le=86_400_000)


ClientMessage = Annotated[Union[Start, Speak, Text, Flush, Cancel, Stop, Played], Field(discriminator="type")]
_adapter = TypeAdapter(ClientMessage)


def accepted(max_text_chars: int, languages: Optional[Sequence[str]] = None) -> dict:
    """What a session accepts, for `ready` (so clients such as the /speak page take it from the server
    instead of keeping copies): the `language` values (`languages`: the engine's, when it names them;
    else all), the `sample_rate` values, the longest text."""
    return {"languages": list(languages or LANGUAGES), "sample_rates": list(SAMPLE_RATES),
            "max_text_chars": max_text_chars}


def _short(value, limit: int = 40) -> str:
    """Input echoed in an error: a short prefix only."""
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "..."


def parse_message(raw: str):
    """A client message, or InvalidInput / UnsupportedFormat with a message that says what is wrong."""
    try:
        data = json.loads(raw)
    except (ValueError, TypeError):
        raise InvalidInput("messages are JSON text frames; this one is not valid JSON") from None
    except RecursionError:
        raise InvalidInput("the message is nested too deeply; a message is a flat JSON object") from None
    if not isinstance(data, dict) or "type" not in data:
        raise InvalidInput("a message is a JSON object with a `type`: start, speak, text, flush, cancel, stop or played")
    try:
        msg = _adapter.validate_python(data)
    except RecursionError:
        raise InvalidInput("the message is nested too deeply; a message is a flat JSON object") from None
    except ValidationError as e:
        err = e.errors(include_input=False, include_url=False)[0]
        where = ".".join(_short(p) for p in err.get("loc", ())[1:])
        kind = _short(data.get("type"))
        if err.get("type") == "union_tag_invalid":
            raise InvalidInput(f"unknown message type {kind!r}; expected start, speak, text, flush, "
                               "cancel, stop or played") from None
        raise InvalidInput(f"{kind}: {where + ': ' if where else ''}{err.get('msg')}") from None
    if isinstance(msg, Start):
        if msg.format not in FORMATS:
            raise UnsupportedFormat(f"format {_short(msg.format)!r} is not supported; use one of {', '.join(FORMATS)}")
        if msg.sample_rate not in SAMPLE_RATES:
            raise UnsupportedFormat(f"sample_rate {msg.sample_rate} is not supported; use one of "
                                    f"{', '.join(map(str, SAMPLE_RATES))}")
    return msg
