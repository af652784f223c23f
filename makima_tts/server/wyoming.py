"""The Wyoming protocol (Home Assistant's), served beside the HTTP server: `serve --wyoming-port PORT`.

Same process, event loop, engine, voices and limits as the HTTP server: a `WyomingHandler` is built
with the server's `SpeechService` and speaks through it (generation slots, OVERLOADED, send timeout,
drain on shutdown).

- `describe` -> `info` with one TTS program listing the voices (the voice library's, or the
  embedded engine's built-in ones) with their languages (ISO 639-1 codes).
- `synthesize` (text, optional voice name or language) -> `audio-start`, `audio-chunk`s (16-bit
  mono PCM at the engine's rate) as frames are decoded, `audio-stop`.
- streaming: `synthesize-start`, `synthesize-chunk`..., `synthesize-stop` -> one `audio-start`,
  `audio-chunk`s while chunks still arrive, `audio-stop`, then `synthesize-stopped`. The
  `synthesize` a client sends inside a stream (for servers without streaming) is ignored.
- errors -> `error` events with the protocol's stable codes (docs/protocol.md). After an error in
  a stream, its later chunks are ignored and `synthesize-stop` still gets `synthesize-stopped`.
"""
from __future__ import annotations

import asyncio
import logging
from functools import partial
from typing import Optional

from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event, async_read_event, async_write_event
from wyoming.info import Attribution, Describe, Info, TtsProgram, TtsVoice
from wyoming.ping import Ping, Pong
from wyoming.server import AsyncEventHandler, AsyncTcpServer
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped

from .. import __version__
from ..audio import to_pcm16
from ..engine.types import LANGUAGES, check_language
from ..errors import InvalidInput, MakimaError, SessionTimeout, SynthesisError, UnknownLanguage
from ..voices import GENERATED_VOICE
from .errors import public_message
from .speech import SpeechService
from .textstream import StreamedUtterance

log = logging.getLogger("makima_tts.server")

# our language names <-> ISO 639-1 (what Home Assistant speaks)
LANG_CODES = {"english": "en", "german": "de", "spanish": "es", "chinese": "zh", "japanese": "ja", "french": "fr",
              "korean": "ko", "russian": "ru", "italian": "it", "portuguese": "pt"}
_CODE_LANGS = {v: k for k, v in LANG_CODES.items()}
ATTRIBUTION = Attribution(name="makima-tts", url="")
WIDTH = 2            # 16-bit samples


def language_from_wyoming(language: Optional[str]) -> str:
    """A Wyoming language ("en", "en_US", "en-GB", or our name "english") as our language name."""
    if not language:
        return "auto"
    lang = str(language).strip().lower().replace("-", "_")
    if lang in _CODE_LANGS:
        return _CODE_LANGS[lang]
    if lang.split("_")[0] in _CODE_LANGS:
        return _CODE_LANGS[lang.split("_")[0]]
    try:
        return check_language(lang)
    except UnknownLanguage:
        raise UnknownLanguage(f"unknown language {str(language)[:40]!r}; use one of: "
                              f"{', '.join(sorted(_CODE_LANGS))}") from None


def _codes(language: Optional[str], engine) -> list[str]:
    """The languages a voice speaks: its own, or (auto) every language of a multilingual engine."""
    lang = (language or "auto").lower()
    if lang in LANG_CODES:
        return [LANG_CODES[lang]]
    if engine.supports_cloning:
        return [LANG_CODES[name] for name in getattr(engine, "languages", None) or LANGUAGES if name in LANG_CODES]
    return ["en"]


def voices_info(service: SpeechService) -> list[TtsVoice]:
    """The voices a request may name, as Wyoming describes them. Blocking (reads the library)."""
    engine = service.engines.engine
    assert engine is not None
    out: list[TtsVoice] = []
    if not engine.supports_cloning:
        for v in engine.builtin_voices():
            out.append(TtsVoice(name=v.voice_id, attribution=ATTRIBUTION, installed=True,
                                description=v.name or v.voice_id, version=None, languages=_codes(v.language, engine)))
        return out
    names = set()
    for r in service.voices.library.list():
        if not r.has_audio:
            continue
        names.add(r.voice_id)
        out.append(TtsVoice(name=r.voice_id, attribution=ATTRIBUTION, installed=True,
                            description=r.name or r.voice_id, version=None, languages=_codes(r.language, engine)))
    default = service.voices.default_voice_info().get("voice_id")
    if default == GENERATED_VOICE and GENERATED_VOICE not in names:      # made on first use
        out.append(TtsVoice(name=GENERATED_VOICE, attribution=ATTRIBUTION, installed=True,
                            description="Default (generated on first use)", version=None,
                            languages=_codes("english", engine)))
    return out


