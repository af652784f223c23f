"""One WebSocket session at /api/v1/speak: a reader that takes messages and a player that
speaks the queued utterances in order (docs/protocol.md).

`Session(ws, service)` is built by routes_ws with the SpeechService it speaks through. One
utterance: `_reader` -> `_handle(Speak)` (checked, queued) -> `_player` -> `_speak` ->
`service.speak(...)` (engine, voice, slot, synthesis) -> encoded -> `send_bytes`. An utterance is
cancelled one way: its CancelToken (`Utterance.cancel()`), which reaches the engine.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from ..audio import G711_FORMATS, make_encoder, to_f32le, to_pcm16
from ..bridge import CancelToken
from ..engine.types import check_language
from ..errors import InvalidInput, MakimaError, Overloaded, SendTimeout, ServerShutdown, SessionTimeout, \
    SynthesisError
from ..text import SentenceBuffer
from .auth import key_ok
from .errors import public_message
from .protocol import Cancel, Flush, Played, Speak, Start, Stop, Text, accepted, parse_message
from .speech import SpeechService, check_length, check_piece
from .stream import UtteranceStats

if TYPE_CHECKING:
    from ..engine.generate import TextFeed

log = logging.getLogger("makima_tts.server")
CLOSE_UNAUTHORIZED = 4401
CLOSE_TIMEOUT = 4408
CLOSE_UNAVAILABLE = 1011
CLOSE_RESTART = 1012          # the server is shutting down (SERVER_SHUTDOWN)
SHUTDOWN_SEND_S = 1.0         # on shutdown: how long each last message may take to leave
RECENT_UTTERANCES = 256       # utterances a `played` report may name (the latest ones of the session)


class _Gone(Exception):
    """The client went away."""


class _SendTimeout(_Gone):
    """The client accepted nothing for send_timeout_s."""


@dataclass
class Utterance:
    id: str
    text: str
    voice: Optional[str] = None
    language: Optional[str] = None
    feed: Optional[TextFeed] = field(default=None, repr=False)   # token mode: the engine's TextFeed
    token: CancelToken = field(default_factory=CancelToken, repr=False)
    audio_ms_sent: float = 0.0            # audio of this utterance handed to the client
    played_ms: Optional[float] = None     # the client's last `played` report for it

    def __post_init__(self) -> None:
        self.token.on_cancel(self.end_text)

    @property
    def cancelled(self) -> bool:
        return self.token.cancelled

    def cancel(self) -> None:
        """Stop it: the engine before its next frame, its text feed closed, nothing more sent."""
        self.token.cancel()

    def end_text(self) -> None:
        """Token mode: no more text for this utterance (its feed closes; the model finishes it)."""
        if self.feed is not None:
            self.feed.close()


class Session:
    def __init__(self, ws: WebSocket, service: SpeechService):
        self.ws = ws
        self.service = service
        self.id = uuid.uuid4().hex[:12]
        self.format = "pcm_s16le"
        self.sample_rate = 24000
        self.voice: Optional[str] = None
        self.language = "auto"
        self.sampling: Optional[dict] = None
        self.queue: deque[Utterance] = deque()
        self.current: Optional[Utterance] = None
        self.sentences = SentenceBuffer()
        self.text_mode: Optional[str] = None           # None: token where the engine can, else sentence
        self.streaming: Optional[Utterance] = None     # token mode: the utterance `text` pieces go to
        self._last_text = 0.0                          # when the last `text` piece came
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._ids = itertools.count(1)
        self._recent: OrderedDict[str, Utterance] = OrderedDict()   # by id, for `played` reports
        self._send_lock = asyncio.Lock()
        self.last_activity = time.monotonic()
        self.queued_chars = 0          # characters of the queued utterances
        self._gone = False             # the player has ended (the client went away)
        self._closing = False          # shut_down() is closing the session

    @property
    def busy(self) -> bool:
        """An utterance is being spoken (queued ones do not start while the server drains)."""
        return self.current is not None

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        ws, service = self.ws, self.service
        await ws.accept()
        if not key_ok(service.settings.api_keys, ws.headers, ws.query_params):
            await ws.close(CLOSE_UNAUTHORIZED, "invalid or missing API key")
            return
        service.metrics.active_sessions.inc()
        service.sessions.add(self)
        player = None
        try:
            if service.engines.engine is None:
                await self.send({"type": "status", "state": "loading", "message": "the model is loading"})
                try:
                    await service.engines.get(wait=True)
                except MakimaError as e:
                    await self.send_error(e, recoverable=False)
                    await ws.close(CLOSE_UNAVAILABLE, e.code)
                    return
            await self.send_ready()
            player = asyncio.create_task(self._player())
            await self._reader(player)
        except (_Gone, WebSocketDisconnect):
            pass
        finally:
            self._cancel_all()
            try:
                if player is not None:
                    player.cancel()
                    await asyncio.wait({player})         # not `await player`: its CancelledError is not ours
            finally:
                service.sessions.discard(self)
                service.metrics.active_sessions.dec()
            if ws.application_state == WebSocketState.CONNECTED and ws.client_state == WebSocketState.CONNECTED:
                try:
                    await asyncio.wait_for(ws.close(1000), SHUTDOWN_SEND_S)
                except (Exception, asyncio.TimeoutError):
                    pass

    async def shut_down(self) -> None:
        """The server is shutting down: cancel what is left, say so, close with 1012 (each step bounded)."""
        self._closing = True
        cut = self._cut()
        ids = self._cancel_all()
        try:
            if ids:
                await self.send_cancelled(ids, cut, timeout=SHUTDOWN_SEND_S)
            await self.send_error(ServerShutdown("the server is shutting down; reconnect and retry later"),
                                  timeout=SHUTDOWN_SEND_S)
            await asyncio.wait_for(self.ws.close(CLOSE_RESTART, "server shutting down"), SHUTDOWN_SEND_S)
        except (_Gone, Exception, asyncio.TimeoutError):
            pass

    async def _reader(self, player: asyncio.Task) -> None:
        idle_timeout = self.service.settings.session_idle_timeout_s
        while True:
            busy = self.current is not None or bool(self.queue)
            if busy:
                self.last_activity = time.monotonic()
            try:
                message = await asyncio.wait_for(self.ws.receive(), timeout=min(1.0, idle_timeout))
            except asyncio.TimeoutError:
                if player.done():
                    return
                self._end_stalled_text()
                if not busy and time.monotonic() - self.last_activity > idle_timeout:
                    await self.send_error(SessionTimeout(f"no message for {idle_timeout:g} s; closing"),
                                          recoverable=False)
                    await asyncio.wait_for(self.ws.close(CLOSE_TIMEOUT, "idle timeout"), SHUTDOWN_SEND_S)
                    return
                continue
            self.last_activity = time.monotonic()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is None:
                await self.send_error(InvalidInput("binary frames are not expected from the client; send JSON text"))
                continue
            try:
                msg = parse_message(message["text"])
                if isinstance(msg, Stop):
                    await self._stop(player)
                    return
                await self._handle(msg)
            except MakimaError as e:
                await self.send_error(e)

    async def _handle(self, msg) -> None:
        if isinstance(msg, Start):
            self.voice = msg.voice or None
            self.language = check_language(msg.language)
            self.format = msg.format
            self.sample_rate = msg.sample_rate
            self.sampling = msg.sampling.model_dump(exclude_none=True) if msg.sampling else None
            self.text_mode = msg.text_mode
            await self.send_ready()
        elif isinstance(msg, Speak):
            uid = msg.id or f"u{next(self._ids)}"
            try:
                self.service.check_open()
                self.service.check_text(msg.text)
                if msg.language is not None:
                    check_language(msg.language)
                if not msg.interrupt:
                    self._check_room(1, len(msg.text))
            except MakimaError as e:            # refused: the error names the utterance
                await self.send_error(e, id=uid)
                return
            if msg.interrupt:
                await self._cancel(send=True)
            self._enqueue(Utterance(uid, msg.text, msg.voice, msg.language))
        elif isinstance(msg, Text):
            self.service.check_open()
            if self._token_mode():
                self._feed_text(msg.text)
            else:
                self._push_text(msg.text)
        elif isinstance(msg, Flush):
            self.service.check_open()
            self._flush_text()
        elif isinstance(msg, Cancel):
            await self._cancel(send=True)
        elif isinstance(msg, Played):
            await self._played(msg)

    async def _played(self, msg: Played) -> None:
        """The client's report of how much of an utterance it has played: logged, kept for the next
        `cancelled`, counted in the metrics. Clamped to the audio sent."""
        utt = self._recent.get(msg.id)
        if utt is None:
            await self.send_error(InvalidInput(f"played: no utterance {msg.id[:40]!r} in this session (of its "
                                               f"latest {RECENT_UTTERANCES})"), id=msg.id)
            return
        ms = min(float(msg.ms), utt.audio_ms_sent)
        self.service.metrics.played_reports.inc()
        utt.played_ms = round(ms, 1)
        log.info("session %s: utterance %s played %.0f ms of %.0f ms sent%s", self.id, utt.id, ms,
                 utt.audio_ms_sent, " (cut)" if utt.cancelled else "")

    def _token_mode(self) -> bool:
        return self.text_mode != "sentence" and self.service.engines.streams_tokens

    def _feed_text(self, piece: str) -> None:
        """Token mode: the piece goes into the open utterance's TextFeed (one is opened and queued by the
        first piece); over a limit, nothing of it is taken."""
        max_chars = self.service.settings.max_text_chars
        check_length(piece, max_chars)
        utt = self.streaming
        if utt is None or utt.cancelled:
            self._check_room(1, len(piece))
            utt = Utterance(f"s{next(self._ids)}", "", feed=self.service.new_feed())
            self.streaming = utt
            self._enqueue(utt)
        elif self.queue and utt in self.queue:
            self._check_room(0, len(piece))
        self._last_text = time.monotonic()
        assert utt.feed is not None
        check_piece(piece, utt.feed.text, max_chars, pending=False,
                    hint=" (send flush to start the next utterance)")
        utt.feed.push(piece)
        if utt in self.queue:
            self.queued_chars += len(piece)
        utt.text += piece

    def _end_stalled_text(self) -> None:
        """Token mode: an utterance whose text stopped arriving (no `text` for text_idle_timeout_s) is
        ended as if flushed: it holds a generation slot while it waits."""
        utt = self.streaming
        idle = self.service.settings.text_idle_timeout_s
        if utt is not None and time.monotonic() - self._last_text > idle:
            log.info("session %s: no text for %g s; utterance %s ends with what it has", self.id, idle, utt.id)
            self._flush_text()

    def _flush_text(self) -> None:
        """`flush` (and `stop`): the text so far is spoken to its end."""
        if self.streaming is not None:
            self.streaming.end_text()
            self.streaming = None
        for sentence in self.sentences.flush():
            self._enqueue(Utterance(f"s{next(self._ids)}", sentence))

    def _push_text(self, piece: str) -> None:
        """Streamed text: the sentences it completes are queued; over a limit, nothing of it is taken."""
        pending = self.sentences.pending
        check_piece(piece, pending, self.service.settings.max_text_chars, pending=True)
        self._check_room(0, len(pending) + len(piece))
        sentences = self.sentences.push(piece)
        try:
            self._check_room(len(sentences), 0)
        except MakimaError:
            self.sentences.restore(pending)
            raise
        for sentence in sentences:
            self._enqueue(Utterance(f"s{next(self._ids)}", sentence))

    def _check_room(self, utterances: int, chars: int) -> None:
        """OVERLOADED when this session's queue would pass max_session_queue utterances or
        max_session_queue_chars characters (pending streamed text included)."""
        s = self.service.settings
        if utterances and len(self.queue) + utterances > s.max_session_queue:
            raise Overloaded(f"this session has {len(self.queue)} utterances queued; the limit is "
                             f"{s.max_session_queue}: wait for audio_end, or cancel")
        if chars and self.queued_chars + chars > s.max_session_queue_chars:
            raise Overloaded(f"this session has {self.queued_chars} characters queued; the limit is "
                             f"{s.max_session_queue_chars}: wait for audio_end, or cancel")

    def _enqueue(self, utt: Utterance) -> None:
        self._recent.pop(utt.id, None)
        self._recent[utt.id] = utt
        while len(self._recent) > RECENT_UTTERANCES:
            self._recent.popitem(last=False)
        self.queue.append(utt)
        self.queued_chars += len(utt.text)
        self._idle.clear()
        self._wakeup.set()

    def _dequeue(self) -> Utterance:
        utt = self.queue.popleft()
        self.queued_chars = max(0, self.queued_chars - len(utt.text))
        return utt

    def _cancel_all(self) -> list[str]:
        ids = []
        if self.current is not None and not self.current.cancelled:
            self.current.cancel()
            ids.append(self.current.id)
        while self.queue:
            utt = self._dequeue()
            utt.cancel()
            ids.append(utt.id)
        self.queued_chars = 0
        self.sentences.reset()
        if self.streaming is not None:
            self.streaming.end_text()
            self.streaming = None
        return ids

    def _cut(self) -> Optional[Utterance]:
        """The utterance a cancel now would cut (being spoken, not cancelled yet), if any."""
        utt = self.current
        return utt if utt is not None and not utt.cancelled else None

    async def _cancel(self, send: bool) -> None:
        cut = self._cut()
        ids = self._cancel_all()
        if send:
            await self.send_cancelled(ids, cut)

    async def _stop(self, player: asyncio.Task) -> None:
        self._flush_text()
        idle = asyncio.ensure_future(self._idle.wait())
        try:
            # the player may end first: the client went away, or stopped reading
            await asyncio.wait({idle, player}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            idle.cancel()
        if self._gone or player.done() or not self._idle.is_set():
            raise _Gone()
        await self.send({"type": "stopped"})
        await asyncio.wait_for(self.ws.close(1000), SHUTDOWN_SEND_S)

    # ------------------------------------------------------------------ speaking

    async def _player(self) -> None:
        try:
            await self._play()
        except _Gone:
            pass
        finally:
            # whoever waits for the queue to empty (`stop`) must not wait for a player that has left
            self._gone = True
            self._idle.set()

    async def _play(self) -> None:
        while True:
            while not self.queue or self.service.draining or self._closing:
                self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
            utt = self._dequeue()
            self.current = utt
            try:
                await self._speak(utt)
            except _SendTimeout:
                await self._send_timed_out(utt)
            except MakimaError as e:
                self.service.metrics.utterance(self.service.engines.name, "error")
                if not utt.cancelled:
                    await self.send_error(e, id=utt.id)
            except _Gone:
                raise
            except Exception:   # a bug must not kill the session
                log.exception("utterance %s failed", utt.id)
                self.service.metrics.utterance(self.service.engines.name, "error")
                await self.send_error(SynthesisError("synthesis failed (an internal error; the server log has "
                                                     "the details)"), id=utt.id)
            finally:
                self.current = None
                self.last_activity = time.monotonic()

    async def _send_timed_out(self, utt: Utterance) -> None:
        """The client accepted no audio for send_timeout_s: this utterance (its slot is free again by now)
        and the queue are dropped; the client hears why once it reads again."""
        timeout = self.service.settings.send_timeout_s
        log.warning("session %s: the client accepted no audio for %g s; utterance %s cancelled",
                    self.id, timeout, utt.id)
        ids = [utt.id] + self._cancel_all()
        self.current = None
        await self.send_error(SendTimeout(f"no audio was accepted for {timeout:g} s: the utterance and those "
                                          f"queued after it are cancelled"), id=utt.id)
        await self.send_cancelled(list(dict.fromkeys(ids)), utt)

    async def _speak(self, utt: Utterance) -> None:
        if utt.cancelled:
            return
        st = UtteranceStats()
        if self.format in G711_FORMATS:
            encode = make_encoder(self.format, self.sample_rate).encode     # PyAV's G.711 encoder
        else:
            encode = to_pcm16 if self.format == "pcm_s16le" else to_f32le
        started = False
        audio = self.service.speak(utt.feed if utt.feed is not None else utt.text, voice=utt.voice,
                                   session_voice=self.voice, language=utt.language or self.language,
                                   sampling=self.sampling, out_rate=self.sample_rate, cancel=utt.token, stats=st)
        try:
            async for pcm in audio:
                if utt.cancelled:
                    break
                if not started:
                    await self.send(self._audio_start(utt, st))
                    started = True
                await self.send_bytes(encode(pcm), utt, ms=len(pcm) * 1000.0 / self.sample_rate)
        finally:
            await audio.aclose()
        self.service.metrics.utterance(self.service.engines.name, "cancelled" if utt.cancelled else "ok", st)
        if utt.cancelled:
            return
        if not started:
            await self.send(self._audio_start(utt, st))
        await self.send({"type": "audio_end", "id": utt.id, "audio_ms": round(st.audio_s * 1000, 1),
                         "ttfa_ms": None if st.ttfa_s is None else round(st.ttfa_s * 1000, 1),
                         "rtf": None if st.rtf is None else round(st.rtf, 3)})

    @staticmethod
    def _audio_start(utt: Utterance, st: UtteranceStats) -> dict:
        msg: dict[str, Any] = {"type": "audio_start", "id": utt.id, "voice": st.voice}
        if utt.feed is not None:          # token mode: text tokens the voice needed before it could start
            msg["tokens_needed"] = st.tokens_needed
        return msg

    # ------------------------------------------------------------------ sending

    async def send_ready(self) -> None:
        service = self.service
        engine = service.engines.engine
        assert engine is not None
        default = service.voices.default_voice_info()
        await self.send({"type": "ready", "session_id": self.id, "sample_rate": self.sample_rate,
                         "format": self.format, "channels": 1, "voice": self.voice or default.get("voice_id"),
                         "default_voice": default, "language": self.language,
                         "model": str(engine.model_id), "engine": engine.name,
                         "text_mode": "token" if self._token_mode() else "sentence",
                         **accepted(service.settings.max_text_chars, getattr(engine, "languages", None))})

    async def send_error(self, e: MakimaError, id: Optional[str] = None, recoverable: Optional[bool] = None,
                         timeout: Optional[float] = None) -> None:
        self.service.metrics.errors.labels(e.code).inc()
        msg = {"type": "error", "code": e.code, "message": public_message(e.message),
               "recoverable": e.recoverable if recoverable is None else recoverable}
        if id is not None:
            msg["id"] = id[:128]
        retry_after_ms = getattr(e, "retry_after_ms", None)
        if isinstance(retry_after_ms, int):     # OVERLOADED: when to retry
            msg["retry_after_ms"] = retry_after_ms
        await self.send(msg, timeout=timeout)

    async def send(self, obj: dict, timeout: Optional[float] = None) -> None:
        await self._send(lambda: self.ws.send_json(obj), timeout)

    async def send_cancelled(self, ids: list, cut: Optional[Utterance], timeout: Optional[float] = None) -> None:
        """`cancelled`, with what the cut utterance had sent and (as last reported) played. Built under
        the send lock, so audio_ms_sent counts every byte that left before it."""
        def message() -> dict:
            msg = {"type": "cancelled", "ids": ids, "audio_ms_sent": 0.0, "played_ms": None}
            if cut is not None:
                msg.update(id=cut.id[:128], audio_ms_sent=round(cut.audio_ms_sent, 1), played_ms=cut.played_ms)
                m = self.service.metrics
                m.cut_audio_seconds.labels("sent").inc(cut.audio_ms_sent / 1000.0)
                if cut.played_ms is not None:
                    m.cut_audio_seconds.labels("played").inc(cut.played_ms / 1000.0)
                log.info("session %s: utterance %s cut after %.0f ms of audio sent, %s played", self.id, cut.id,
                         cut.audio_ms_sent, "unknown ms" if cut.played_ms is None else f"{cut.played_ms:.0f} ms")
            return msg
        await self._send(lambda: self.ws.send_json(message()), timeout)

    async def send_bytes(self, data: bytes, utt: Utterance, ms: float = 0.0) -> None:
        if utt.cancelled:        # nothing of a cancelled utterance after `cancelled`
            return

        async def sending() -> None:
            await self.ws.send_bytes(data)
            utt.audio_ms_sent += ms
        await self._send(sending, None, utt)
        self.last_activity = time.monotonic()

    async def _send(self, sending, timeout: Optional[float], utt: Optional[Utterance] = None) -> None:
        """One message out, under the send lock, within `timeout` (send_timeout_s): a client that
        accepts nothing for that long raises _SendTimeout."""
        timeout = self.service.settings.send_timeout_s if timeout is None else timeout

        async def locked() -> None:
            async with self._send_lock:
                if utt is not None and utt.cancelled:
                    return
                await sending()
        try:
            await asyncio.wait_for(locked(), timeout if timeout and timeout > 0 else None)
        except asyncio.TimeoutError:
            raise _SendTimeout() from None
        except (WebSocketDisconnect, RuntimeError, OSError) as e:
            raise _Gone() from e
