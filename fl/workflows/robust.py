"""Byzantine-robust aggregation over update files: coordinate-wise median, trimmed mean, (Multi-)Krum.

Unlike :class:`fl.workflows.aggregation.WeightedAverage`, which folds each update in as it arrives,
these need **every update of the round on disk (one safetensors file per site) until the round
closes**: a median or a distance ranking cannot be computed from a running sum. They stream across
the files block by block, so memory is N x one block (N the number of updates), never N x model;
Krum keeps only the N x N matrix of pairwise squared distances, accumulated block by block.

Parameters and defaults are Flower's (``FedMedian``, ``FedTrimmedAvg(beta=0.2)``,
``Krum``/``MultiKrum(num_malicious_nodes=0, num_nodes_to_select=1)``). The files are whatever the
sites sent: all FULL models or all DIFFs against the same base. Median, trimmed mean and distances
commute with adding the base, so a DIFF result is the DIFF of the robust aggregate. Results are
written with the shared atomic writer (:func:`fl.tensors.io.write_layout`), in the global model's
dtypes; integer tensors are rounded back.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from fl.tensors import BLOCK_BYTES, Layout, LayoutError, TensorSpec, check_finite, iter_blocks, open_tensors
from fl.tensors.io import as_byte_view, write_layout
from fl.workflows.aggregation import NonFiniteAverage, WeightedAverage, from_accumulator, to_accumulator

__all__ = [
    "coordinate_median",
    "krum_scores",
    "multikrum",
    "pairwise_sq_distances",
    "select_multikrum",
    "trimmed_mean",
    "trimmed_mean_cut",
]

PathLike = str | os.PathLike[str]
#: (first element index, N x block matrix of the N updates' elements in the accumulator dtype)
StackedBlock = tuple[int, np.ndarray]
Reducer = Callable[[np.ndarray], np.ndarray]


@contextlib.contextmanager
def _stacked(paths: Sequence[PathLike], layout: Layout) -> Iterator[Callable[[TensorSpec], Iterator[StackedBlock]]]:
    """Open every update, check it against ``layout``; yield a reader of one tensor's blocks stacked N high.

    Each of the N files is read with a block budget of BLOCK_BYTES / N, so one stacked block holds
    about BLOCK_BYTES of input whatever N is.
    """
    if not paths:
        raise ValueError("no updates to aggregate")
    with contextlib.ExitStack() as stack:
        opened: list[tuple[Any, dict[str, TensorSpec], int]] = []
        for path in paths:
            f, file_layout, data_offset = open_tensors(path)
            stack.enter_context(f)
            try:
                file_layout.check_matches(layout)
            except LayoutError as exc:
                raise LayoutError(f"update {os.fspath(path)!r}: {exc}") from None
            opened.append((f, file_layout.by_name(), data_offset))
        block_bytes = max(1, BLOCK_BYTES // len(paths))

        def read(spec: TensorSpec) -> Iterator[StackedBlock]:
            readers = [iter_blocks(f, specs[spec.name], off, block_bytes=block_bytes) for f, specs, off in opened]
            for parts in zip(*readers, strict=True):
                start = parts[0][0]
                yield start, np.stack([to_accumulator(spec, block) for _, block in parts])

        yield read


def _reduced_pieces(
    layout: Layout, read: Callable[[TensorSpec], Iterator[StackedBlock]], reduce: Reducer
) -> Iterator[memoryview]:
    """Bytes of ``reduce`` applied to every stacked block, in layout order, checked finite."""
    for spec in layout.tensors:
        for _, stacked in read(spec):
            with np.errstate(over="ignore"):  # an overflow to Inf is refused just below
                values = from_accumulator(spec, reduce(stacked))
            if spec.is_float:
                try:
                    check_finite(spec, values.reshape(-1))
                except LayoutError as exc:
                    raise NonFiniteAverage(f"the robust aggregate is not finite: {exc}") from None
            yield as_byte_view(np.ascontiguousarray(values))


def _write_reduced(
    paths: Sequence[PathLike],
    layout: Layout,
    out_path: PathLike,
    reduce: Reducer,
    metadata: Mapping[str, str] | None,
    digest: Any,
) -> Layout:
    result = Layout(layout.tensors, dict(metadata or {}))
    with _stacked(paths, layout) as read:
        return write_layout(out_path, result, _reduced_pieces(layout, read, reduce), digest=digest)


def coordinate_median(
    paths: Sequence[PathLike],
    layout: Layout,
    out_path: PathLike,
    *,
    metadata: Mapping[str, str] | None = None,
    digest: Any = None,
) -> Layout:
    """Write the coordinate-wise median of the updates (Flower's FedMedian: unweighted)."""
    return _write_reduced(paths, layout, out_path, lambda x: np.median(x, axis=0), metadata, digest)


def trimmed_mean_cut(count: int, beta: float) -> int:
    """How many values each tail loses in a trimmed mean of ``count`` (``int(beta * count)``, as Flower)."""
    if not (isinstance(beta, int | float) and 0 <= beta < 0.5):
        raise ValueError(f"trimmed mean: beta must be in [0, 0.5), got {beta!r}")
    return int(beta * count)


def trimmed_mean(
    paths: Sequence[PathLike],
    layout: Layout,
    out_path: PathLike,
    *,
    beta: float = 0.2,
    metadata: Mapping[str, str] | None = None,
    digest: Any = None,
) -> Layout:
    """Write the coordinate-wise mean after dropping the ``int(beta * N)`` lowest and highest values.

    Flower's FedTrimmedAvg (``beta`` default 0.2, unweighted). The mean is taken in float64.
    """
    cut = trimmed_mean_cut(len(paths), beta)
    count = len(paths)

    def reduce(stacked: np.ndarray) -> np.ndarray:
        kept = np.partition(stacked, (cut, count - cut - 1), axis=0)[cut : count - cut]
        mean: np.ndarray = kept.mean(axis=0, dtype=np.float64)
        return mean

    return _write_reduced(paths, layout, out_path, reduce, metadata, digest)


def pairwise_sq_distances(paths: Sequence[PathLike], layout: Layout) -> np.ndarray:
    """The N x N matrix of squared L2 distances between the updates, over every tensor.

    Accumulated in float64 block by block from the differences themselves (not from norms and dot
    products, which cancel badly when updates are close).
    """
    distances = np.zeros((len(paths), len(paths)), dtype=np.float64)
    with _stacked(paths, layout) as read:
        for spec in layout.tensors:
            for _, stacked in read(spec):
                block = stacked.astype(np.float64, copy=False)
                for i in range(len(paths)):
                    diff = block - block[i]
                    distances[i] += np.einsum("ij,ij->i", diff, diff)
    return distances


def krum_scores(distances: np.ndarray, num_malicious: int = 0) -> np.ndarray:
    """Each update's Krum score: the sum of its squared distances to its ``N - f - 2`` nearest others.

    ``max(1, N - f - 2)`` as Flower; an update's distance to itself is never counted.
    """
    count = distances.shape[0]
    if not (isinstance(num_malicious, int) and 0 <= num_malicious < count):
        raise ValueError(f"krum: num_malicious_nodes must be an integer in [0, {count}), got {num_malicious!r}")
    nearest = max(1, count - num_malicious - 2)
    scores = np.empty(count, dtype=np.float64)
    for i in range(count):
        others = np.delete(distances[i], i)
        scores[i] = np.sort(others)[: min(nearest, others.size)].sum()
    return scores


def select_multikrum(
    paths: Sequence[PathLike], layout: Layout, *, num_malicious_nodes: int = 0, num_nodes_to_select: int = 1
) -> list[int]:
    """Indices of the ``num_nodes_to_select`` updates with the lowest Krum scores (1: classic Krum)."""
    if not (isinstance(num_nodes_to_select, int) and 1 <= num_nodes_to_select <= len(paths)):
        raise ValueError(
            f"multi-krum: num_nodes_to_select must be an integer in [1, {len(paths)}], got {num_nodes_to_select!r}"
        )
    if len(paths) == 1:
        return [0]
    scores = krum_scores(pairwise_sq_distances(paths, layout), num_malicious_nodes)
    return [int(i) for i in np.argsort(scores, kind="stable")[:num_nodes_to_select]]


def multikrum(
    paths: Sequence[PathLike],
    weights: Sequence[float],
    layout: Layout,
    out_path: PathLike,
    *,
    num_malicious_nodes: int = 0,
    num_nodes_to_select: int = 1,
    metadata: Mapping[str, str] | None = None,
    digest: Any = None,
) -> list[int]:
    """Write the weighted average of the Multi-Krum selection (Flower's MultiKrum); returns the indices kept."""
    if len(weights) != len(paths):
        raise ValueError(f"multi-krum: {len(paths)} updates but {len(weights)} weights")
    chosen = select_multikrum(
        paths, layout, num_malicious_nodes=num_malicious_nodes, num_nodes_to_select=num_nodes_to_select
    )
    average = WeightedAverage(layout)
    for i in chosen:
        average.add_file(paths[i], weights[i])
    average.write_result(out_path, metadata, digest=digest)
    return chosen
