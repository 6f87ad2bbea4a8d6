"""The local channel between a site agent and the training script it started.

A socketpair inherited by the script (its fd in ``FL_CHANNEL_FD``) carries one JSON object per
line: requests from the script, replies from the agent. Task models are safetensors files in the
job's exchange folder, named in the messages; a result may come back on the channel itself, as raw
bytes after a ``data`` line, in the pieces the agent pulls while uploading it (no file in between).
A script run as ranks of ``torch.distributed.run`` inherits no fd: its rank 0 connects to a unix socket instead
(:class:`ChannelListener`, path in ``FL_CHANNEL_PATH``), proving with ``FL_CHANNEL_TOKEN`` that the
job's own process tree started it; the listener accepts that one connection and is gone.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

__all__ = ["MAX_LINE_BYTES", "ChannelClosed", "ChannelListener", "LineChannel", "connect_channel"]

MAX_LINE_BYTES = 8 * 1024 * 1024
#: A unix socket's path must fit in sun_path (108 bytes on Linux, with its NUL).
MAX_SOCKET_PATH = 100
#: Seconds a connection to the listener has to say hello with the token; failed attempts before it gives up.
HELLO_TIMEOUT_S = 10.0
MAX_BAD_HELLOS = 16


class ChannelClosed(ConnectionError):
    """The other end of the channel went away."""


class LineChannel:
    """JSON lines over a stream socket; ``send`` is thread-safe, ``recv`` is for one reader."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._reader = sock.makefile("rb", buffering=65536)
        self._send_lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        self._send(message, None)

    def _send(self, message: dict[str, Any], body: Path | None) -> None:
        """One JSON line, and with ``body`` the file's bytes after it (as one write under the lock)."""
        data = (json.dumps(message, separators=(",", ":"), allow_nan=False) + "\n").encode()
        if len(data) > MAX_LINE_BYTES:
            raise ValueError(f"channel message of {len(data)} bytes exceeds {MAX_LINE_BYTES}")
        with self._send_lock:
            try:
                self.sock.sendall(data)
                if body is not None:
                    with body.open("rb") as f:
                        self.sock.sendfile(f)
            except OSError as exc:
                raise ChannelClosed(str(exc)) from exc

    def send_bytes(self, message: dict[str, Any], pieces: Iterable[bytes | memoryview]) -> None:
        """One JSON line, then the raw bytes of ``pieces`` (the line says how many), all under the send lock."""
        data = (json.dumps(message, separators=(",", ":"), allow_nan=False) + "\n").encode()
        with self._send_lock:
            try:
                self.sock.sendall(data)
                for piece in pieces:
                    self.sock.sendall(piece)
            except OSError as exc:
                raise ChannelClosed(str(exc)) from exc

    def recv_bytes(self, size: int) -> bytes:
        """The ``size`` raw bytes that follow a message sent with :meth:`send_bytes`."""
        try:
            data: bytes = self._reader.read(size)
        except OSError as exc:
            raise ChannelClosed(str(exc)) from exc
        if len(data) != size:
            raise ChannelClosed(f"channel closed inside a body ({len(data)} of {size} bytes)")
        return data

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
        if not isinstance(message, dict) or not isinstance(message.get("op"), str):
            raise ValueError("channel messages must be JSON objects with an 'op'")
        return message

    def close(self) -> None:
        try:
            self._reader.close()
        finally:
            self.sock.close()


class ChannelListener:
    """A unix socket that the first process presenting the token becomes the channel of (then it is removed)."""

    def __init__(self, folder: Path) -> None:
        path = Path(folder) / "channel.sock"
        self._own_dir: Path | None = None
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:  # a deep workspace: a private folder of its own instead
            self._own_dir = Path(tempfile.mkdtemp(prefix="fl-channel-"))
            path = self._own_dir / "channel.sock"
        path.unlink(missing_ok=True)
        self.path = path
        self.token = secrets.token_hex(16)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        os.chmod(path, 0o600)
        self._sock.listen(4)
        self._sock.settimeout(0.5)

    def accept(self, waiting: Callable[[], bool]) -> tuple[LineChannel, dict[str, Any]] | None:
        """The channel of the first connection whose hello carries the token, and that hello; None if
        ``waiting()`` turned False first (the script ended without connecting). Closes the listener."""
        bad = 0
        try:
            while waiting() and bad < MAX_BAD_HELLOS:
                try:
                    conn, _ = self._sock.accept()
                except TimeoutError:
                    continue
                conn.settimeout(HELLO_TIMEOUT_S)
                channel = LineChannel(conn)
                try:
                    hello = channel.recv()
                except (ChannelClosed, ValueError, TimeoutError):
                    hello = {}
                if hello.get("op") == "hello" and hmac.compare_digest(str(hello.get("token", "")), self.token):
                    conn.settimeout(None)
                    return channel, hello
                bad += 1
                channel.close()
            return None
        finally:
            self.close()

    def close(self) -> None:
        """Stop listening and remove the socket (and its private folder)."""
        self._sock.close()
        self.path.unlink(missing_ok=True)
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)


def connect_channel(path: str, token: str, hello: dict[str, Any]) -> LineChannel:
    """Connect to a :class:`ChannelListener` at ``path`` and say ``hello`` with ``token``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise ChannelClosed(f"cannot connect to the site agent's channel {path}: {exc}") from exc
    channel = LineChannel(sock)
    channel.send({**hello, "token": token})
    return channel
