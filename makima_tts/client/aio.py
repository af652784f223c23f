"""The asyncio client for a makima-tts server (docs/protocol.md).

One WebSocket connection per client, opened on first use, kept alive by websockets' pings and
reused by successive utterances; after a drop the next call opens a new one, retrying with
exponential backoff and jitter. A circuit breaker (`CircuitBreaker`) sits in front of every call.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
import uuid
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, AsyncIterable, AsyncIterator, Callable, Optional, Union

import httpx
import numpy as np
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from .breaker import CircuitBreaker
from .errors import (CircuitOpen, ClientClosed, ClientError, ClientTimeout, ConnectError, ConnectionLost,
                     ConnectTimeout, FirstAudioTimeout, GapTimeout, Overloaded, ServerError, Unauthorized,
                     error_for, from_message)

FORMATS = ("pcm_s16le", "pcm_f32le")
SPEAK_PATH = "/api/v1/speak"
CLOSE_UNAUTHORIZED = 4401


@dataclass(frozen=True)
class ClientSettings:
    """Timeouts (seconds), retry and circuit-breaker settings."""

    connect_timeout: float = 10.0        # TCP + WebSocket handshake + the server's `ready`
    first_audio_timeout: float = 30.0    # from the request (or the connection's last message) to first audio
    chunk_gap_timeout: float = 15.0      # longest silence of the connection in the middle of an utterance
    http_timeout: float = 120.0          # HTTP calls (a voice upload computes its prompt)
    failure_threshold: int = 5           # consecutive failures that open the breaker
    cooldown_s: float = 10.0             # open -> half-open after this long
    connect_retries: int = 2             # further connection attempts after a failed one, in one call
    backoff_base_s: float = 0.2          # backoff before retry k: base * 2**(k-1), with jitter, at most backoff_max_s
    backoff_max_s: float = 5.0
    overload_retries: int = 2            # OVERLOADED: retried this many times after its retry hint
    overload_retry_s: float = 1.0        # the hint when the server sends none
    ping_interval_s: Optional[float] = 20.0
    ping_timeout_s: Optional[float] = 20.0


def _urls(url: str) -> tuple[str, str]:
    """(http base, ws speak URL) from http(s)://, ws(s):// or a bare host:port, with or without the path."""
    u = url.strip().rstrip("/")
    if u.endswith(SPEAK_PATH):
        u = u[: -len(SPEAK_PATH)]
    scheme, rest = u.split("://", 1) if "://" in u else ("http", u)
    scheme = scheme.lower()
    http = {"ws": "http", "wss": "https"}.get(scheme, scheme)
    ws = {"http": "ws", "https": "wss"}.get(scheme, scheme)
    return f"{http}://{rest}", f"{ws}://{rest}{SPEAK_PATH}"


def _cfg_key(cfg: dict) -> str:
    return json.dumps(cfg, sort_keys=True)


_DEFAULT_CFG = _cfg_key({"format": "pcm_s16le", "sample_rate": 24000})


class _Dropped(Exception):
    def __init__(self, error: ClientError):
        super().__init__(str(error))
        self.error = error


