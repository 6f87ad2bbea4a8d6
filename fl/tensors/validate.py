"""Checking a safetensors byte stream as it arrives, before any of it reaches a global model.

:class:`StreamChecker` is fed the bytes of an upload in whatever pieces the network delivers
them. It parses the header as soon as it is complete, checks names, dtypes and shapes against the
expected layout, and checks every float element for NaN/Inf as the data flows by, so that a bad
update is refused mid-stream with a message that names the tensor.
"""

from __future__ import annotations

import numpy as np

from fl.tensors.layout import MAX_HEADER_BYTES, Layout, LayoutError, TensorSpec, numpy_dtype, read_prefix

__all__ = ["StreamChecker", "check_finite"]

# Exponent masks of the 16-bit float formats: all exponent bits set means Inf or NaN.
_F16_EXP = np.uint16(0x7C00)
_BF16_EXP = np.uint16(0x7F80)


def check_finite(spec: TensorSpec, block: np.ndarray) -> None:
    """Raise :class:`LayoutError` if a block of ``spec``'s elements holds NaN or Inf."""
    if spec.dtype in ("F32", "F64"):
        # A finite sum proves every element finite; only if it is not do we look closer
        # (a large but finite tensor can overflow the sum).
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(np.add.reduce(block, dtype=block.dtype)):
                return
        bad = ~np.isfinite(block)
    elif spec.dtype in ("F16", "BF16"):
        mask = _F16_EXP if spec.dtype == "F16" else _BF16_EXP
        bad = (block.view(np.uint16) & mask) == mask
    else:
        return
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        raise LayoutError(f"tensor {spec.name!r} holds a non-finite value (NaN or Inf), e.g. at flat index {index}")


class StreamChecker:
    """Incrementally validates a safetensors stream against an expected layout."""

    def __init__(self, expected: Layout | None, *, max_bytes: int | None = None) -> None:
        self.expected = expected
        self.max_bytes = max_bytes
        self.layout: Layout | None = None
        self._prefix = bytearray()
        self._header_len: int | None = None
        self._received = 0
        self._data_offset = 0
        self._tensor_index = 0
        self._carry = b""

    @property
    def received(self) -> int:
        return self._received

    def feed(self, data: bytes | memoryview) -> None:
        """Check the next piece of the stream; raises :class:`LayoutError` on the first problem."""
        view = memoryview(data)
        self._received += len(view)
        if self.max_bytes is not None and self._received > self.max_bytes:
            raise LayoutError(f"upload is larger than the {self.max_bytes} bytes allowed")
        if self.layout is None:
            view = self._feed_header(view)
            if self.layout is None or not len(view):
                return
        self._feed_data(view)

    def finish(self) -> Layout:
        """Call at the end of the stream: checks that nothing is missing and returns the layout."""
        if self.layout is None:
            raise LayoutError("stream ended before the safetensors header was complete")
        consumed = self._received - self._data_offset
        if consumed != self.layout.data_bytes:
            raise LayoutError(
                f"stream ended after {consumed} of {self.layout.data_bytes} data bytes "
                f"(inside tensor {self._current_name()!r})"
            )
        return self.layout

    def _current_name(self) -> str:
        assert self.layout is not None
        if self._tensor_index < len(self.layout.tensors):
            return self.layout.tensors[self._tensor_index].name
        return "<end>"

    def _feed_header(self, view: memoryview) -> memoryview:
        need = 8 if self._header_len is None else 8 + self._header_len
        take = min(len(view), need - len(self._prefix))
        self._prefix += view[:take]
        view = view[take:]
        if self._header_len is None and len(self._prefix) >= 8:
            self._header_len = read_prefix(bytes(self._prefix[:8]))
            if self._header_len > MAX_HEADER_BYTES:
                raise LayoutError("safetensors header too large")
            return self._feed_header(view) if len(view) else view
        if self._header_len is not None and len(self._prefix) == 8 + self._header_len:
            layout = Layout.parse(bytes(self._prefix[8:]))
            if self.expected is not None:
                layout.check_matches(self.expected)
            self.layout = layout
            self._data_offset = 8 + self._header_len
            self._prefix = bytearray()
            self._skip_empty()
        return view

    def _skip_empty(self) -> None:
        assert self.layout is not None
        while self._tensor_index < len(self.layout.tensors) and self.layout.tensors[self._tensor_index].nbytes == 0:
            self._tensor_index += 1

    def _feed_data(self, view: memoryview) -> None:
        assert self.layout is not None
        tensors = self.layout.tensors
        if self._carry:
            view = memoryview(self._carry + bytes(view))
            self._carry = b""
        position = self._received - len(view) - self._data_offset  # data offset of view[0]
        while len(view):
            if self._tensor_index >= len(tensors):
                raise LayoutError("stream holds more bytes than its header describes")
            spec = tensors[self._tensor_index]
            take = min(len(view), spec.end - position)
            usable = take - take % spec.itemsize
            if usable:
                if spec.is_float:
                    check_finite(spec, np.frombuffer(view[:usable], dtype=numpy_dtype(spec.dtype)))
                position += usable
                view = view[usable:]
            if position == spec.end:
                self._tensor_index += 1
                self._skip_empty()
            elif len(view) < spec.itemsize:
                # A partial element at the end of this piece: keep it for the next one.
                self._carry = bytes(view)
                return
