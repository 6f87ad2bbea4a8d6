"""The NumPy model persistor: an ndarray initial model, and ``.npy`` checkpoints of each round's.

Written with numpy alone and never pickled (``allow_pickle=False`` both ways), so a checkpoint
from a job folder or a data root is plain numbers or is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fl.client.constants import NPConstants
from fl.components.base import Component
from fl.fsutil import atomic_path

__all__ = ["DEFAULT_NP_MODEL", "NPModelPersistor"]

#: FLARE's default initial array when neither a model nor a checkpoint is given.
DEFAULT_NP_MODEL = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]


class NPModelPersistor(Component):
    """Builds the initial NumPy model and writes ``<model_dir>/<model_name>`` after every round.

    The params are ``{NPConstants.NUMPY_KEY: array}`` as in NVIDIA FLARE. The initial array comes,
    in this order, from ``source_ckpt_file_full_name`` (a ``.npy`` in the job folder or a data root),
    ``model`` (nested lists of numbers) or FLARE's default 3x3 array; it is cast to ``dtype``.

    Parameters
    ----------
    model_dir, model_name:
        Where the global model's ``.npy`` goes, inside the job's run folder.
    model:
        The initial array as (JSON-serialisable) nested lists.
    source_ckpt_file_full_name:
        Start from this ``.npy`` instead.
    dtype:
        The model's numpy dtype (FLARE: float32).
    """

    file_args = ("source_ckpt_file_full_name",)

    def __init__(
        self,
        model_dir: str = "models",
        model_name: str = "server.npy",
        model: list[Any] | None = None,
        source_ckpt_file_full_name: str | None = None,
        dtype: str = "float32",
    ) -> None:
        if not model_dir or ".." in Path(model_dir).parts or Path(model_dir).is_absolute():
            raise ValueError(f"NPModelPersistor: model_dir must be a relative folder inside the job, got {model_dir!r}")
        if not model_name or Path(model_name).name != model_name or not model_name.endswith(".npy"):
            raise ValueError(f"NPModelPersistor: model_name must be a plain '.npy' file name, got {model_name!r}")
        kind = np.dtype(dtype)
        if kind.kind not in "fiub":
            raise ValueError(f"NPModelPersistor: dtype must be a numeric numpy dtype, got {dtype!r}")
        if model is not None:
            _initial_array(model, kind)  # refuse a ragged or non-numeric model when the job is built
        self.model_dir = model_dir
        self.model_name = model_name
        self.model = model
        self.source_ckpt_file_full_name = source_ckpt_file_full_name
        self.dtype = kind.name
        self.best_global_model_file_name = f"best_{model_name}"

    def job_code_needed(self, app_dir: Path) -> str | None:
        """The initial array is data in the config or a file: no job code runs on the server."""
        return None

    def global_model_path(self, ctx: Any) -> Path:
        return Path(ctx.run_dir) / self.model_dir / self.model_name

    def best_model_path(self, ctx: Any) -> Path:
        return Path(ctx.run_dir) / self.model_dir / self.best_global_model_file_name

    def _initial(self, ctx: Any) -> np.ndarray:
        if self.source_ckpt_file_full_name:
            what = "NPModelPersistor source_ckpt_file_full_name"
            path = ctx.policy.resolve_path(self.source_ckpt_file_full_name, Path(ctx.app_dir).parent, what=what)
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise ValueError(f"{what} {path}: not a numeric .npy file ({exc})") from None
            return _checked(np.asarray(array), np.dtype(self.dtype), str(path))
        return _initial_array(DEFAULT_NP_MODEL if self.model is None else self.model, np.dtype(self.dtype))

    def load_initial(self, ctx: Any) -> Path:
        """Write the initial model as safetensors (``{numpy_key: array}``) and return its path."""
        from fl.tensors import write_tensors

        out = Path(ctx.run_dir) / "models" / "global-r0000.safetensors"
        out.parent.mkdir(parents=True, exist_ok=True)
        array = self._initial(ctx)
        write_tensors(out, {NPConstants.NUMPY_KEY: np.ascontiguousarray(array)})
        ctx.log.info("initial NumPy model: shape %s, dtype %s", list(array.shape), array.dtype)
        return out

    def save_global(
        self, ctx: Any, model_path: Path, *, round: int, arrays: Mapping[str, np.ndarray] | None = None
    ) -> None:
        """Write ``<model_dir>/<model_name>`` for the global model after ``round`` (read from ``model_path``)."""
        _save_npy(model_path, self.global_model_path(ctx))

    def save_best(self, ctx: Any, model_path: Path, *, model_version: int, metric: float) -> None:
        """Write ``best_<model_name>`` for the best model so far."""
        _save_npy(model_path, self.best_model_path(ctx))


def _checked(array: np.ndarray, dtype: np.dtype[Any], what: str) -> np.ndarray:
    if array.dtype.kind not in "fiub":
        raise ValueError(f"NPModelPersistor: {what} holds {array.dtype} values; a model is numbers")
    return array.astype(dtype, copy=False)


def _initial_array(model: Any, dtype: np.dtype[Any]) -> np.ndarray:
    """``model`` (nested lists of numbers) as an array of ``dtype``; ragged or non-numeric lists are refused."""
    try:
        array = np.array(model)
    except ValueError as exc:
        raise ValueError(f"NPModelPersistor: model is not a rectangular array of numbers ({exc})") from None
    return _checked(array, dtype, "model")


def _save_npy(model_path: Path, target: Path) -> None:
    """The single array of the safetensors model at ``model_path`` as a ``.npy`` file, atomically."""
    from fl.tensors import load_numpy

    params = load_numpy(model_path)
    if list(params) != [NPConstants.NUMPY_KEY]:
        raise ValueError(
            f"NPModelPersistor: the model has tensors {sorted(params)}; "
            f"a NumPy model has one, {NPConstants.NUMPY_KEY!r}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        np.save(f, params[NPConstants.NUMPY_KEY], allow_pickle=False)
