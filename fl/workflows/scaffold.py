"""SCAFFOLD's server side (Karimireddy et al. 2020) on the round engine, as FLARE's ``Scaffold`` workflow.

The control variates travel as extra named tensors (no pickled meta; the site side is
:mod:`fl.client.scaffold`): a train task carries the global model plus ``scaffold_c_global.<name>``
for every floating-point tensor of the model (the server cannot tell a torch parameter from a float
buffer; the site helper ignores controls of buffers and returns a zero change for them), and a
result must carry the model plus ``scaffold_c_diff.<name>`` for each of them
(:meth:`Scaffold.result_layout`, checked by the server on upload). Both parts are folded as FedAvg
with the results' weights (FLARE's ``scaffold_aggregate_fn``); the params' average is the new
global model and the global control moves by ``c <- c + |S| / N * mean(c_diff)``, ``|S|`` the
results of the round, ``N`` the job's sites (the paper's option; FLARE's workflow adds the mean,
the same when every site trains every round). Control dtypes: the tensor's, float32 for bfloat16.

Only the model goes to the global model files, the ``.pt`` checkpoints and events; the control
tensors are the strategy's state (``models/strategy-rNNNN.safetensors``), so a restarted job
resumes them, and each round's task file (model + controls) is removed when its results are in.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fl.checksum import Checksum
from fl.client.scaffold import C_DIFF_PREFIX, C_GLOBAL_PREFIX
from fl.tensors import Layout, TensorSpec, iter_blocks, open_tensors
from fl.tensors.io import as_byte_view, write_layout
from fl.workflows.aggregation import NonFiniteAverage
from fl.workflows.base import TaskResult
from fl.workflows.fedavg import FedAvg

__all__ = ["Scaffold", "control_dtype"]

Arrays = dict[str, np.ndarray]


def control_dtype(spec: TensorSpec) -> str:
    """The safetensors dtype of a tensor's controls: its own, float32 for bfloat16 (numpy has none)."""
    return "F32" if spec.dtype == "BF16" else spec.dtype


def _numpy_dtype(dtype: str) -> np.dtype[Any]:
    return np.dtype({"F64": "<f8", "F32": "<f4", "F16": "<f2"}[dtype])