class _Sink:
    """Where the connection's reader puts one utterance's (or one text stream's) events."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.closed = False

    def put(self, event: tuple) -> None:
        if not self.closed:
            self.queue.put_nowait(event)


class _Connection:
    """One WebSocket session: a reader task routes messages to the sinks of the utterances."""

    def __init__(self, ws, url: str):
        self.ws = ws
        self.url = url
        self.ready: dict = {}
        self.config = _DEFAULT_CFG
        self.routes: dict[str, _Sink] = {}
        self.default_sink: Optional[_Sink] = None     # a text stream: every id the server names
        self.current: Optional[_Sink] = None           # whose audio_start came last: binary frames go there
        self.lock = asyncio.Lock()
        self.idle = asyncio.Event()
        self.idle.set()
        self.loading = False
        self.last_rx = time.monotonic()
        self.stopped = asyncio.Event()
        self.closed = asyncio.Event()
        self.close_error: Optional[ClientError] = None
        self._fatal: Optional[ClientError] = None
        self._ready_fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self.reader = asyncio.create_task(self._read())

    @property
    def usable(self) -> bool:
        return not self.closed.is_set() and not self.stopped.is_set()

    def _sink(self, uid: Optional[str]) -> Optional[_Sink]:
        if uid is not None and uid in self.routes:
            return self.routes[uid]
        return self.default_sink

    def _done(self, uid: Optional[str]) -> None:
        sink = self.routes.pop(uid, None) if uid is not None else None
        if sink is not None and sink is self.current:
            self.current = None
        if not self.routes:
            self.idle.set()

    def add_route(self, uid: str, sink: _Sink) -> None:
        self.routes[uid] = sink
        self.idle.clear()

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                self.last_rx = time.monotonic()
                if isinstance(raw, bytes):
                    if self.current is not None:
                        self.current.put(("audio", raw))
                    continue
                try:
                    msg = json.loads(raw)
                except ValueError:
                    continue
                self._dispatch(msg)
        except ConnectionClosed:
            pass
        except Exception as exc:          # a bug here must not leave callers waiting
            self._fatal = self._fatal or ConnectionLost(f"connection reader failed: {exc!r}")
        finally:
            self._on_closed()

    def _dispatch(self, msg: dict) -> None:
        kind = msg.get("type")
        uid = msg.get("id")
        if kind == "ready":
            self.ready = msg
            self.loading = False
            if not self._ready_fut.done():
                self._ready_fut.set_result(msg)
        elif kind == "status":
            self.loading = msg.get("state") == "loading"
        elif kind == "audio_start":
            sink = self._sink(uid)
            self.current = sink
            if sink is not None:
                sink.put(("start", msg))
        elif kind == "audio_end":
            sink = self._sink(uid)
            if sink is not None:
                sink.put(("end", msg))
            self._done(uid)
            self.current = None
        elif kind == "cancelled":
            seen = set()
            for cid in msg.get("ids") or []:
                sink = self._sink(cid)
                if sink is not None and id(sink) not in seen:
                    seen.add(id(sink))
                    sink.put(("cancelled", msg))
                self._done(cid)
            if self.default_sink is not None and id(self.default_sink) not in seen:
                self.default_sink.put(("cancelled", msg))
            self.current = None
        elif kind == "error":
            exc = from_message(msg)
            if uid is not None and uid in self.routes:
                self.routes[uid].put(("error", exc))
                self._done(uid)
            elif not self._ready_fut.done():
                self._ready_fut.set_exception(exc)
            elif not exc.recoverable:
                self._fatal = exc            # the server closes next
            elif self.default_sink is not None:
                self.default_sink.put(("error", exc))
        elif kind == "stopped":
            self.stopped.set()

    def _on_closed(self) -> None:
        code = getattr(self.ws, "close_code", None)
        reason = getattr(self.ws, "close_reason", "") or ""
        if code == CLOSE_UNAUTHORIZED:
            err: ClientError = Unauthorized(reason or "invalid or missing API key")
        elif self._fatal is not None:
            err = self._fatal
        else:
            err = ConnectionLost(f"the connection to {self.url} closed"
                                 + (f" (code {code}{': ' + reason if reason else ''})" if code else ""))
        self.close_error = err
        self.closed.set()
        if not self._ready_fut.done():
            self._ready_fut.set_exception(err)
            self._ready_fut.exception()          # retrieved: nobody may be waiting for it
        sinks = {id(s): s for s in list(self.routes.values()) + [self.default_sink] if s is not None}
        for sink in sinks.values():
            sink.put(("dropped", err))
        self.routes.clear()
        self.idle.set()

    async def wait_ready(self, timeout: float, loading_timeout: float) -> dict:
        """The next `ready`; waits longer while the server says the model is loading."""
        fut = self._ready_fut
        deadline = time.monotonic() + timeout
        while True:
            left = (max(deadline, self.last_rx + loading_timeout) if self.loading else deadline) - time.monotonic()
            if left <= 0:
                raise ConnectTimeout(f"no `ready` from {self.url} within {timeout:g} s")
            try:
                return await asyncio.wait_for(asyncio.shield(fut), timeout=min(left, 0.5))
            except asyncio.TimeoutError:
                continue

    async def configure(self, cfg: dict, timeout: float) -> None:
        """`start` with these session settings (the caller holds `lock` and waited for `idle`)."""
        key = _cfg_key(cfg)
        if key == self.config:
            return
        self._ready_fut = asyncio.get_running_loop().create_future()
        if self.closed.is_set():
            raise self.close_error or ConnectionLost("connection closed")
        await self.send({"type": "start", **cfg})
        await self.wait_ready(timeout, timeout)
        self.config = key

    async def send(self, msg: dict) -> None:
        try:
            await self.ws.send(json.dumps(msg))
        except ConnectionClosed:
            await self.closed.wait()
            raise _Dropped(self.close_error or ConnectionLost("connection closed")) from None

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.ws.close(), timeout=2)
        except Exception:
            pass
        self.reader.cancel()
        try:
            await self.reader
        except BaseException:
            pass

    def abort(self) -> None:
        """Drop the connection at once (a server that stopped answering)."""
        transport = getattr(self.ws, "transport", None)
        if transport is not None:
            transport.abort()


def _convert(data: bytes, fmt: str, as_array: bool):
    if not as_array:
        return data
    if fmt == "pcm_f32le":
        return np.frombuffer(data, "<f4").astype(np.float32)
    return (np.frombuffer(data, "<i2").astype(np.float32) / 32768.0).astype(np.float32)


class _Stream:
    """What Utterance and TextStream share: async iteration over audio chunks, timeouts."""

    def __init__(self, client: "AsyncClient", fmt: str, sample_rate: int, as_array: bool):
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}")
        self._client = client
        self.format = fmt
        self.sample_rate = sample_rate
        self.as_array = as_array
        self.cancelled = False
        self.audio_bytes = 0
        self._agen: Optional[AsyncIterator] = None
        self._conn: Optional[_Connection] = None

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._agen is None:
            self._agen = self._run()
        return await self._agen.__anext__()

    async def aclose(self) -> None:
        if self._agen is not None:
            await self._agen.aclose()

    async def read(self) -> Union[bytes, np.ndarray]:
        """All of the audio (bytes, or one float32 array when `as_array`)."""
        parts = [c async for c in self]
        if self.as_array:
            return np.concatenate(parts) if parts else np.zeros(0, np.float32)
        return b"".join(parts)

    def _run(self) -> AsyncIterator:
        raise NotImplementedError

    async def _next_event(self, conn: _Connection, sink: _Sink, limit: Optional[float], since: float,
                          timeout_cls) -> tuple:
        """The sink's next event; `timeout_cls` when the connection has been silent for `limit`
        seconds (counted from `since` or its last message, whichever is later)."""
        while True:
            if limit is None:
                return await sink.queue.get()
            left = max(since, conn.last_rx) + limit - time.monotonic()
            if left <= 0:
                raise timeout_cls(f"no audio from the server for {limit:g} s")
            try:
                return await asyncio.wait_for(sink.queue.get(), timeout=left)
            except asyncio.TimeoutError:
                continue


class Utterance(_Stream):
    """One `speak`: iterate it for the audio chunks as they arrive. After the iteration, `end`
    holds the server's `audio_end` (`audio_ms`, `ttfa_ms`, `rtf`), or `cancelled` is True."""

    def __init__(self, client: "AsyncClient", text: str, *, voice: Optional[str], language: Optional[str],
                 format: str, sample_rate: int, interrupt: bool, as_array: bool, id: Optional[str]):
        super().__init__(client, format, sample_rate, as_array)
        self.text = text
        self.voice = voice
        self.language = language
        self.interrupt = interrupt
        self.id = id or f"c{next(client._ids)}-{uuid.uuid4().hex[:8]}"
        self.end: Optional[dict] = None
        self.attempts = 0

    @property
    def stats(self) -> Optional[dict]:
        return self.end

    async def cancel(self) -> None:
        """Stop this utterance (the protocol's `cancel`: also drops what this client queued after it)."""
        if self._conn is not None and self._conn.usable and self.end is None:
            try:
                await self._conn.send({"type": "cancel"})
            except _Dropped:
                pass

    async def _run(self):
        c, s = self._client, self._client.settings
        overloads = drops = 0
        got_audio = False
        while True:
            self.attempts += 1
            await c._admit()
            conn = await c._shared_connection()
            self._conn = conn
            sink = _Sink()
            msg = {"type": "speak", "text": self.text, "id": self.id, "interrupt": self.interrupt}
            if self.voice is not None:
                msg["voice"] = self.voice
            if self.language is not None:
                msg["language"] = self.language
            cfg = c._session_cfg(self.format, self.sample_rate)
            try:
                async with conn.lock:
                    if _cfg_key(cfg) != conn.config:
                        await conn.idle.wait()
                        await conn.configure(cfg, s.connect_timeout)
                    conn.add_route(self.id, sink)
                    await conn.send(msg)
                sent = time.monotonic()
                while True:
                    limit, cls = ((s.chunk_gap_timeout, GapTimeout) if got_audio
                                  else (s.first_audio_timeout, FirstAudioTimeout))
                    kind, value = await self._next_event(conn, sink, limit, sent, cls)
                    if kind == "audio":
                        got_audio = True
                        self.audio_bytes += len(value)
                        yield _convert(value, self.format, self.as_array)
                    elif kind == "start":
                        self.voice = value.get("voice", self.voice)
                    elif kind == "end":
                        self.end = value
                        c._breaker.success()
                        return
                    elif kind == "cancelled":
                        self.cancelled = True
                        c._breaker.success()
                        return
                    elif kind == "error":
                        raise value
                    elif kind == "dropped":
                        raise _Dropped(value)
            except _Dropped as d:
                err = d.error
                if isinstance(err, Unauthorized):
                    raise err from None
                if err.counts_as_failure:       # (not e.g. the server's idle timeout racing this call)
                    c._failure(err)
                if got_audio or drops >= 1:
                    if isinstance(err, ConnectionLost):
                        err = ConnectionLost(f"utterance {self.id}: {err.message}", utterance_id=self.id)
                    raise err from None
                drops += 1                      # no audio yet: once more, on a new connection
            except Overloaded as e:
                wait = e.retry_after if e.retry_after is not None else s.overload_retry_s
                e.retry_after = wait
                if got_audio or overloads >= s.overload_retries:
                    c._failure(e)
                    raise
                overloads += 1
                await asyncio.sleep(wait)
            except ClientTimeout as e:
                e.utterance_id = self.id
                c._failure(e)
                conn.abort()                    # the server stopped answering: this connection is done
                raise
            except ServerError as e:
                if e.counts_as_failure:
                    c._failure(e)
                else:
                    c._breaker.success()        # the server answered: it is alive
                raise
            finally:
                sink.closed = True


