"""The wire between a site's Kubernetes launcher (the relay) and its job pod (the shim).

One TCP connection carries JSON lines; a line with a ``_size`` key is followed by exactly that many
raw bytes (a model, a result, the job's app as a zip). Nothing is ever unpickled. The connection is
TLS with the job's ephemeral certificate, which the pod pins (:mod:`fl.site.kube_tls`); the pod's
first line must then be ``{"op": "_auth", "token": ...}`` with the per-job secret token (from the
job's Secret); a connection that does not present it within a few seconds is closed.
"""

from __future__ import annotations

import hmac
import os
import socket
import ssl
import zipfile
from pathlib import Path
from typing import Any

from fl.channel import ChannelClosed, LineChannel

__all__ = ["AUTH_TIMEOUT_S", "Wire", "authenticate", "present_token", "zip_folder"]

AUTH_TIMEOUT_S = 10.0
_CHUNK = 1 << 20


class Wire(LineChannel):
    """JSON lines with optional file bodies over a socket; ``send`` is thread-safe, ``recv`` is for one reader."""

    def send(self, message: dict[str, Any], body: Path | None = None) -> None:
        """Send ``message``; with ``body``, the file's bytes follow it (its size in ``_size``)."""
        if body is not None:
            message = {**message, "_size": body.stat().st_size}
        self._send(message, body)

    def recv(self) -> dict[str, Any]:
        """The next message (its body, if any, must be read with :meth:`recv_body` before the next one)."""
        message = super().recv()
        size = message.get("_size")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
            raise ValueError(f"wire message body size {size!r} is not a byte count")
        return message

    def recv_body(self, message: dict[str, Any], dest: Path | None, *, limit: int) -> None:
        """Read the body announced by ``message`` into ``dest`` (written atomically), or discard it when None."""
        size = int(message.get("_size") or 0)
        if size > limit:
            raise ValueError(f"file of {size} bytes exceeds the limit of {limit} bytes")
        tmp = dest.with_name(f".{dest.name}.part") if dest is not None else None
        try:
            out = tmp.open("wb") if tmp is not None else open(os.devnull, "wb")  # noqa: SIM115
            with out:
                left = size
                while left:
                    chunk = self._reader.read(min(left, _CHUNK))
                    if not chunk:
                        raise ChannelClosed(f"connection closed with {left} of {size} file bytes unread")
                    out.write(chunk)
                    left -= len(chunk)
            if tmp is not None and dest is not None:
                os.replace(tmp, dest)
        except OSError as exc:
            raise ChannelClosed(str(exc)) from exc
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)


def zip_folder(folder: Path, archive: Path, *, compress: bool = True) -> None:
    """``folder``'s regular files as a zip (unpacked on the other side with the job-archive checks);
    ``compress=False`` stores them as they are (tensors barely compress)."""
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(archive, "w", method) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.is_symlink():
                zf.write(path, path.relative_to(folder).as_posix())


def zip_state(folder: Path | None, archive: Path) -> int | None:
    """The job's state folder (flare.get_state()) stored into ``archive``: its size in bytes, or None
    (no archive written) when there is no folder or it holds no file, i.e. nothing to carry."""
    if folder is None or not folder.is_dir() or not any(p.is_file() for p in folder.rglob("*")):
        return None
    zip_folder(folder, archive, compress=False)
    return archive.stat().st_size


def present_token(wire: Wire, token: str) -> None:
    """The pod's side of the handshake: send the job's token first (inside TLS, see fl.site.kube_tls)."""
    wire.send({"op": "_auth", "token": token})


def authenticate(sock: socket.socket, token: str, context: ssl.SSLContext) -> tuple[Wire | None, str]:
    """The relay's side: TLS with the job's certificate (``context``), then the peer's first line must carry
    ``token``, all within AUTH_TIMEOUT_S. ``(Wire, "")``, or ``(None, why)`` with the connection closed
    (a peer that got as far as TLS is told it was refused, so that the pod's log says why)."""
    sock.settimeout(AUTH_TIMEOUT_S)
    try:
        tls = context.wrap_socket(sock, server_side=True)
    except (ssl.SSLError, OSError) as exc:
        sock.close()
        return None, f"no TLS handshake ({exc})"
    wire = Wire(tls)
    why = "no token"
    try:
        first = wire.recv()
        given = first.get("token")
        if first["op"] == "_auth" and isinstance(given, str) and hmac.compare_digest(given.encode(), token.encode()):
            tls.settimeout(None)
            return wire, ""
        why = "a wrong token" if first["op"] == "_auth" else f"{first['op']!r} before the token"
        wire.send({"op": "_refused", "message": f"the relay refused this pod: {why} (not this job's pod?)"})
    except (ChannelClosed, ValueError, OSError):
        pass
    wire.close()
    return None, why
