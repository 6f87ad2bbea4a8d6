"""The safetensors layout: a JSON header of tensor specs followed by one byte buffer.

File format (https://github.com/huggingface/safetensors): 8 bytes little-endian header length N,
N bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the tensors' raw bytes, contiguous and in offset order. We parse and build the header
ourselves because the models we move can be larger than memory allows to hold twice, so they are
written and read in bounded blocks; the files stay readable by the ``safetensors`` library.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DTYPE_SIZES",
    "MAX_HEADER_BYTES",
    "MAX_NAME_CHARS",
    "Layout",
    "LayoutError",
    "TensorSpec",
    "numpy_dtype",
]

#: Bytes per element of each safetensors dtype we accept.
DTYPE_SIZES: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
}

_NUMPY_DTYPES: dict[str, str] = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "BF16": "<u2",  # numpy has no bfloat16: carried as its raw 16 bits
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U64": "<u8",
    "U32": "<u4",
    "U16": "<u2",
    "U8": "u1",
    "BOOL": "?",
}

MAX_HEADER_BYTES = 64 * 1024 * 1024
MAX_NAME_CHARS = 1024
MAX_METADATA_BYTES = 1024 * 1024


class LayoutError(ValueError):
    """A safetensors header that is malformed or does not match what was expected."""


def numpy_dtype(dtype: str) -> np.dtype[np.generic]:
    """The numpy dtype that holds elements of a safetensors ``dtype`` (BF16 as raw uint16)."""
    try:
        return np.dtype(_NUMPY_DTYPES[dtype])
    except KeyError:
        raise LayoutError(f"unsupported dtype {dtype!r}; supported: {', '.join(DTYPE_SIZES)}") from None


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a layout: its name, dtype, shape and byte range within the data buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def is_float(self) -> bool:
        return self.dtype in ("F64", "F32", "F16", "BF16")


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise LayoutError(f"tensor names must be non-empty strings, got {name!r}")
    if len(name) > MAX_NAME_CHARS:
        raise LayoutError(f"tensor name longer than {MAX_NAME_CHARS} characters: {name[:60]!r}...")
    if not name.isprintable():
        raise LayoutError(f"tensor name has non-printable characters: {name!r}")
    return name


@dataclass(frozen=True)
class Layout:
    """The tensors of a safetensors file in offset order, plus its string metadata."""

    tensors: tuple[TensorSpec, ...]
    metadata: Mapping[str, str]

    @property
    def data_bytes(self) -> int:
        return self.tensors[-1].end if self.tensors else 0

    @property
    def header_bytes(self) -> bytes:
        return _encode_header(self.tensors, self.metadata)

    @property
    def file_size(self) -> int:
        return 8 + len(self.header_bytes) + self.data_bytes

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    def by_name(self) -> dict[str, TensorSpec]:
        return {t.name: t for t in self.tensors}

    @classmethod
    def build(
        cls, items: Iterable[tuple[str, str, tuple[int, ...]]], metadata: Mapping[str, str] | None = None
    ) -> Layout:
        """A layout for ``(name, dtype, shape)`` items, packed in the given order."""
        specs: list[TensorSpec] = []
        offset = 0
        seen: set[str] = set()
        for name, dtype, shape in items:
            _check_name(name)
            if name in seen:
                raise LayoutError(f"duplicate tensor name {name!r}")
            seen.add(name)
            if dtype not in DTYPE_SIZES:
                raise LayoutError(f"tensor {name!r}: unsupported dtype {dtype!r}")
            nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
            specs.append(TensorSpec(name, dtype, tuple(int(d) for d in shape), offset, offset + nbytes))
            offset += nbytes
        return cls(tuple(specs), dict(metadata or {}))

    @classmethod
    def parse(cls, header: bytes, *, data_size: int | None = None) -> Layout:
        """Parse and check a header's JSON (without its 8-byte length prefix).

        Checks names, dtypes, shapes and that the byte ranges tile the data buffer exactly, so that a
        reader can trust every offset. ``data_size``, when known, must equal the buffer's length.
        """
        try:
            raw = json.loads(header)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LayoutError(f"safetensors header is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise LayoutError("safetensors header must be a JSON object")
        metadata = raw.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise LayoutError("safetensors __metadata__ must map strings to strings")
        specs: list[TensorSpec] = []
        for name, info in raw.items():
            _check_name(name)
            if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
                raise LayoutError(f"tensor {name!r}: entry needs exactly dtype, shape and data_offsets")
            dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
            if dtype not in DTYPE_SIZES:
                raise LayoutError(f"tensor {name!r}: unsupported dtype {dtype!r}")
            if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise LayoutError(f"tensor {name!r}: shape must be a list of non-negative integers")
            if (
                not isinstance(offsets, list)
                or len(offsets) != 2
                or not all(isinstance(o, int) and o >= 0 for o in offsets)
                or offsets[0] > offsets[1]
            ):
                raise LayoutError(f"tensor {name!r}: data_offsets must be [begin, end] with begin <= end")
            nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
            if offsets[1] - offsets[0] != nbytes:
                raise LayoutError(
                    f"tensor {name!r}: {offsets[1] - offsets[0]} bytes for shape {shape} of {dtype} (expected {nbytes})"
                )
            specs.append(TensorSpec(name, dtype, tuple(shape), offsets[0], offsets[1]))
        specs.sort(key=lambda s: (s.begin, s.end))
        position = 0
        for spec in specs:
            if spec.begin != position:
                raise LayoutError(f"tensor {spec.name!r}: data does not start where the previous one ends")
            position = spec.end
        if data_size is not None and position != data_size:
            raise LayoutError(f"tensors cover {position} bytes but the data buffer holds {data_size}")
        return cls(tuple(specs), metadata)

    def check_matches(self, expected: Layout) -> None:
        """Raise :class:`LayoutError` naming every tensor whose name, dtype or shape differs."""
        mine, theirs = self.by_name(), expected.by_name()
        problems: list[str] = []
        missing = [n for n in theirs if n not in mine]
        extra = [n for n in mine if n not in theirs]
        if missing:
            problems.append(f"missing tensors {_short_list(missing)}")
        if extra:
            problems.append(f"unexpected tensors {_short_list(extra)}")
        for name, spec in mine.items():
            want = theirs.get(name)
            if want is None:
                continue
            if spec.dtype != want.dtype:
                problems.append(f"{name}: dtype {spec.dtype}, expected {want.dtype}")
            if spec.shape != want.shape:
                problems.append(f"{name}: shape {list(spec.shape)}, expected {list(want.shape)}")
        if problems:
            raise LayoutError("; ".join(problems[:10]) + ("; ..." if len(problems) > 10 else ""))


def _short_list(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _encode_header(specs: Iterable[TensorSpec], metadata: Mapping[str, str]) -> bytes:
    obj: dict[str, object] = {}
    if metadata:
        obj["__metadata__"] = dict(metadata)
    for spec in specs:
        obj[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [spec.begin, spec.end]}
    header = json.dumps(obj, separators=(",", ":")).encode()
    # Pad with spaces to a multiple of 8 so that tensor data is aligned (as the library does).
    header += b" " * (-len(header) % 8)
    return header


def read_prefix(prefix: bytes) -> int:
    """The header length from the first 8 bytes of a safetensors stream, bounds-checked."""
    if len(prefix) != 8:
        raise LayoutError("truncated safetensors stream: fewer than 8 bytes")
    (n,) = struct.unpack("<Q", prefix)
    if n < 2 or n > MAX_HEADER_BYTES:
        raise LayoutError(f"safetensors header length {n} is out of bounds (2..{MAX_HEADER_BYTES})")
    return int(n)
