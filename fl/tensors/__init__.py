"""Tensors on the wire and on disk: safetensors, written and read in bounded blocks, never pickled."""

from fl.tensors.io import (
    BLOCK_BYTES,
    SerializedTensors,
    describe,
    iter_blocks,
    load_numpy,
    load_torch,
    open_tensors,
    write_tensors,
)
from fl.tensors.layout import DTYPE_SIZES, Layout, LayoutError, TensorSpec, numpy_dtype
from fl.tensors.validate import StreamChecker, check_finite

__all__ = [
    "BLOCK_BYTES",
    "DTYPE_SIZES",
    "Layout",
    "LayoutError",
    "SerializedTensors",
    "StreamChecker",
    "TensorSpec",
    "check_finite",
    "describe",
    "iter_blocks",
    "load_numpy",
    "load_torch",
    "numpy_dtype",
    "open_tensors",
    "write_tensors",
]
