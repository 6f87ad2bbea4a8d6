"""Reading and writing safetensors files in bounded blocks, and converting params.

``write_tensors`` writes any mapping of numpy arrays or torch tensors (CPU or GPU) without
copying whole tensors; ``iter_blocks`` reads a tensor back in blocks of bounded size. Files are
written atomically (temp file + rename) so that a crash never leaves a half-written model.
"""

from __future__ import annotations

import io
import mmap
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, BinaryIO, cast

import numpy as np

from fl.fsutil import atomic_path
from fl.tensors.layout import Layout, LayoutError, TensorSpec, numpy_dtype, read_prefix

__all__ = [
    "BLOCK_BYTES",
    "SerializedTensors",
    "TensorSource",
    "as_byte_view",
    "describe",
    "iter_blocks",
    "load_numpy",
    "load_torch",
    "read_layout",
    "tensor_pieces",
    "write_layout",
    "write_tensors",
]

#: Upper bound on the bytes read or converted at once (transient buffers stay small next to a model).
BLOCK_BYTES = 8 * 1024 * 1024

#: Bytes asked of the kernel per read when a whole tensor is loaded (one syscall moves at most 2 GiB).
_READ_BYTES = 64 * 1024 * 1024

TensorSource = Any  # numpy.ndarray or torch.Tensor

_TORCH_TO_ST = {
    "torch.float64": "F64",
    "torch.float32": "F32",
    "torch.float16": "F16",
    "torch.bfloat16": "BF16",
    "torch.int64": "I64",
    "torch.int32": "I32",
    "torch.int16": "I16",
    "torch.int8": "I8",
    "torch.uint64": "U64",
    "torch.uint32": "U32",
    "torch.uint16": "U16",
    "torch.uint8": "U8",
    "torch.bool": "BOOL",
}

#: torch's dtype attribute (``torch.<name>``) for each safetensors dtype.
_ST_TO_TORCH = {st: name.removeprefix("torch.") for name, st in _TORCH_TO_ST.items()}

_NUMPY_TO_ST = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint64": "U64",
    "uint32": "U32",
    "uint16": "U16",
    "uint8": "U8",
    "bool": "BOOL",
}


def _is_torch(value: object) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "data_ptr")


def describe(name: str, value: TensorSource) -> tuple[str, str, tuple[int, ...]]:
    """``(name, safetensors dtype, shape)`` of a numpy array or torch tensor."""
    if _is_torch(value):
        dtype = _TORCH_TO_ST.get(str(value.dtype))
        if dtype is None:
            raise LayoutError(f"tensor {name!r}: unsupported torch dtype {value.dtype}")
        return name, dtype, tuple(int(d) for d in value.shape)
    if isinstance(value, np.ndarray | np.generic):
        arr = np.asarray(value)
        dtype = _NUMPY_TO_ST.get(arr.dtype.name)
        if dtype is None:
            raise LayoutError(f"tensor {name!r}: unsupported numpy dtype {arr.dtype}")
        return name, dtype, tuple(int(d) for d in arr.shape)
    raise LayoutError(f"param {name!r} is a {type(value).__name__}; params must be numpy arrays or torch tensors")


def as_byte_view(value: TensorSource) -> memoryview:
    """The tensor's bytes, little-endian and C-contiguous, as a memoryview (a copy only if needed)."""
    if _is_torch(value):
        tensor = value.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        tensor = tensor.contiguous().reshape(-1)
        if tensor.numel() == 0:
            return memoryview(b"")
        import torch

        return memoryview(tensor.view(torch.uint8).numpy()).cast("B")
    arr = np.ascontiguousarray(value)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return memoryview(arr.reshape(-1).view(np.uint8))  # type: ignore[arg-type]


def write_tensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, TensorSource],
    metadata: Mapping[str, str] | None = None,
    *,
    digest: Any = None,
) -> Layout:
    """Write ``tensors`` to ``path`` as safetensors, atomically; returns the layout written.

    ``digest`` (e.g. a :class:`fl.checksum.Checksum`), if given, is updated with every byte written.
    """
    layout = Layout.build((describe(name, value) for name, value in tensors.items()), metadata)
    return write_layout(path, layout, tensor_pieces(layout, tensors), digest=digest)


