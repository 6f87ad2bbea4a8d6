"""Writing PyTorch checkpoints (``.pt``) without importing torch, in bounded memory.

The server writes ``FL_global_model.pt`` every round. Importing torch for that would cost the
server process about half a gigabyte of resident libraries and seconds of start-up, and
``torch.save`` wants the whole model in memory. The format is simple and stable (torch >= 1.6):
a stored (uncompressed) zip holding ``data.pkl`` - a pickle of the object in which each tensor is
``torch._utils._rebuild_tensor_v2`` of a storage named by a persistent id - and one record of raw
bytes per storage, aligned to 64 bytes. This module writes exactly that, streaming each tensor's
bytes, so ``torch.load(path, weights_only=True)`` (and ``mmap=True``) read it like a torch.save file.
Only the writer lives here; nothing in fl unpickles.
"""

from __future__ import annotations

import os
import secrets
import struct
import zipfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from fl.fsutil import atomic_path
from fl.tensors import Layout, TensorSpec

__all__ = ["STORAGE_TYPES", "write_pt"]

#: safetensors dtype -> torch storage class (what ``torch.load`` rebuilds the tensor from).
STORAGE_TYPES = {
    "F64": "DoubleStorage",
    "F32": "FloatStorage",
    "F16": "HalfStorage",
    "BF16": "BFloat16Storage",
    "I64": "LongStorage",
    "I32": "IntStorage",
    "I16": "ShortStorage",
    "I8": "CharStorage",
    "U8": "ByteStorage",
    "BOOL": "BoolStorage",
}
ALIGNMENT = 64
ARCHIVE = "archive"


class _Pickle:
    """Just enough of pickle protocol 2 to write a checkpoint's object, opcode by opcode."""

    def __init__(self) -> None:
        self.out = bytearray(b"\x80\x02")  # PROTO 2

    def text(self, s: str) -> None:
        data = s.encode()
        self.out += b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE

    def integer(self, n: int) -> None:
        if 0 <= n < 256:
            self.out += b"K" + bytes([n])  # BININT1
        elif -(2**31) <= n < 2**31:
            self.out += b"J" + struct.pack("<i", n)  # BININT
        else:
            data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
            self.out += b"\x8a" + bytes([len(data)]) + data  # LONG1

    def value(self, v: Any) -> None:
        if v is None:
            self.out += b"N"
        elif isinstance(v, bool):
            self.out += b"\x88" if v else b"\x89"  # NEWTRUE / NEWFALSE
        elif isinstance(v, int):
            self.integer(v)
        elif isinstance(v, float):
            self.out += b"G" + struct.pack(">d", v)  # BINFLOAT
        elif isinstance(v, str):
            self.text(v)
        else:
            raise TypeError(f"checkpoint metadata must be None, bool, int, float or str; got {type(v).__name__}")

    def global_(self, module: str, name: str) -> None:
        self.out += b"c" + f"{module}\n{name}\n".encode()  # GLOBAL

    def ints_tuple(self, values: Iterable[int]) -> None:
        self.out += b"("  # MARK
        for v in values:
            self.integer(v)
        self.out += b"t"  # TUPLE

    def tensor(self, key: str, spec: TensorSpec) -> None:
        self.global_("torch._utils", "_rebuild_tensor_v2")
        self.out += b"("  # MARK: the arguments
        self.out += b"("  # MARK: the storage's persistent id
        self.text("storage")
        self.global_("torch", STORAGE_TYPES[spec.dtype])
        self.text(key)
        self.text("cpu")
        self.integer(spec.numel)
        self.out += b"tQ"  # TUPLE, BINPERSID
        self.integer(0)  # storage offset
        self.ints_tuple(spec.shape)
        strides, step = [], 1
        for dim in reversed(spec.shape):
            strides.append(step)
            step *= max(dim, 1)
        self.ints_tuple(reversed(strides))
        self.out += b"\x89"  # requires_grad False
        self.global_("collections", "OrderedDict")
        self.out += b")R"  # EMPTY_TUPLE, REDUCE: no backward hooks
        self.out += b"tR"  # TUPLE, REDUCE

    def checkpoint(self, layout: Layout, info: Mapping[str, Any]) -> bytes:
        """``{"model": OrderedDict(name -> tensor), **info}``."""
        self.out += b"}("  # EMPTY_DICT, MARK
        self.text("model")
        self.global_("collections", "OrderedDict")
        self.out += b")R("  # EMPTY_TUPLE, REDUCE, MARK
        for index, spec in enumerate(layout.tensors):
            self.text(spec.name)
            self.tensor(str(index), spec)
        self.out += b"u"  # SETITEMS
        for key, value in info.items():
            self.text(str(key))
            self.value(value)
        self.out += b"u."  # SETITEMS, STOP
        return bytes(self.out)


def _write_record(zf: zipfile.ZipFile, name: str, chunks: Iterable[bytes | memoryview], size: int) -> None:
    """A stored zip entry whose data starts on a 64-byte boundary (padding in the extra field)."""
    info = zipfile.ZipInfo(f"{ARCHIVE}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = size
    info.CRC = info.compress_size = 0  # filled in by zipfile; only the header's length matters here
    zip64 = size * 1.05 > zipfile.ZIP64_LIMIT
    offset = zf.fp.tell() if zf.fp is not None else 0
    header = len(info.FileHeader(zip64))
    pad = (-(offset + header + 4)) % ALIGNMENT
    info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    with zf.open(info, "w", force_zip64=zip64) as out:
        for chunk in chunks:
            out.write(chunk)


def write_pt(
    path: str | os.PathLike[str],
    layout: Layout,
    tensor_bytes: Callable[[TensorSpec], Iterable[bytes | memoryview]],
    info: Mapping[str, Any],
) -> None:
    """Write ``{"model": state_dict, **info}`` as a torch checkpoint, atomically.

    ``tensor_bytes(spec)`` yields each tensor's raw little-endian bytes in pieces.
    """
    unsupported = sorted({s.dtype for s in layout.tensors} - set(STORAGE_TYPES))
    if unsupported:
        raise ValueError(f"no torch storage type for {', '.join(unsupported)}")
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        pickled = _Pickle().checkpoint(layout, info)
        _write_record(zf, "data.pkl", [pickled], len(pickled))
        _write_record(zf, ".format_version", [b"1"], 1)
        _write_record(zf, ".storage_alignment", [b"64"], 2)
        _write_record(zf, "byteorder", [b"little"], 6)
        for index, spec in enumerate(layout.tensors):
            _write_record(zf, f"data/{index}", tensor_bytes(spec), spec.nbytes)
        _write_record(zf, "version", [b"3\n"], 2)
        serial = secrets.token_hex(20).encode()
        _write_record(zf, ".data/serialization_id", [serial], len(serial))
