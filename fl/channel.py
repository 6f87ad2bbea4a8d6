"""The local channel between a site agent and the training script it started.

A socketpair inherited by the script (its fd in ``FL_CHANNEL_FD``) carries one JSON object per
line: requests from the script, replies from the agent. Models never travel on it: they are
safetensors files in the job's exchange folder, named in the messages.
"""

from __future__ import annotations

import json
import socket
import threading
from typing import Any

__all__ = ["MAX_LINE_BYTES", "ChannelClosed", "LineChannel"]

MAX_LINE_BYTES = 8 * 1024 * 1024


class ChannelClosed(ConnectionError):
    """The other end of the channel went away."""


class LineChannel:
    """JSON lines over a stream socket; ``send`` is thread-safe, ``recv`` is for one reader."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._reader = sock.makefile("rb", buffering=65536)
        self._send_lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        data = (json.dumps(message, separators=(",", ":"), allow_nan=False) + "\n").encode()
        if len(data) > MAX_LINE_BYTES:
            raise ValueError(f"channel message of {len(data)} bytes exceeds {MAX_LINE_BYTES}")
        with self._send_lock:
            try:
                self.sock.sendall(data)
            except OSError as exc:
                raise ChannelClosed(str(exc)) from exc

    def recv(self) -> dict[str, Any]:
        try:
            line = self._reader.readline(MAX_LINE_BYTES + 1)
        except OSError as exc:
            raise ChannelClosed(str(exc)) from exc
        if not line:
            raise ChannelClosed("channel closed")
        if len(line) > MAX_LINE_BYTES or not line.endswith(b"\n"):
            raise ValueError("channel message too long or truncated")
        message = json.loads(line)
        if not isinstance(message, dict) or "op" not in message:
            raise ValueError("channel messages must be JSON objects with an 'op'")
        return message

    def close(self) -> None:
        try:
            self._reader.close()
        finally:
            self.sock.close()