class Scaffold(FedAvg):
    """FLARE's ``Scaffold``: FedAvg's rounds plus the global control variates (see the module).

    ``memory_gc_rounds`` and ``enable_tensor_disk_offload`` are accepted for FLARE's configs and
    unused (results already stream to the server's disk). Other arguments: FedAvg's.
    """

    def __init__(
        self, *, memory_gc_rounds: int = 0, enable_tensor_disk_offload: bool = False, **engine_args: Any
    ) -> None:
        if isinstance(memory_gc_rounds, bool) or not isinstance(memory_gc_rounds, int) or memory_gc_rounds < 0:
            raise ValueError(f"Scaffold: memory_gc_rounds must be a non-negative integer, got {memory_gc_rounds!r}")
        super().__init__(**engine_args)
        self.memory_gc_rounds = memory_gc_rounds
        self.enable_tensor_disk_offload = bool(enable_tensor_disk_offload)
        self._c: Arrays = {}  # the global control by tensor name (float32, float64 for F64 tensors)
        self._share = 1.0  # |S| / N of the round being aggregated

    # ------------------------------------------------------------------ layouts
    @staticmethod
    def _controlled(layout: Layout) -> list[TensorSpec]:
        return [spec for spec in layout.tensors if spec.is_float]

    def result_layout(self, layout: Layout) -> Layout:
        """The model's tensors plus ``scaffold_c_diff.<name>`` for each float tensor."""
        diffs = [(C_DIFF_PREFIX + s.name, control_dtype(s), s.shape) for s in self._controlled(layout)]
        return Layout.build([*((s.name, s.dtype, s.shape) for s in layout.tensors), *diffs])

    def _controls(self, layout: Layout) -> Arrays:
        """The global controls for ``layout`` (zeros at the start), each checked against its tensor."""
        for spec in self._controlled(layout):
            acc = np.float64 if spec.dtype == "F64" else np.float32
            have = self._c.get(spec.name)
            if have is None:
                self._c[spec.name] = np.zeros(spec.shape, acc)
            elif have.shape != spec.shape:
                raise ValueError(
                    f"Scaffold: the saved global control of {spec.name!r} has shape {list(have.shape)}, "
                    f"the model's tensor {list(spec.shape)}"
                )
        unknown = sorted(set(self._c) - {s.name for s in self._controlled(layout)})
        if unknown:
            raise ValueError(f"Scaffold: saved global controls for tensors the model lacks: {unknown[:5]}")
        return self._c

    # ------------------------------------------------------------------ engine hooks
    def task_model(self, rnd: int, model: tuple[Path, str | None], layout: Layout) -> tuple[Path, Layout, str | None]:
        """Write the task's file: the global model's tensors (copied block by block) then the global controls."""
        controls = self._controls(layout)
        specs = self._controlled(layout)
        task_layout = Layout.build(
            [
                *((s.name, s.dtype, s.shape) for s in layout.tensors),
                *((C_GLOBAL_PREFIX + s.name, control_dtype(s), s.shape) for s in specs),
            ],
            {"round": str(rnd)},
        )

        def pieces() -> Iterator[memoryview | bytes]:
            f, file_layout, offset = open_tensors(model[0])
            with f:
                by_name = file_layout.by_name()
                for spec in layout.tensors:
                    for _, block in iter_blocks(f, by_name[spec.name], offset):
                        yield as_byte_view(block)
            for spec in specs:
                value = controls[spec.name].astype(_numpy_dtype(control_dtype(spec)), copy=False)
                yield as_byte_view(np.ascontiguousarray(value).reshape(-1))

        path = model[0].with_name(f"task-r{rnd + 1:04d}.safetensors")
        digest = Checksum()
        write_layout(path, task_layout, pieces(), digest=digest)
        return path, task_layout, digest.hexdigest()

    def check_result(self, result: TaskResult) -> None:
        """A train result must be FULL (its control changes are already differences)."""
        if (result.params_type or "FULL") != "FULL":
            raise ValueError(
                f"{result.site} sent params_type {result.params_type!r}: Scaffold takes FULL results only "
                "(the model with its scaffold_c_diff. tensors)"
            )

    def results_in(self, rnd: int, results: Sequence[TaskResult], sites: Sequence[str]) -> None:
        """Note ``|S| / N`` (the round's results over the job's sites) for the control update."""
        self._share = len(results) / max(len(sites), len(results))

    def update_global(self, rnd: int, average: Arrays, model_path: Path, layout: Layout) -> Arrays:
        """The params' average is the new model; ``c += |S| / N * mean(c_diff)`` (all checked before any is kept)."""
        controls = self._controls(layout)
        updated: Arrays = {}
        for spec in self._controlled(layout):
            c = controls[spec.name]
            new = c + self._share * average[C_DIFF_PREFIX + spec.name].reshape(spec.shape).astype(c.dtype)
            if not np.isfinite(new).all():
                raise NonFiniteAverage(f"the global control of {spec.name!r} would not be finite")
            updated[spec.name] = new
        self._c.update(updated)
        return {spec.name: average[spec.name] for spec in layout.tensors}

    def strategy_state(self) -> Arrays:
        """The global controls, to resume with."""
        return {C_GLOBAL_PREFIX + name: value for name, value in self._c.items()}

    def load_strategy_state(self, arrays: Arrays) -> None:
        """Take back the global controls (none on a fresh run: they start at zero)."""
        self._c = {
            name[len(C_GLOBAL_PREFIX) :]: np.array(v) for name, v in arrays.items() if name.startswith(C_GLOBAL_PREFIX)
        }