def tensor_pieces(layout: Layout, tensors: Mapping[str, TensorSource]) -> Iterator[memoryview]:
    """The bytes of in-memory ``tensors`` in ``layout``'s order, at most BLOCK_BYTES a piece."""
    for spec in layout.tensors:
        view = as_byte_view(tensors[spec.name])
        for start in range(0, len(view), BLOCK_BYTES):
            yield view[start : start + BLOCK_BYTES]


class SerializedTensors:
    """The bytes of a safetensors file of in-memory tensors, read at any offset without writing the file.

    What :func:`write_tensors` would write, served from the tensors' own memory (a view per tensor;
    a copy only for a tensor that is not contiguous CPU memory, one tensor at a time).
    """

    def __init__(self, tensors: Mapping[str, TensorSource], metadata: Mapping[str, str] | None = None) -> None:
        self.layout = Layout.build((describe(name, value) for name, value in tensors.items()), metadata)
        header = self.layout.header_bytes
        self._prefix = struct.pack("<Q", len(header)) + header
        self._tensors = tensors
        self.size = len(self._prefix) + self.layout.data_bytes
        self._view: tuple[int, memoryview] | None = None  # the tensor last read (reads go forward)

    def _tensor_view(self, index: int) -> memoryview:
        if self._view is None or self._view[0] != index:
            spec = self.layout.tensors[index]
            self._view = (index, as_byte_view(self._tensors[spec.name]))
        return self._view[1]

    def pieces(self, offset: int = 0, end: int | None = None) -> Iterator[memoryview]:
        """The file's bytes from ``offset`` up to ``end`` (default: the end), as views in file order."""
        end = self.size if end is None else min(end, self.size)
        if offset < len(self._prefix):
            yield memoryview(self._prefix)[offset : min(end, len(self._prefix))]
        base = len(self._prefix)
        for index, spec in enumerate(self.layout.tensors):
            first, last = base + spec.begin, base + spec.begin + spec.nbytes
            if last <= offset or spec.nbytes == 0:
                continue
            if first >= end:
                return
            view = self._tensor_view(index)
            yield view[max(offset, first) - first : min(end, last) - first]

    def update_digest(self, digest: Any) -> None:
        """Feed every byte of the file to ``digest`` (e.g. a :class:`fl.checksum.Checksum`), in bounded pieces."""
        for piece in self.pieces():
            for start in range(0, len(piece), BLOCK_BYTES):
                digest.update(piece[start : start + BLOCK_BYTES])


def write_layout(
    path: str | os.PathLike[str],
    layout: Layout,
    pieces: Iterable[bytes | memoryview],
    *,
    digest: Any = None,
) -> Layout:
    """Write a safetensors file of ``layout`` whose data bytes come from ``pieces``, atomically.

    ``pieces`` are the tensors' raw bytes in layout order (any chunking); they must add up to exactly
    ``layout.data_bytes``, else nothing is written (:class:`LayoutError`). The one safetensors writer.
    """
    written = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as out:

        def emit(data: bytes | memoryview) -> None:
            out.write(data)
            if digest is not None:
                digest.update(data)

        header = layout.header_bytes
        emit(struct.pack("<Q", len(header)))
        emit(header)
        for piece in pieces:
            written += len(piece)
            if written > layout.data_bytes:
                break
            emit(piece)
        if written != layout.data_bytes:
            raise LayoutError(f"{path}: {written} data bytes produced for a layout of {layout.data_bytes}")
    return layout


def read_layout(f: BinaryIO, *, file_size: int | None = None) -> tuple[Layout, int]:
    """Parse the header of an open safetensors file; returns the layout and the data offset."""
    n = read_prefix(f.read(8))
    header = f.read(n)
    if len(header) != n:
        raise LayoutError("truncated safetensors header")
    data_size = None if file_size is None else file_size - 8 - n
    return Layout.parse(header, data_size=data_size), 8 + n


def open_tensors(path: str | os.PathLike[str]) -> tuple[BinaryIO, Layout, int]:
    """Open a safetensors file and check its header against its size."""
    f = open(path, "rb")  # noqa: SIM115 - returned to the caller, who closes it
    try:
        layout, data_offset = read_layout(f, file_size=os.fstat(f.fileno()).st_size)
    except Exception:
        f.close()
        raise
    return f, layout, data_offset