class WyomingHandler(AsyncEventHandler):
    """One Wyoming connection. Registered in service.sessions (busy / shut_down) so a shutdown drains it."""

    def __init__(self, service: SpeechService, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        super().__init__(reader, writer)
        self.service = service
        self._task: Optional[asyncio.Task] = None        # the utterance being spoken
        self._utt: Optional[StreamedUtterance] = None     # the open stream (synthesize-start .. stop)
        self._stream_failed = False                       # the open stream ended in an error
        self._write_lock = asyncio.Lock()
        self._closing = False

    # ------------------------------------------------------------------ lifecycle

    @property
    def busy(self) -> bool:
        return self._task is not None and not self._task.done()

    async def run(self) -> None:
        service = self.service
        service.sessions.add(self)
        service.metrics.wyoming_connections.inc()
        idle = service.settings.session_idle_timeout_s
        try:
            while not self._closing:
                try:
                    event = await asyncio.wait_for(async_read_event(self.reader),
                                                   idle if idle and idle > 0 else None)
                except asyncio.TimeoutError:
                    if self.busy or self._utt is not None:
                        continue
                    await self._error(SessionTimeout(f"no event for {idle:g} s; closing"))
                    break
                except (ConnectionError, asyncio.IncompleteReadError, ValueError):
                    break
                if event is None:
                    break
                if not await self.handle_event(event):
                    break
        except _Gone:
            pass
        finally:
            await self.disconnect()
            service.sessions.discard(self)
            service.metrics.wyoming_connections.dec()
            try:
                self.writer.close()
            except Exception:
                pass

    async def disconnect(self) -> None:
        self._cancel()
        if self._task is not None:
            await asyncio.wait({self._task})

    async def shut_down(self) -> None:
        """The server is shutting down: cancel what is left, say so (SERVER_SHUTDOWN), close."""
        from ..errors import ServerShutdown

        self._closing = True
        self._cancel()
        try:
            await asyncio.wait_for(self._error(ServerShutdown("the server is shutting down; retry later")), 1.0)
        except Exception:
            pass
        try:
            self.writer.close()
        except Exception:
            pass

    def _cancel(self) -> None:
        if self._utt is not None:
            self._utt.cancel()
        if self._task is not None and not self._task.done():
            self._task.cancel()

    # ------------------------------------------------------------------ events

    async def handle_event(self, event: Event) -> bool:
        try:
            await self._handle(event)
        except MakimaError as e:
            if self._utt is not None:            # an error ends the open stream
                self._utt.cancel()
                self._utt = None
                self._stream_failed = True
            await self._error(e)
        except (KeyError, TypeError, ValueError, AttributeError):
            await self._error(InvalidInput(f"{event.type[:40]}: malformed event (a field is missing or has the "
                                           "wrong type)"))
        return not self._closing

    async def _handle(self, event: Event) -> None:
        service = self.service
        if Describe.is_type(event.type):
            await self._write(await self.info())
        elif Synthesize.is_type(event.type):
            if self._utt is not None or self._stream_failed:
                return          # the copy of a streamed request sent for servers without streaming
            request = Synthesize.from_event(event)
            text = service.check_text(request.text)
            voice, language = self._voice(request.voice)
            service.check_open()
            await self._wait_idle()
            utt = StreamedUtterance(service, voice=voice, language=language, out_rate=await self._rate())
            utt.push(text)
            utt.end()
            self._task = asyncio.create_task(self._speak(utt, stream=False))
        elif SynthesizeStart.is_type(event.type):
            if self._utt is not None:
                raise InvalidInput("synthesize-start: a stream is open already; end it with synthesize-stop")
            self._stream_failed = False
            start = SynthesizeStart.from_event(event)
            voice, language = self._voice(start.voice)
            service.check_open()
            await self._wait_idle()
            self._utt = StreamedUtterance(service, voice=voice, language=language, out_rate=await self._rate())
            self._task = asyncio.create_task(self._speak(self._utt, stream=True))
        elif SynthesizeChunk.is_type(event.type):
            chunk = SynthesizeChunk.from_event(event)
            if self._utt is None:
                if self._stream_failed:
                    return
                raise InvalidInput("synthesize-chunk without synthesize-start")
            if not isinstance(chunk.text, str):
                raise InvalidInput("synthesize-chunk: text must be a string")
            self._utt.push(chunk.text)
        elif SynthesizeStop.is_type(event.type):
            if self._utt is None and not self._stream_failed:
                raise InvalidInput("synthesize-stop without synthesize-start")
            if self._utt is not None:
                utt, self._utt = self._utt, None
                utt.end()
                await self._wait_idle()
            self._stream_failed = False
            await self._write(SynthesizeStopped().event())
        elif Ping.is_type(event.type):
            await self._write(Pong(text=Ping.from_event(event).text).event())
        else:
            log.debug("wyoming: event %r ignored", event.type[:40])

    async def info(self) -> Event:
        service = self.service
        engine = await service.engines.get(wait=True)
        voices = await asyncio.get_running_loop().run_in_executor(service.executor, voices_info, service)
        program = TtsProgram(name="makima-tts", attribution=ATTRIBUTION, installed=True,
                             description=f"makima-tts streaming speech ({engine.name}: {engine.model_id})",
                             version=__version__, voices=voices, supports_synthesize_streaming=True)
        return Info(tts=[program]).event()

    def _voice(self, voice) -> tuple[Optional[str], str]:
        """(voice id or None, language) from Wyoming's optional voice {name, language, speaker}."""
        if voice is None:
            return None, "auto"
        name = voice.name
        if name is not None and (not isinstance(name, str) or len(name) > 128):
            raise InvalidInput("voice.name must be a voice id (a string of at most 128 characters)")
        return (name or None), language_from_wyoming(voice.language)

    async def _rate(self) -> int:
        return int((await self.service.engines.get(wait=True)).sample_rate)

    async def _wait_idle(self) -> None:
        """Utterances of one connection are spoken one after the other."""
        if self._task is not None and not self._task.done():
            await asyncio.wait({self._task})

    # ------------------------------------------------------------------ speaking

    async def _speak(self, utt: StreamedUtterance, stream: bool) -> None:
        """audio-start, audio-chunks as the audio is made, audio-stop; or an error event."""
        rate = utt.out_rate
        started = False
        agen = utt.audio()
        try:
            async for pcm in agen:
                if not started:
                    await self._write(AudioStart(rate=rate, width=WIDTH, channels=1).event())
                    started = True
                await self._write(AudioChunk(rate=rate, width=WIDTH, channels=1, audio=to_pcm16(pcm)).event())
            if utt.cancelled:
                return
            if not started:
                await self._write(AudioStart(rate=rate, width=WIDTH, channels=1).event())
            await self._write(AudioStop().event())
        except MakimaError as e:
            if stream and self._utt is utt:
                self._utt = None
                self._stream_failed = True
            utt.cancel()
            await self._error(e)
        except _Gone:
            utt.cancel()
            self._closing = True
            self.reader.feed_eof()
        except asyncio.CancelledError:
            utt.cancel()
            raise
        except Exception:
            log.exception("wyoming: synthesis failed")
            utt.cancel()
            await self._error(SynthesisError("synthesis failed (an internal error; the server log has the details)"))
        finally:
            await agen.aclose()

    # ------------------------------------------------------------------ sending

    async def _write(self, event: Event) -> None:
        """One event out within send_timeout_s; a client that accepts nothing that long is dropped."""
        timeout = self.service.settings.send_timeout_s

        async def locked() -> None:
            async with self._write_lock:
                await async_write_event(event, self.writer)
        try:
            await asyncio.wait_for(locked(), timeout if timeout and timeout > 0 else None)
        except asyncio.TimeoutError:
            log.warning("wyoming: the client accepted nothing for %g s; dropped", timeout)
            raise _Gone() from None
        except (ConnectionError, RuntimeError, OSError) as e:
            raise _Gone() from e

    async def _error(self, e: MakimaError) -> None:
        self.service.metrics.errors.labels(e.code).inc()
        try:
            await self._write(Error(text=public_message(e.message), code=e.code).event())
        except _Gone:
            pass


class _Gone(Exception):
    """The client went away or stopped reading."""


class WyomingServer:
    """The Wyoming TCP server on the HTTP server's host; started and stopped with the app."""

    def __init__(self, service: SpeechService, host: str, port: int):
        self.service = service
        self.host, self.port = host, int(port)
        self._server = AsyncTcpServer(self.host, self.port)

    async def start(self) -> None:
        await self._server.start(partial(WyomingHandler, self.service))
        log.info("Wyoming (Home Assistant) on tcp://%s:%d", self.host, self.port)
        if self.service.settings.api_keys:
            log.warning("Wyoming has no authentication: the API keys do not apply to tcp://%s:%d", self.host,
                        self.port)

    async def stop(self) -> None:
        server = getattr(self._server, "_server", None)
        if server is not None:
            server.close()
        await self._server.stop()
