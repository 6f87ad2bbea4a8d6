"""Weighted averaging of model updates, one update at a time, in bounded memory.

:class:`WeightedAverage` keeps one running weighted *mean* per tensor and folds each site's update
into it as soon as the update has arrived, block by block, so that server memory holds one model's
worth of values however many sites there are. :func:`weighted_average` and
:func:`weighted_metrics` are the same arithmetic as pure functions over in-memory arrays.

Each fold is a convex combination, ``mean = mean * (1 - s) + update * s`` with ``s = w / W`` (W the
weight folded so far), so no value ever exceeds the largest one folded in: updates near the
dtype's largest value cannot overflow into Inf the way a raw weighted sum does. The result is
checked for NaN/Inf before anyone gets it (:class:`NonFiniteAverage`), so a non-finite model is
never written. Accumulation happens in float32 for 32- and 16-bit floats, float64 for float64 and
for integer tensors (which are rounded back); the result has the dtypes of the global model.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from fractions import Fraction
from typing import Any

import numpy as np

from fl.tensors import (
    BLOCK_BYTES,
    Layout,
    LayoutError,
    TensorSpec,
    check_finite,
    describe,
    iter_blocks,
    open_tensors,
)
from fl.tensors.io import as_byte_view, tensor_pieces, write_layout

__all__ = [
    "NonFiniteAverage",
    "ParamsType",
    "WeightedAverage",
    "accumulator_dtype",
    "capped_weights",
    "from_accumulator",
    "to_accumulator",
    "weighted_average",
    "weighted_metrics",
    "write_arrays",
]

Block = tuple[int, np.ndarray]  # (first element index, 1-D elements)
#: Bytes of the means a fold updates at once: its three passes then stay in the CPU's cache.
CACHE_BLOCK_BYTES = 256 * 1024


class NonFiniteAverage(RuntimeError):
    """The average holds NaN or Inf (e.g. it overflowed the model's dtype); it must not be written."""


class ParamsType:
    FULL = "FULL"
    DIFF = "DIFF"


def accumulator_dtype(spec: TensorSpec) -> type[np.floating[Any]]:
    """The dtype sums and means are kept in: float32 for 32- and 16-bit floats, float64 otherwise."""
    return np.float32 if spec.dtype in ("F32", "F16", "BF16") else np.float64


def to_accumulator(spec: TensorSpec, block: np.ndarray) -> np.ndarray:
    """Elements of ``block`` as the accumulator dtype (a view when no conversion is needed)."""
    if spec.dtype == "BF16":
        return (block.astype(np.uint32) << 16).view(np.float32)
    acc = accumulator_dtype(spec)
    return block if block.dtype == acc else block.astype(acc)


def from_accumulator(spec: TensorSpec, values: np.ndarray) -> np.ndarray:
    """Accumulator values back in ``spec``'s dtype (BF16 as raw bits, rounded to nearest even)."""
    if spec.dtype == "BF16":
        bits = values.astype(np.float32, copy=False).view(np.uint32)
        rounded = bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))
        return (rounded >> 16).astype(np.uint16)
    if spec.dtype == "BOOL":
        return values >= 0.5
    target = np.dtype({"F64": "<f8", "F32": "<f4", "F16": "<f2"}.get(spec.dtype, "<f8"))
    if spec.is_float:
        return values.astype(target, copy=False)
    from fl.tensors import numpy_dtype

    integers: np.ndarray = np.rint(values).astype(numpy_dtype(spec.dtype))
    return integers


