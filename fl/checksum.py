"""Transfer checksums: XXH3-128 of the whole byte stream, computed as the bytes flow by.

Transport security (TLS) already authenticates the data; the checksum catches what TLS cannot:
a resumed transfer stitched together wrongly, or bytes damaged on disk. XXH3 (the ``xxhash``
package) runs at memory speed: a gigabyte costs tens of milliseconds, where CRC-32 took 0.35 s and
SHA-256 0.6 s here, for every model on every hop.
"""

from __future__ import annotations

import xxhash

__all__ = ["Checksum", "file_checksum"]


class Checksum:
    """A running XXH3-128 with hashlib's ``update`` / ``hexdigest`` interface."""

    scheme = "xxh3-128"

    def __init__(self) -> None:
        self._hash = xxhash.xxh3_128()

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._hash.update(data)

    def hexdigest(self) -> str:
        return f"{self.scheme}:{self._hash.hexdigest()}"


def file_checksum(path: str, *, length: int | None = None, block: int = 4 << 20) -> Checksum:
    """The checksum of a file (or of its first ``length`` bytes)."""
    checksum = Checksum()
    buf = bytearray(block)
    view = memoryview(buf)
    remaining = length
    with open(path, "rb") as f:
        while remaining is None or remaining > 0:
            n = f.readinto(buf if remaining is None or remaining >= block else view[:remaining])
            if not n:
                break
            checksum.update(view[:n])
            if remaining is not None:
                remaining -= n
    return checksum