class TextStream(_Stream):
    """`stream_text`: text pieces in (`text` messages), the audio of each sentence out, in order.
    Runs on a connection of its own, which ends with `flush` + `stop` once the pieces are done.
    After the iteration `ends` holds the `audio_end` of every sentence (ids `s1`, `s2`, ...)."""

    def __init__(self, client: "AsyncClient", pieces, *, voice: Optional[str], language: Optional[str],
                 format: str, sample_rate: int, as_array: bool):
        super().__init__(client, format, sample_rate, as_array)
        self._source = pieces
        self.voice = voice
        self.language = language
        self.pieces: list[str] = []
        self.ends: list[dict] = []
        self.ids: list[str] = []
        self._source_done = False
        self._source_error: Optional[BaseException] = None
        self._wake = asyncio.Event()
        self._cancel_requested = False
        self.attempts = 0

    async def cancel(self) -> None:
        """Stop speaking and drop the rest of the text (the protocol's `cancel`)."""
        self._cancel_requested = True
        self._wake.set()
        if self._conn is not None and self._conn.usable:
            try:
                await self._conn.send({"type": "cancel"})
            except _Dropped:
                pass

    async def _pull(self) -> None:
        try:
            async for piece in self._source:
                if self._cancel_requested:
                    break
                if piece:
                    self.pieces.append(piece)
                    self._wake.set()
        except Exception as exc:
            self._source_error = exc
        finally:
            self._source_done = True
            self._wake.set()

    async def _forward(self, conn: _Connection, stop_sent: asyncio.Event) -> None:
        i = 0
        while True:
            while i < len(self.pieces) and not self._cancel_requested:
                await conn.send({"type": "text", "text": self.pieces[i]})
                i += 1
            if self._cancel_requested or (self._source_done and i >= len(self.pieces)):
                break
            self._wake.clear()
            await self._wake.wait()
        if not self._cancel_requested and self._source_error is None:
            await conn.send({"type": "flush"})
        await conn.send({"type": "stop"})
        stop_sent.set()

    async def _run(self):
        c, s = self._client, self._client.settings
        cfg = c._session_cfg(self.format, self.sample_rate)
        if self.voice is not None:
            cfg["voice"] = self.voice
        if self.language is not None:
            cfg["language"] = self.language
        puller = asyncio.create_task(self._pull())
        drops = 0
        got_audio = False
        try:
            while True:
                self.attempts += 1
                await c._admit()
                conn = await c._open(cfg)
                self._conn = conn
                sink = _Sink()
                conn.default_sink = sink
                stop_sent = asyncio.Event()
                forwarder = asyncio.create_task(self._forward(conn, stop_sent))
                in_sentence = False
                mark = time.monotonic()
                try:
                    while True:
                        if forwarder.done() and forwarder.exception() is not None:
                            raise forwarder.exception()
                        if in_sentence:
                            limit, cls = s.chunk_gap_timeout, GapTimeout
                        elif stop_sent.is_set():
                            limit, cls = s.first_audio_timeout, FirstAudioTimeout
                            mark = max(mark, conn.last_rx)
                        else:
                            limit, cls = 0.5, None       # the text source may be slow: just poll
                        try:
                            kind, value = await self._next_event(conn, sink, limit, mark, cls or _Poll)
                        except _Poll:
                            mark = time.monotonic()
                            continue
                        if kind == "audio":
                            got_audio = True
                            self.audio_bytes += len(value)
                            yield _convert(value, self.format, self.as_array)
                        elif kind == "start":
                            in_sentence = True
                            self.ids.append(value.get("id"))
                        elif kind == "end":
                            in_sentence = False
                            mark = time.monotonic()
                            self.ends.append(value)
                        elif kind == "cancelled":
                            self.cancelled = True
                            in_sentence = False
                        elif kind == "error":
                            raise value
                        elif kind == "dropped":
                            if conn.stopped.is_set():
                                c._breaker.success()
                                if self._source_error is not None:
                                    raise self._source_error
                                return
                            raise _Dropped(value)
                except _Dropped as d:
                    err = d.error
                    if isinstance(err, Unauthorized):
                        raise err from None
                    if err.counts_as_failure:
                        c._failure(err)
                    if got_audio or drops >= 1:
                        raise err from None
                    drops += 1                  # no audio yet: replay the text on a new connection
                except ClientTimeout as e:
                    c._failure(e)
                    conn.abort()
                    raise
                except ServerError as e:
                    c._failure(e) if e.counts_as_failure else c._breaker.success()
                    raise
                finally:
                    sink.closed = True
                    forwarder.cancel()
                    try:
                        await forwarder
                    except BaseException:
                        pass
                    await conn.close()
        finally:
            puller.cancel()
            try:
                await puller
            except BaseException:
                pass