def _array_blocks(spec: TensorSpec, value: Any, block_bytes: int = BLOCK_BYTES) -> Iterator[Block]:
    """Blocks of an in-memory tensor in the layout's raw element representation."""
    from fl.tensors import numpy_dtype

    raw = np.frombuffer(as_byte_view(value), dtype=numpy_dtype(spec.dtype))
    step = max(1, block_bytes // spec.itemsize)
    for start in range(0, raw.size, step):
        yield start, raw[start : start + step]


def _fold_shares(weight: float, total_weight: float, dtype: np.dtype[Any]) -> tuple[Any, Any]:
    """``(keep, share)`` in ``dtype`` for folding ``weight`` into a mean of ``total_weight`` so far.

    ``share = weight / (total_weight + weight)`` and ``keep = 1 - share``, rounded so that
    ``keep + share <= 1`` exactly: the fold stays a convex combination and cannot overflow.
    """
    share64 = weight / (total_weight + weight)
    kind = dtype.type
    share, keep = kind(share64), kind(1.0 - share64)
    if Fraction(float(share)) + Fraction(float(keep)) > 1:  # exact: no float rounding hides it
        keep = np.nextafter(keep, kind(0.0))
    return keep, share


def _diff_values(spec: TensorSpec, block: np.ndarray, base_blocks: Iterator[Block], start: int) -> np.ndarray:
    """``base + block`` in the accumulator dtype: the values a DIFF update's block stands for."""
    base_start, base = next(base_blocks)
    if base_start != start or base.size != block.size:
        raise LayoutError(f"tensor {spec.name!r}: base model blocks out of step")
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is what the caller checks for
        values: np.ndarray = to_accumulator(spec, block) + to_accumulator(spec, base)
    return values


def _check_diff_sums(per_tensor: Iterable[tuple[TensorSpec, Iterator[Block], Iterator[Block] | None]]) -> None:
    """Raise :class:`LayoutError` if a DIFF update plus its base holds NaN/Inf in the model's dtype.

    The average of finite values in a dtype is finite in it (a convex combination), so an update that
    passes cannot make the round's average non-finite.
    """
    for spec, blocks, base_blocks in per_tensor:
        if not spec.is_float or base_blocks is None:
            continue
        for start, block in blocks:
            with np.errstate(over="ignore"):
                values = to_accumulator(spec, from_accumulator(spec, _diff_values(spec, block, base_blocks, start)))
            finite = np.isfinite(values)
            if not finite.all():
                index = start + int(np.flatnonzero(~finite)[0])
                raise LayoutError(
                    f"tensor {spec.name!r}: the DIFF update is not finite once added to the global model "
                    f"({spec.dtype} overflow to Inf or NaN), e.g. at flat index {index}"
                )


class WeightedAverage:
    """Running weighted mean of updates that all have the layout of the global model.

    Thread-safe: updates arriving concurrently are folded one after another. Memory: one model in
    the accumulator dtypes, plus one cache-sized scratch buffer per dtype.
    """

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.total_weight = 0.0
        self.count = 0
        self._means = {s.name: np.zeros(s.numel, dtype=accumulator_dtype(s)) for s in layout.tensors}
        self._scratch: dict[np.dtype[Any], np.ndarray] = {}
        self._lock = threading.Lock()
        self._broken: str | None = None
        self._final: dict[str, np.ndarray] | None = None
        self._hold: threading.Event | None = None

    def hold_until(self, released: threading.Event) -> None:
        """Make folds wait until ``released`` is set (someone is still reading the last result)."""
        self._hold = released

    def prefault(self) -> None:
        """Touch the means' memory now (e.g. while sites start up) rather than in the first fold."""
        with self._lock:
            for acc in self._means.values():
                acc.fill(0)

    def reset(self) -> None:
        """Start a new average, reusing the means' memory (the first update overwrites them)."""
        with self._lock:
            self.total_weight = 0.0
            self.count = 0
            self._broken = None
            self._final = None

    # ------------------------------------------------------------------ folding
    def add_file(
        self,
        path: str | os.PathLike[str],
        weight: float,
        *,
        params_type: str = ParamsType.FULL,
        base_path: str | os.PathLike[str] | None = None,
    ) -> None:
        """Fold the safetensors update at ``path``; DIFF updates are added to ``base_path``'s model."""
        f, layout, data_offset = open_tensors(path)
        with f:
            layout.check_matches(self.layout)
            specs = layout.by_name()
            if params_type == ParamsType.DIFF:
                if base_path is None:
                    raise ValueError("a DIFF update needs the base model it is a difference to")
                bf, base_layout, base_offset = open_tensors(base_path)
                with bf:
                    bases = base_layout.by_name()

                    def pairs() -> Iterator[tuple[TensorSpec, Iterator[Block], Iterator[Block] | None]]:
                        for s in self.layout.tensors:
                            yield (
                                s,
                                iter_blocks(f, specs[s.name], data_offset),
                                iter_blocks(bf, bases[s.name], base_offset),
                            )

                    # One site's finite DIFF can still overflow once added to the global model: refuse that
                    # update before any of it reaches the means (a second read of the files, no fold undone).
                    _check_diff_sums(pairs())
                    self._fold(weight, pairs())
            else:
                self._fold(weight, ((s, iter_blocks(f, specs[s.name], data_offset), None) for s in self.layout.tensors))

    def add_arrays(self, arrays: Mapping[str, Any], weight: float) -> None:
        """Fold an in-memory update (numpy arrays or torch tensors), checked against the layout."""
        Layout.build(describe(n, v) for n, v in arrays.items()).check_matches(self.layout)
        self._fold(weight, ((s, _array_blocks(s, arrays[s.name]), None) for s in self.layout.tensors))

    def _fold(
        self, weight: float, per_tensor: Iterable[tuple[TensorSpec, Iterator[Block], Iterator[Block] | None]]
    ) -> None:
        if isinstance(weight, bool) or not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"aggregation weight must be a positive finite number, got {weight!r}")
        hold = self._hold
        if hold is not None:
            hold.wait()
        with self._lock:
            if self._broken:
                raise RuntimeError(self._broken)
            if self._final is not None:
                raise RuntimeError("the average was finalized; reset() before adding updates")
            try:
                self._fold_locked(float(weight), per_tensor)
            except (LayoutError, OSError) as exc:
                # Part of this update may already be in the means: the average can't be trusted.
                self._broken = f"an update failed halfway through aggregation: {exc}"
                raise
            self.total_weight += weight
            self.count += 1

    def _fold_locked(
        self, weight: float, per_tensor: Iterable[tuple[TensorSpec, Iterator[Block], Iterator[Block] | None]]
    ) -> None:
        first = self.count == 0
        for spec, blocks, base_blocks in per_tensor:
            acc = self._means[spec.name]
            keep, share = _fold_shares(weight, self.total_weight, acc.dtype)
            for start, block in blocks:
                values = (
                    to_accumulator(spec, block)
                    if base_blocks is None
                    else _diff_values(spec, block, base_blocks, start)
                )
                target = acc[start : start + values.size]
                if first:
                    np.copyto(target, values, casting="unsafe")
                else:
                    self._fold_block(target, values, keep, share)

    def _fold_block(self, target: np.ndarray, values: np.ndarray, keep: Any, share: Any) -> None:
        """``target = target * keep + values * share``, a cache-sized slice at a time (same result, one pass)."""
        step = max(1, CACHE_BLOCK_BYTES // target.itemsize)
        scratch = self._scratch_for(target.dtype, min(step, values.size))
        for start in range(0, values.size, step):
            part, scaled = target[start : start + step], scratch[: min(step, values.size - start)]
            np.multiply(values[start : start + step], share, out=scaled, casting="unsafe")
            part *= keep
            part += scaled

    def _scratch_for(self, dtype: np.dtype[Any], size: int) -> np.ndarray:
        """A reused buffer of ``size`` elements of ``dtype`` (at most CACHE_BLOCK_BYTES of the means)."""
        buffer = self._scratch.get(dtype)
        if buffer is None or buffer.size < size:
            buffer = self._scratch[dtype] = np.empty(size, dtype)
        return buffer[:size]

    # ------------------------------------------------------------------ results
    def _check_ready(self) -> None:
        if self._broken:
            raise RuntimeError(self._broken)
        if self.count == 0:
            raise ValueError("no updates were aggregated")

    def finalize(self) -> dict[str, np.ndarray]:
        """The average as arrays in the layout's dtypes and shapes (BF16 as raw uint16).

        float32/float64 results *are* the means' memory (no copy of the model is made), other
        dtypes are converted. Raises :class:`NonFiniteAverage` if any value is NaN or Inf in the
        model's dtype (checked block by block), and keeps refusing until :meth:`reset`. Call
        :meth:`reset` before folding the next round's updates.
        """
        with self._lock:
            self._check_ready()
            if self._final is None:
                out: dict[str, np.ndarray] = {}
                for spec in self.layout.tensors:
                    with np.errstate(over="ignore"):  # an overflow to Inf is caught just below
                        values = from_accumulator(spec, self._means[spec.name])
                    self._check_finite(spec, values)
                    out[spec.name] = values.reshape(spec.shape)
                self._final = out
            return self._final

    def _check_finite(self, spec: TensorSpec, values: np.ndarray) -> None:
        """Refuse (for good, until :meth:`reset`) an average whose ``spec`` tensor holds NaN or Inf."""
        if not spec.is_float:
            return
        try:
            for _, block in _array_blocks(spec, values):
                check_finite(spec, block)
        except LayoutError as exc:
            self._broken = f"the average of {self.count} updates is not finite: {exc}"
            raise NonFiniteAverage(self._broken) from None

    def result_arrays(self) -> dict[str, np.ndarray]:
        """The average as numpy arrays in the layout's dtypes (BF16 as raw uint16)."""
        return self.finalize()

    def write_result(
        self, path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None, *, digest: Any = None
    ) -> Layout:
        """Write the average to ``path`` as safetensors, atomically; returns the layout written.

        ``digest`` (e.g. a :class:`fl.checksum.Checksum`), if given, is updated with every byte written.
        """
        return write_arrays(path, self.layout, self.finalize(), metadata, digest=digest)


def write_arrays(
    path: str | os.PathLike[str],
    layout: Layout,
    arrays: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
    *,
    digest: Any = None,
) -> Layout:
    """Write ``arrays`` (in ``layout``'s dtypes, BF16 as raw uint16) as safetensors, atomically, block by block.

    ``digest`` (e.g. a :class:`fl.checksum.Checksum`), if given, is updated with every byte written.
    """
    written = Layout(layout.tensors, dict(metadata or {}))
    return write_layout(path, written, tensor_pieces(written, arrays), digest=digest)


def weighted_average(updates: Iterable[tuple[Mapping[str, Any], float]]) -> dict[str, np.ndarray]:
    """The weighted average of ``(params, weight)`` updates that share names, dtypes and shapes."""
    avg: WeightedAverage | None = None
    for params, weight in updates:
        if avg is None:
            avg = WeightedAverage(Layout.build(describe(n, v) for n, v in params.items()))
        avg.add_arrays(params, weight)
    if avg is None:
        raise ValueError("no updates to average")
    return avg.result_arrays()


def capped_weights(weights: Sequence[float], max_share: float) -> list[float]:
    """``weights`` with the largest lowered to a common cap so that none is over ``max_share`` of the sum.

    Water-filling: the cap ``t`` solves ``t = max_share * (sum of uncapped weights + k * t)`` for the
    ``k`` largest weights, which are set to ``t``; the others keep their value and their order.
    """
    if not 0 < max_share <= 1:
        raise ValueError(f"max_share must be in (0, 1], got {max_share!r}")
    if len(weights) * max_share < 1:
        raise ValueError(f"{len(weights)} results cannot each hold at most {max_share:g} of the average")
    order = sorted(range(len(weights)), key=lambda i: weights[i], reverse=True)
    capped = 0

    def cap() -> float:
        rest = math.fsum(weights[i] for i in order[capped:])  # summed afresh: no cancellation error
        return max_share * rest / (1.0 - max_share * capped)

    # Capping one more can only be needed while (capped + 1) * max_share < 1 (else cap() >= the rest).
    while max_share * (capped + 1) < 1 and weights[order[capped]] > cap():
        capped += 1
    out = [float(w) for w in weights]
    for i in order[:capped]:
        out[i] = cap()
    return out


def weighted_metrics(results: Iterable[tuple[Mapping[str, Any], float]]) -> dict[str, float]:
    """Per metric, the weighted mean over the results that report it as a finite number."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for metrics, weight in results:
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                continue
            sums[key] = sums.get(key, 0.0) + weight * float(value)
            weights[key] = weights.get(key, 0.0) + weight
    return {key: sums[key] / weights[key] for key in sums}
