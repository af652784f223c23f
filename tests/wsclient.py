"""A small synchronous WebSocket client for tests (the `websockets` package)."""
from __future__ import annotations

import json
from typing import Optional

from websockets.sync.client import connect


class Client:
    def __init__(self, url: str, **kw):
        self.ws = connect(url if "/api/v1/speak" in url else url + "/api/v1/speak", open_timeout=30,
                          max_size=None, **kw)
        self.log: list = []          # every message received, binary as bytes

    def send(self, **msg) -> None:
        self.ws.send(json.dumps(msg))

    def recv(self, timeout: float = 60.0):
        m = self.ws.recv(timeout=timeout)
        m = m if isinstance(m, bytes) else json.loads(m)
        self.log.append(m)
        return m

    def recv_json(self, timeout: float = 60.0) -> dict:
        """The next JSON message, skipping binary frames."""
        while True:
            m = self.recv(timeout)
            if isinstance(m, dict):
                return m

    def until(self, type_: str, id: Optional[str] = None, timeout: float = 120.0) -> tuple[list, bytes]:
        """Messages up to and including the first of `type_` (with `id`); and the audio bytes seen."""
        return self.until_one_of((type_,), id, timeout, exact=True)

    def utterance(self, text: str, id: str = "x", **kw) -> tuple[dict, bytes]:
        """speak, then (audio_end, audio bytes); raises on an error message."""
        self.send(type="speak", text=text, id=id, **kw)
        seen, audio = self.until_one_of(("audio_end", "error"), id)
        end = seen[-1]
        if end["type"] == "error":
            raise AssertionError(f"error from the server: {end}")
        return end, audio

    def until_one_of(self, types: tuple, id: Optional[str] = None, timeout: float = 120.0, exact: bool = False):
        """Like `until`, for any of `types`; unless `exact`, a message without an id also matches."""
        ids = (id,) if exact else (id, None)
        seen, audio = [], bytearray()
        while True:
            m = self.recv(timeout)
            if isinstance(m, bytes):
                audio += m
                continue
            seen.append(m)
            if m["type"] in types and (id is None or m.get("id") in ids):
                return seen, bytes(audio)

    def close(self) -> None:
        self.ws.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
