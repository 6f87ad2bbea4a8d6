"""fl's filters: :class:`ExcludeVars` and :class:`PercentilePrivacy`, with NVIDIA FLARE's arguments."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fl.filters.base import Filter, FilterContext
from fl.tensors import BLOCK_BYTES, Layout, TensorSpec, iter_blocks, load_numpy, numpy_dtype, open_tensors
from fl.tensors.io import as_byte_view, tensor_pieces, write_layout
from fl.workflows.aggregation import from_accumulator, to_accumulator

__all__ = ["ExcludeVars", "PercentilePrivacy"]

log = logging.getLogger("fl.filters")


def _reference_needed(flt: str, ctx: FilterContext) -> Path | None:
    """The model a FULL file is compared with (the task's), or None for a DIFF; refuses a FULL without one."""
    if ctx.params_type == "DIFF":
        return None
    if ctx.base_path is None:
        raise ValueError(
            f"{flt} on FULL params needs the model the task carried as reference, and {ctx.kind} has none "
            "(use it as a task_result_filter, or send DIFF params)"
        )
    return ctx.base_path


class ExcludeVars(Filter):
    """Keep some tensors from leaving: they carry no change (the task's values in FULL params, zeros in DIFF).

    FLARE's argument: ``exclude_vars``, a list of tensor names or a regular expression searched in each
    name. fl results keep the global model's layout, so an excluded tensor is sent as "unchanged"
    rather than dropped; the aggregate of such tensors is the global model's. Streams block by block.
    """

    def __init__(self, exclude_vars: list[str] | str | None = None, data_kinds: list[str] | None = None) -> None:
        if exclude_vars is not None and not isinstance(exclude_vars, str | list):
            raise ValueError(f"ExcludeVars: exclude_vars must be a list of names or a regex, got {exclude_vars!r}")
        if isinstance(exclude_vars, list) and not all(isinstance(v, str) for v in exclude_vars):
            raise ValueError(f"ExcludeVars: exclude_vars must list tensor names (strings), got {exclude_vars!r}")
        self.names: frozenset[str] = frozenset(exclude_vars) if isinstance(exclude_vars, list) else frozenset()
        try:
            self.pattern = re.compile(exclude_vars) if isinstance(exclude_vars, str) and exclude_vars else None
        except re.error as exc:
            raise ValueError(f"ExcludeVars: exclude_vars {exclude_vars!r} is not a regular expression: {exc}") from None
        self.data_kinds = data_kinds

    def excludes(self, name: str) -> bool:
        """Whether tensor ``name`` is kept from leaving."""
        return name in self.names or (self.pattern is not None and self.pattern.search(name) is not None)

    def process(self, src: Path, dst: Path, ctx: FilterContext) -> bool:
        """Write ``src`` with the excluded tensors replaced by the reference's values (or zeros) to ``dst``."""
        f, layout, offset = open_tensors(src)
        with f:
            excluded = [s.name for s in layout.tensors if self.excludes(s.name)]
            if not excluded:
                if self.pattern is not None:
                    log.warning("ExcludeVars: no tensor matches %r (task %s)", self.pattern.pattern, ctx.task_name)
                return False
            reference = _reference_needed("ExcludeVars", ctx)
            if reference is None:
                write_layout(dst, layout, self._pieces(f, layout, offset, None, frozenset(excluded)))
                return True
            rf, ref_layout, ref_offset = open_tensors(reference)
            with rf:
                ref_layout.check_matches(layout)
                write_layout(
                    dst, layout, self._pieces(f, layout, offset, (rf, ref_layout, ref_offset), frozenset(excluded))
                )
        return True

    @staticmethod
    def _pieces(
        f: Any, layout: Layout, offset: int, reference: tuple[Any, Layout, int] | None, excluded: frozenset[str]
    ) -> Iterator[memoryview | bytes]:
        ref_specs = reference[1].by_name() if reference else {}
        for spec in layout.tensors:
            if spec.name not in excluded:
                source: Iterator[tuple[int, np.ndarray]] = iter_blocks(f, spec, offset)
            elif reference is not None:
                source = iter_blocks(reference[0], ref_specs[spec.name], reference[2])
            else:
                source = _zero_blocks(spec)
            for _, block in source:
                yield as_byte_view(block)


def _layout_of(path: Path) -> Layout:
    f, layout, _ = open_tensors(path)
    f.close()
    return layout


def _zero_blocks(spec: TensorSpec) -> Iterator[tuple[int, np.ndarray]]:
    """Zero-valued blocks covering a tensor (the "no change" of a DIFF)."""
    step = max(1, BLOCK_BYTES // spec.itemsize)
    for start in range(0, spec.numel, step):
        yield start, np.zeros(min(step, spec.numel - start), dtype=numpy_dtype(spec.dtype))


class PercentilePrivacy(Filter):
    """Share only the largest changes, truncated (Shokri and Shmatikov 2015), as FLARE's PercentilePrivacy.

    Per local step, changes whose magnitude is under the ``percentile``-th percentile of all magnitudes
    become 0 and the rest are clipped to ``[-gamma, gamma]``; scalars pass unchanged. The change is the
    DIFF itself or, for FULL params, the result minus the task's model. Needs the whole model at once
    (the percentile is over every float value): it loads the file and its reference (about three
    model sizes of memory). Integer tensors pass unchanged.
    """

    def __init__(self, percentile: float = 10, gamma: float = 0.01, data_kinds: list[str] | None = None) -> None:
        if isinstance(percentile, bool) or not isinstance(percentile, int | float) or not 0 <= percentile <= 100:
            raise ValueError(f"PercentilePrivacy: percentile must be in [0, 100], got {percentile!r}")
        if isinstance(gamma, bool) or not isinstance(gamma, int | float) or not (math.isfinite(gamma) and gamma > 0):
            raise ValueError(f"PercentilePrivacy: gamma must be a finite number > 0, got {gamma!r}")
        self.percentile = float(percentile)
        self.gamma = float(gamma)
        self.data_kinds = data_kinds

    def process(self, src: Path, dst: Path, ctx: FilterContext) -> bool:
        """Write the filtered change (added back to the reference for FULL params) to ``dst``."""
        steps = ctx.meta.get("NUM_STEPS_CURRENT_ROUND", 1)
        if isinstance(steps, bool) or not isinstance(steps, int | float) or not (math.isfinite(steps) and steps > 0):
            raise ValueError(f"PercentilePrivacy: NUM_STEPS_CURRENT_ROUND must be a number > 0, got {steps!r}")
        reference = _reference_needed("PercentilePrivacy", ctx)
        layout = _layout_of(src)
        if reference is not None:
            _layout_of(reference).check_matches(layout)
        values = load_numpy(src)
        base = load_numpy(reference) if reference is not None else None
        floats = [s for s in layout.tensors if s.is_float]
        deltas: dict[str, np.ndarray] = {}
        for spec in floats:
            delta = to_accumulator(spec, values[spec.name].reshape(-1)).astype(np.float64)
            if base is not None:
                delta = delta - to_accumulator(spec, base[spec.name].reshape(-1))
            deltas[spec.name] = delta / steps
        if not deltas or not any(d.size for d in deltas.values()):
            return False
        magnitudes = np.concatenate([np.abs(d) for d in deltas.values()])
        cutoff = float(np.percentile(magnitudes, self.percentile))
        out: dict[str, Any] = dict(values)
        for spec in floats:
            delta = deltas[spec.name]
            if len(spec.shape) > 0:
                delta[(delta > -cutoff) & (delta < cutoff)] = 0.0
                delta = np.clip(delta, -self.gamma, self.gamma)
            delta = delta * steps
            if base is not None:
                delta = delta + to_accumulator(spec, base[spec.name].reshape(-1))
            out[spec.name] = np.ascontiguousarray(from_accumulator(spec, delta)).reshape(spec.shape)
        write_layout(dst, layout, tensor_pieces(layout, out))
        return True
