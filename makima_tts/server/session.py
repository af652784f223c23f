"""One WebSocket session at /api/v1/speak: a reader that takes messages and a player that
speaks the queued utterances in order (docs/protocol.md)."""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from ..audio import to_f32le, to_pcm16
from ..engine.types import check_language
from ..errors import InvalidInput, MakimaError, SessionTimeout, SynthesisError
from ..text import SentenceBuffer
from .auth import websocket_key_ok
from .protocol import Cancel, Flush, Speak, Start, Stop, Text, parse_message
from .stream import Synthesis

log = logging.getLogger("makima_tts.server")
CLOSE_UNAUTHORIZED = 4401
CLOSE_TIMEOUT = 4408
CLOSE_UNAVAILABLE = 1011


class _Gone(Exception):
    """The client went away."""


@dataclass
class Utterance:
    id: str
    text: str
    voice: Optional[str] = None
    language: Optional[str] = None
    cancelled: bool = False
    synth: Optional[Synthesis] = field(default=None, repr=False)

    def cancel(self) -> None:
        self.cancelled = True
        if self.synth is not None:
            self.synth.cancel()


class Session:
    def __init__(self, ws: WebSocket):
        self.ws = ws
        self.ctx = ws.app.state.ctx
        self.id = uuid.uuid4().hex[:12]
        self.format = "pcm_s16le"
        self.sample_rate = 24000
        self.voice: Optional[str] = None
        self.language = "auto"
        self.sampling: Optional[dict] = None
        self.queue: deque[Utterance] = deque()
        self.current: Optional[Utterance] = None
        self.sentences = SentenceBuffer()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._ids = itertools.count(1)
        self._send_lock = asyncio.Lock()
        self.last_activity = time.monotonic()

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        ws, ctx = self.ws, self.ctx
        await ws.accept()
        if not websocket_key_ok(ws):
            await ws.close(CLOSE_UNAUTHORIZED, "invalid or missing API key")
            return
        ctx.metrics.active_sessions.inc()
        player = None
        try:
            if ctx.engine is None:
                await self.send({"type": "status", "state": "loading", "message": "the model is loading"})
                try:
                    await ctx.get_engine(wait=True)
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
            if player is not None:
                player.cancel()
                try:
                    await player
                except BaseException:
                    pass
            ctx.metrics.active_sessions.dec()
            if ws.application_state == WebSocketState.CONNECTED and ws.client_state == WebSocketState.CONNECTED:
                try:
                    await ws.close(1000)
                except Exception:
                    pass

    async def _reader(self, player: asyncio.Task) -> None:
        idle_timeout = self.ctx.settings.session_idle_timeout_s
        while True:
            busy = self.current is not None or bool(self.queue)
            if busy:
                self.last_activity = time.monotonic()
            try:
                message = await asyncio.wait_for(self.ws.receive(), timeout=min(1.0, idle_timeout))
            except asyncio.TimeoutError:
                if player.done():
                    return
                if not busy and time.monotonic() - self.last_activity > idle_timeout:
                    await self.send_error(SessionTimeout(f"no message for {idle_timeout:g} s; closing"),
                                          recoverable=False)
                    await self.ws.close(CLOSE_TIMEOUT, "idle timeout")
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
                    await self._stop()
                    return
                await self._handle(msg)
            except MakimaError as e:
                await self.send_error(e, id=getattr(e, "utterance_id", None))

    async def _handle(self, msg) -> None:
        if isinstance(msg, Start):
            self.voice = msg.voice or None
            self.language = check_language(msg.language)
            self.format = msg.format
            self.sample_rate = msg.sample_rate
            self.sampling = msg.sampling.model_dump(exclude_none=True) if msg.sampling else None
            await self.send_ready()
        elif isinstance(msg, Speak):
            uid = msg.id or f"u{next(self._ids)}"
            try:
                self.ctx.check_text(msg.text)
                if msg.language is not None:
                    check_language(msg.language)
            except MakimaError as e:
                e.utterance_id = uid
                raise
            if msg.interrupt:
                await self._cancel(send=True)
            self._enqueue(Utterance(uid, msg.text, msg.voice, msg.language))
        elif isinstance(msg, Text):
            for sentence in self.sentences.push(msg.text):
                self._enqueue(Utterance(f"s{next(self._ids)}", sentence))
        elif isinstance(msg, Flush):
            for sentence in self.sentences.flush():
                self._enqueue(Utterance(f"s{next(self._ids)}", sentence))
        elif isinstance(msg, Cancel):
            await self._cancel(send=True)

    def _enqueue(self, utt: Utterance) -> None:
        self.queue.append(utt)
        self._idle.clear()
        self._wakeup.set()

    def _cancel_all(self) -> list[str]:
        ids = []
        if self.current is not None and not self.current.cancelled:
            self.current.cancel()
            ids.append(self.current.id)
        while self.queue:
            utt = self.queue.popleft()
            utt.cancelled = True
            ids.append(utt.id)
        self.sentences.reset()
        return ids

    async def _cancel(self, send: bool) -> None:
        ids = self._cancel_all()
        if send:
            await self.send({"type": "cancelled", "ids": ids})

    async def _stop(self) -> None:
        for sentence in self.sentences.flush():
            self._enqueue(Utterance(f"s{next(self._ids)}", sentence))
        await self._idle.wait()
        await self.send({"type": "stopped"})
        await self.ws.close(1000)

    # ------------------------------------------------------------------ speaking

    async def _player(self) -> None:
        while True:
            while not self.queue:
                self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
            utt = self.queue.popleft()
            self.current = utt
            try:
                await self._speak(utt)
            except _Gone:
                return
            except MakimaError as e:
                self.ctx.metrics.utterance(self.ctx.engine_name, "error")
                if not utt.cancelled:
                    await self.send_error(e, id=utt.id)
            except Exception as e:   # a bug must not kill the session
                log.exception("utterance %s failed", utt.id)
                self.ctx.metrics.utterance(self.ctx.engine_name, "error")
                await self.send_error(SynthesisError(f"synthesis failed: {type(e).__name__}: {e}"), id=utt.id)
            finally:
                self.current = None
                self.last_activity = time.monotonic()

    async def _speak(self, utt: Utterance) -> None:
        synth = Synthesis(self.ctx, utt.text, voice=utt.voice, session_voice=self.voice,
                          language=utt.language or self.language, sampling=self.sampling, out_rate=self.sample_rate)
        utt.synth = synth
        if utt.cancelled:
            return
        encode = to_pcm16 if self.format == "pcm_s16le" else to_f32le
        started = False
        agen = synth.run()
        try:
            async for pcm in agen:
                if utt.cancelled:
                    break
                if not started:
                    await self.send({"type": "audio_start", "id": utt.id, "voice": synth.stats.voice})
                    started = True
                await self.send_bytes(encode(pcm), utt)
        finally:
            await agen.aclose()
        st = synth.stats
        self.ctx.metrics.utterance(self.ctx.engine_name, "cancelled" if utt.cancelled else "ok", st)
        if utt.cancelled:
            return
        if not started:
            await self.send({"type": "audio_start", "id": utt.id, "voice": st.voice})
        await self.send({"type": "audio_end", "id": utt.id, "audio_ms": round(st.audio_s * 1000, 1),
                         "ttfa_ms": None if st.ttfa_s is None else round(st.ttfa_s * 1000, 1),
                         "rtf": None if st.rtf is None else round(st.rtf, 3)})

    # ------------------------------------------------------------------ sending

    async def send_ready(self) -> None:
        ctx = self.ctx
        default = ctx.default_voice_info()
        await self.send({"type": "ready", "session_id": self.id, "sample_rate": self.sample_rate,
                         "format": self.format, "channels": 1, "voice": self.voice or default.get("voice_id"),
                         "default_voice": default, "language": self.language,
                         "model": str(ctx.engine.model_id), "engine": ctx.engine.name})

    async def send_error(self, e: MakimaError, id: Optional[str] = None, recoverable: Optional[bool] = None) -> None:
        self.ctx.metrics.errors.labels(e.code).inc()
        msg = {"type": "error", "code": e.code, "message": e.message,
               "recoverable": e.recoverable if recoverable is None else recoverable}
        if id is not None:
            msg["id"] = id
        await self.send(msg)

    async def send(self, obj: dict) -> None:
        try:
            async with self._send_lock:
                await self.ws.send_json(obj)
        except (WebSocketDisconnect, RuntimeError, OSError) as e:
            raise _Gone() from e

    async def send_bytes(self, data: bytes, utt: Utterance) -> None:
        try:
            async with self._send_lock:
                if utt.cancelled:        # nothing of a cancelled utterance after `cancelled`
                    return
                await self.ws.send_bytes(data)
        except (WebSocketDisconnect, RuntimeError, OSError) as e:
            raise _Gone() from e
        self.last_activity = time.monotonic()