class _Poll(Exception):
    def __init__(self, *a, **k):
        super().__init__()


async def _aiter(pieces) -> AsyncIterator[str]:
    if hasattr(pieces, "__aiter__"):
        async for p in pieces:
            yield p
    else:
        for p in pieces:
            yield p


class AsyncClient:
    """A client of one makima-tts server.

    `url`: `http://host:port` (or `ws://...`, with or without `/api/v1/speak`). `api_key`: sent as
    `Authorization: Bearer KEY`. `format` / `sample_rate` / `sampling` (the protocol's `start`
    fields) are defaults for every utterance. Other keyword arguments are `ClientSettings` fields.
    `on_state_change(old, new)` is called on each change of the circuit breaker.
    """

    def __init__(self, url: str, api_key: Optional[str] = None, *, settings: Optional[ClientSettings] = None,
                 format: str = "pcm_s16le", sample_rate: int = 24000, sampling: Optional[dict] = None,
                 on_state_change: Optional[Callable[[str, str], None]] = None, **setting_overrides: Any):
        names = {f.name for f in fields(ClientSettings)}
        unknown = set(setting_overrides) - names
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
        self.settings = replace(settings or ClientSettings(), **setting_overrides)
        self.http_url, self.ws_url = _urls(url)
        self.api_key = api_key
        self.format = format
        self.sample_rate = sample_rate
        self.sampling = sampling
        self._breaker = CircuitBreaker(self.settings.failure_threshold, self.settings.cooldown_s, on_state_change)
        self._conn: Optional[_Connection] = None
        self._conn_lock: Optional[asyncio.Lock] = None
        self._http: Optional[httpx.AsyncClient] = None
        self._ids = itertools.count(1)
        self._closed = False
        self.connect_attempts = 0            # WebSocket connections tried (successful or not)
        self.connections_opened = 0

    # ------------------------------------------------------------------ state

    @property
    def breaker(self) -> CircuitBreaker:
        return self._breaker

    @property
    def state(self) -> str:
        """The circuit breaker's state: "closed", "open" or "half_open"."""
        return self._breaker.state

    @property
    def ready(self) -> dict:
        """The server's last `ready` message on the shared connection ({} before the first)."""
        return self._conn.ready if self._conn is not None else {}

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        if self._conn is not None:
            await self._conn.close()
            self._conn = None
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    # ------------------------------------------------------------------ speaking

    def speak(self, text: str, voice: Optional[str] = None, language: Optional[str] = None, *,
              format: Optional[str] = None, sample_rate: Optional[int] = None, interrupt: bool = False,
              as_array: bool = False, id: Optional[str] = None) -> Utterance:
        """An utterance; iterate it (`async for chunk in client.speak(...)`) for its audio chunks:
        bytes (PCM in `format`), or float32 arrays with `as_array=True`. `interrupt=True`: barge in
        (cancel what this client's connection is speaking and queued, speak this now)."""
        return Utterance(self, text, voice=voice, language=language, format=format or self.format,
                         sample_rate=sample_rate or self.sample_rate, interrupt=interrupt, as_array=as_array, id=id)

    def stream_text(self, pieces: Union[AsyncIterable[str], Any], voice: Optional[str] = None,
                    language: Optional[str] = None, *, format: Optional[str] = None,
                    sample_rate: Optional[int] = None, as_array: bool = False) -> TextStream:
        """Speak text that arrives in pieces (an LLM's output, an async or plain iterable), sentence
        by sentence as each completes; iterate the result for the audio."""
        return TextStream(self, _aiter(pieces), voice=voice, language=language, format=format or self.format,
                          sample_rate=sample_rate or self.sample_rate, as_array=as_array)

    async def cancel(self) -> None:
        """Cancel what the shared connection is speaking and everything queued on it."""
        if self._conn is not None and self._conn.usable:
            try:
                await self._conn.send({"type": "cancel"})
            except _Dropped:
                pass

    # ------------------------------------------------------------------ voices (HTTP)

    async def list_voices(self) -> list[dict]:
        voices: list[dict] = []
        offset = 0
        while True:
            page = await self._request("GET", "/api/v1/voices", params={"limit": 1000, "offset": offset})
            voices += page.get("voices", [])
            offset += len(page.get("voices", []))
            if not page.get("voices") or offset >= page.get("total", 0):
                return voices

    async def get_voice(self, voice_id: str) -> dict:
        return await self._request("GET", f"/api/v1/voices/{voice_id}")

    async def add_voice(self, voice_id: Optional[str], clip: Union[str, Path, bytes, tuple],
                        transcript: Optional[str] = None, *, name: Optional[str] = None,
                        language: Optional[str] = None, x_vector_only: bool = False) -> dict:
        """Clone a voice from `clip` (a file path, the file's bytes, or `(samples, sample_rate)`)
        and its transcript (or `x_vector_only=True`)."""
        if isinstance(clip, tuple):
            import io

            import soundfile as sf

            buf = io.BytesIO()
            sf.write(buf, np.asarray(clip[0], dtype=np.float32), int(clip[1]), format="WAV", subtype="PCM_16")
            data, filename = buf.getvalue(), "clip.wav"
        elif isinstance(clip, (bytes, bytearray)):
            data, filename = bytes(clip), "clip.wav"
        else:
            data, filename = Path(clip).read_bytes(), Path(clip).name
        form = {"x_vector_only": "true" if x_vector_only else "false"}
        for key, value in (("voice_id", voice_id), ("transcript", transcript), ("name", name),
                           ("language", language)):
            if value is not None:
                form[key] = value
        return await self._request("POST", "/api/v1/voices", data=form,
                                   files={"file": (filename, data, "application/octet-stream")})

    async def delete_voice(self, voice_id: str) -> dict:
        return await self._request("DELETE", f"/api/v1/voices/{voice_id}")

    async def health(self) -> dict:
        """GET /ready (through the breaker)."""
        return await self._request("GET", "/ready")

    # ------------------------------------------------------------------ internals

    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _session_cfg(self, fmt: str, rate: int) -> dict:
        cfg: dict = {"format": fmt, "sample_rate": rate}
        if self.sampling:
            cfg["sampling"] = self.sampling
        return cfg

    def _failure(self, exc: BaseException) -> None:
        self._breaker.failure(exc)

    def _http_client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=httpx.Timeout(self.settings.http_timeout,
                                                                 connect=self.settings.connect_timeout))
        return self._http

    async def _admit(self) -> None:
        """Through the breaker: CircuitOpen while open; the half-open probe (GET /ready) when due."""
        if self._closed:
            raise ClientClosed("the client is closed")
        if not self._breaker.admit():
            return
        try:
            r = await self._http_client().get(self.http_url + "/ready", headers=self._headers(),
                                              timeout=self.settings.connect_timeout)
            ok, why = r.status_code == 200, f"GET /ready answered {r.status_code}"
        except httpx.HTTPError as exc:
            ok, why = False, f"GET /ready failed: {type(exc).__name__}: {exc}"
        if ok:
            self._breaker.success()
            return
        err = ConnectError(why)
        self._breaker.failure(err)
        raise CircuitOpen(f"circuit breaker open: the half-open probe failed ({why}); next try in "
                          f"{self._breaker.retry_after():.1f} s", retry_after=self._breaker.retry_after()) from err

    async def _shared_connection(self) -> _Connection:
        if self._conn_lock is None:
            self._conn_lock = asyncio.Lock()
        async with self._conn_lock:
            if self._conn is not None and self._conn.usable:
                return self._conn
            if self._conn is not None:
                await self._conn.close()
                self._conn = None
            self._conn = await self._open(self._session_cfg(self.format, self.sample_rate))
            return self._conn

    async def _open(self, cfg: dict) -> _Connection:
        """A new connection with these session settings; retried with exponential backoff and
        jitter; each failed attempt counts for the breaker, which stops the retries once open."""
        s = self.settings
        last: Optional[ClientError] = None
        for attempt in range(s.connect_retries + 1):
            if attempt:
                step = min(s.backoff_max_s, s.backoff_base_s * 2 ** (attempt - 1))
                await asyncio.sleep(step / 2 + random.uniform(0, step / 2))
                try:
                    await self._admit()
                except CircuitOpen as exc:
                    raise exc from last
            try:
                return await self._connect_once(cfg)
            except Unauthorized:
                self._breaker.success()
                raise
            except ClientError as exc:
                if not exc.counts_as_failure:
                    self._breaker.success()
                    raise
                last = exc
                self._breaker.failure(exc)
        assert last is not None
        raise last

    async def _connect_once(self, cfg: dict) -> _Connection:
        s = self.settings
        self.connect_attempts += 1
        try:
            ws = await ws_connect(self.ws_url, additional_headers=self._headers() or None, open_timeout=s.connect_timeout,
                                  ping_interval=s.ping_interval_s, ping_timeout=s.ping_timeout_s, max_size=None,
                                  close_timeout=2, proxy=None)
        except (asyncio.TimeoutError, TimeoutError) as exc:
            raise ConnectTimeout(f"connecting to {self.ws_url} took more than {s.connect_timeout:g} s") from exc
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status == 401:
                raise Unauthorized("invalid or missing API key", status=status) from exc
            raise ConnectError(f"{self.ws_url} refused the WebSocket: HTTP {status}", status=status) from exc
        except (OSError, InvalidHandshake, InvalidURI) as exc:
            raise ConnectError(f"cannot connect to {self.ws_url}: {exc}") from exc
        conn = _Connection(ws, self.ws_url)
        try:
            await conn.wait_ready(s.connect_timeout, s.first_audio_timeout)
            await conn.configure(cfg, s.connect_timeout)
        except _Dropped as d:
            await conn.close()
            raise d.error from None
        except BaseException:
            await conn.close()
            raise
        self.connections_opened += 1
        return conn

    async def _request(self, method: str, path: str, **kw) -> Any:
        await self._admit()
        try:
            r = await self._http_client().request(method, self.http_url + path, headers=self._headers(), **kw)
        except httpx.TimeoutException as exc:
            err: ClientError = ClientTimeout(f"{method} {path}: {type(exc).__name__}: {exc}")
            self._breaker.failure(err)
            raise err from exc
        except httpx.HTTPError as exc:
            err = ConnectError(f"{method} {path}: {type(exc).__name__}: {exc}")
            self._breaker.failure(err)
            raise err from exc
        if r.status_code < 400:
            self._breaker.success()
            return r.json() if r.content else {}
        try:
            body = r.json().get("error") or {}
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {"message": str(body)}
        code = body.get("code") or {401: "UNAUTHORIZED", 404: "NOT_FOUND", 429: "OVERLOADED"}.get(
            r.status_code, "INTERNAL_ERROR" if r.status_code >= 500 else "INVALID_MESSAGE")
        retry = r.headers.get("retry-after")
        try:
            retry_after = float(retry) if retry is not None else None
        except ValueError:
            retry_after = None
        err = error_for(str(code), str(body.get("message") or r.text or f"HTTP {r.status_code}"),
                        status=r.status_code, retry_after=retry_after)
        if r.status_code >= 500 or err.counts_as_failure:
            self._breaker.failure(err)
        else:
            self._breaker.success()
        raise err
