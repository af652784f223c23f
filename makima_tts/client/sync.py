"""`Client`: the blocking face of `AsyncClient`, which runs on an event loop in a thread of its own."""
from __future__ import annotations

import asyncio
import threading
from typing import Any, Iterable, Iterator, Optional

from .aio import AsyncClient


class _Loop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="makima-tts-client", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: Optional[float] = None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()


class SyncStream:
    """A blocking iterator over an `Utterance` or `TextStream`; its attributes (`end`, `ends`,
    `cancelled`, `id`, ...) are the async object's."""

    def __init__(self, client: "Client", stream):
        self._client = client
        self._stream = stream

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        try:
            return self._client._loop.run(self._stream.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def read(self):
        return self._client._loop.run(self._stream.read())

    def cancel(self) -> None:
        """Safe from any thread (e.g. while another thread iterates)."""
        self._client._loop.run(self._stream.cancel())

    def close(self) -> None:
        self._client._loop.run(self._stream.aclose())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class Client:
    """Blocking client: same arguments and methods as `AsyncClient`, without `await`.

    ```python
    with Client("http://127.0.0.1:8000") as tts:
        for chunk in tts.speak("Hello there.", voice="makima"):
            play(chunk)
    ```
    """

    def __init__(self, url: str, api_key: Optional[str] = None, **kw: Any):
        self._loop = _Loop()
        try:
            self._aio: AsyncClient = self._loop.run(self._make(url, api_key, kw))
        except BaseException:
            self._loop.stop()
            raise

    @staticmethod
    async def _make(url, api_key, kw) -> AsyncClient:
        return AsyncClient(url, api_key, **kw)

    @property
    def aio(self) -> AsyncClient:
        return self._aio

    @property
    def state(self) -> str:
        return self._aio.state

    @property
    def breaker(self):
        return self._aio.breaker

    @property
    def settings(self):
        return self._aio.settings

    def speak(self, text: str, voice: Optional[str] = None, language: Optional[str] = None, **kw: Any) -> SyncStream:
        return SyncStream(self, self._aio.speak(text, voice, language, **kw))

    def stream_text(self, pieces: Iterable[str], voice: Optional[str] = None, language: Optional[str] = None,
                    **kw: Any) -> SyncStream:
        """`pieces` is a plain iterable (it may block, e.g. an LLM's stream): it is read in a worker thread."""
        return SyncStream(self, self._aio.stream_text(_threaded(pieces), voice, language, **kw))

    def cancel(self) -> None:
        self._loop.run(self._aio.cancel())

    def list_voices(self) -> list[dict]:
        return self._loop.run(self._aio.list_voices())

    def get_voice(self, voice_id: str) -> dict:
        return self._loop.run(self._aio.get_voice(voice_id))

    def add_voice(self, voice_id: Optional[str], clip, transcript: Optional[str] = None, **kw: Any) -> dict:
        return self._loop.run(self._aio.add_voice(voice_id, clip, transcript, **kw))

    def delete_voice(self, voice_id: str) -> dict:
        return self._loop.run(self._aio.delete_voice(voice_id))

    def health(self) -> dict:
        return self._loop.run(self._aio.health())

    def close(self) -> None:
        if self._loop.loop.is_closed():
            return
        try:
            self._loop.run(self._aio.close(), timeout=10)
        finally:
            self._loop.stop()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


async def _threaded(pieces: Iterable[str]):
    it = iter(pieces)
    done = object()
    while True:
        piece = await asyncio.to_thread(next, it, done)
        if piece is done:
            return
        yield piece
