"""Raw client sockets for abuse tests and the soak: hand-made WebSocket frames, a small receive buffer
(a client that reads nothing fills it fast)."""
from __future__ import annotations

import os
import socket
from typing import Union


def ws_frame(payload: Union[bytes, str], opcode: int = 1) -> bytes:
    """A masked WebSocket frame, as a client sends it (opcode 1: text)."""
    if isinstance(payload, str):
        payload = payload.encode()
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def raw_socket(port: int, rcvbuf: int = 4096) -> socket.socket:
    """A TCP connection to 127.0.0.1:port with a small receive buffer."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(30)
    s.connect(("127.0.0.1", port))
    return s


def read_head(s: socket.socket) -> bytes:
    """The HTTP response head (up to the blank line) from a raw socket, byte by byte."""
    head = b""
    while b"\r\n\r\n" not in head:
        b = s.recv(1)
        if not b:
            break
        head += b
    return head