def iter_blocks(
    f: BinaryIO, spec: TensorSpec, data_offset: int, *, block_bytes: int = BLOCK_BYTES
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(first element index, 1-D numpy block)`` covering one tensor, in blocks of bounded size.

    A real file is mapped one block at a time (the block is a view of its pages, copy-on-write: no
    copy into a buffer; the mapping ends when the block is dropped); other file objects are read
    into one reused buffer. Either way a block is valid only until the next one is produced.
    """
    step = max(spec.itemsize, block_bytes - block_bytes % spec.itemsize)
    try:
        fd = f.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return _read_blocks(f, spec, data_offset, step)
    return _mapped_blocks(fd, spec, data_offset, step)


def _mapped_blocks(fd: int, spec: TensorSpec, data_offset: int, step: int) -> Iterator[tuple[int, np.ndarray]]:
    """``spec``'s blocks as copy-on-write views of windows of the file ``fd``, one window at a time."""
    dtype = numpy_dtype(spec.dtype)
    position = 0
    while position < spec.nbytes:
        want = min(step, spec.nbytes - position)
        start = data_offset + spec.begin + position
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        try:
            window = mmap.mmap(fd, want + start - aligned, access=mmap.ACCESS_COPY, offset=aligned)
        except ValueError:  # the window reaches past the end of the file
            raise LayoutError(f"tensor {spec.name!r}: file ends inside its data") from None
        block = np.frombuffer(window, dtype=dtype, count=want // spec.itemsize, offset=start - aligned)
        del window  # unmapped as soon as the caller drops the block
        yield position // spec.itemsize, block
        del block
        position += want


def _read_blocks(f: BinaryIO, spec: TensorSpec, data_offset: int, step: int) -> Iterator[tuple[int, np.ndarray]]:
    """``spec``'s blocks read from ``f`` into one reused buffer."""
    dtype = numpy_dtype(spec.dtype)
    buffer = bytearray(min(step, spec.nbytes))
    f.seek(data_offset + spec.begin)
    position = 0
    while position < spec.nbytes:
        want = min(step, spec.nbytes - position)
        view = memoryview(buffer)[:want]
        if cast(io.BufferedReader, f).readinto(view) != want:
            raise LayoutError(f"tensor {spec.name!r}: file ends inside its data")
        yield position // spec.itemsize, np.frombuffer(view, dtype=dtype)
        position += want


def _read_exactly(f: BinaryIO, view: memoryview, spec: TensorSpec) -> None:
    """Fill ``view`` with ``spec``'s bytes from ``f`` (positioned at them), in bounded reads."""
    for start in range(0, len(view), _READ_BYTES):
        piece = view[start : start + _READ_BYTES]
        if cast(io.BufferedReader, f).readinto(piece) != len(piece):
            raise LayoutError(f"tensor {spec.name!r}: file ends inside its data")


def load_numpy(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Load a whole safetensors file as numpy arrays (BF16 stays raw uint16)."""
    f, layout, data_offset = open_tensors(path)
    with f:
        out: dict[str, np.ndarray] = {}
        for spec in layout.tensors:
            f.seek(data_offset + spec.begin)
            buf = bytearray(spec.nbytes)
            _read_exactly(f, memoryview(buf), spec)
            out[spec.name] = np.frombuffer(buf, dtype=numpy_dtype(spec.dtype)).reshape(spec.shape)
        return out


def load_torch(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a safetensors file as torch tensors read into this process's own memory.

    Read, not mapped: the tensors do not hold the file's pages, so once loaded the file can be
    removed and its memory (in tmpfs, /dev/shm) is freed at once. One read per tensor, no pickle.
    """
    import torch

    f, layout, data_offset = open_tensors(path)
    with f:
        out: dict[str, Any] = {}
        for spec in layout.tensors:
            raw = torch.empty(spec.nbytes, dtype=torch.uint8)
            f.seek(data_offset + spec.begin)
            _read_exactly(f, memoryview(raw.numpy()), spec)  # type: ignore[arg-type]
            out[spec.name] = raw.view(getattr(torch, _ST_TO_TORCH[spec.dtype])).reshape(spec.shape)
        return out
