"""The PyTorch model persistor: the initial global model, and ``.pt`` checkpoints of each round's."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fl.components.base import Component, Events
from fl.config import HostPolicy
from fl.fsutil import atomic_path
from fl.process import popen_bound_to_parent
from fl.pythonpath import module_command
from fl.rounds import model_label
from fl.tensors import TensorSpec

__all__ = [
    "CHECKPOINT_SUFFIX",
    "INITIAL_WEIGHTS_MAX_BYTES",
    "TORCH_SUFFIXES",
    "ModelInitError",
    "PTFileModelPersistor",
    "checkpoint_refusal",
    "convert_checkpoint",
    "initial_weights_path",
]

#: Initial models up to this size ship their weights with the job (FedJob.export_job).
INITIAL_WEIGHTS_MAX_BYTES = 64 * 1024 * 1024
#: The only checkpoint format a job may carry or name: fl never unpickles a job's files.
CHECKPOINT_SUFFIX = ".safetensors"
#: Checkpoints in torch's pickle format, which ``fl convert-checkpoint`` turns into safetensors.
TORCH_SUFFIXES = (".pt", ".pth")


def checkpoint_refusal(value: str) -> str | None:
    """Why a job may not start from checkpoint ``value`` (not safetensors), with the fix; None if it may."""
    path = Path(value)
    if path.suffix == CHECKPOINT_SUFFIX:
        return None
    converted = path.with_suffix(CHECKPOINT_SUFFIX).name if path.suffix in TORCH_SUFFIXES else "OUT.safetensors"
    return (
        f"checkpoint {value!r} is not safetensors ({CHECKPOINT_SUFFIX}): fl never unpickles a job's files; "
        f"convert it on your own machine with `fl convert-checkpoint {path.name} {converted}` and name that file"
    )


def convert_checkpoint(source: Path, target: Path) -> int:
    """Turn a torch checkpoint (a state dict, or ``{"model": state_dict}``) into safetensors; returns its tensors.

    This unpickles ``source`` (``torch.load(weights_only=True)``, torch's restricted unpickler): run it
    only on your own files, on your own machine, never on a file that came from someone else's job.
    """
    import torch

    from fl.tensors import write_tensors

    obj = torch.load(source, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{source}: expected a state dict of tensors (or {{'model': state_dict}})")
    return len(write_tensors(target, obj).tensors)


def model_fingerprint(model: dict[str, Any]) -> str:
    """A stable text of a model config ({path, args}), to tell whether shipped weights belong to it."""
    return json.dumps(model, sort_keys=True, separators=(",", ":"))


def initial_weights_path(app_dir: Path, model: dict[str, Any]) -> Path:
    digest = hashlib.sha256(model_fingerprint(model).encode()).hexdigest()[:16]
    return Path(app_dir) / "initial_weights" / f"{digest}.safetensors"


class ModelInitError(RuntimeError):
    """The initial model could not be built from the job's model class or checkpoint."""


class PTFileModelPersistor(Component):
    """Builds the initial model and writes ``FL_global_model.pt`` / ``best_FL_global_model.pt``.

    The job's model class (``model={"path": ..., "args": ...}``) is instantiated in a child process,
    so that the server process never imports a job's code. Checkpoints hold ``{"model": state_dict,
    "model_version": v, "round": v - 1, "description": ..., "job_id": ...}`` (numbering as in
    :mod:`fl.rounds`: ``round`` is the 0-based index of the round that produced the model, None for
    the initial model) and load with ``torch.load(weights_only=True)``.

    Parameters
    ----------
    model:
        The model class and its constructor arguments, ``{"path": "src.net.Net", "args": {}}``.
    global_model_file_name, best_global_model_file_name:
        Checkpoint names in the job's folder on the server.
    source_ckpt_file_full_name:
        Start from this ``.safetensors`` checkpoint (a ``.pt`` is refused: ``fl convert-checkpoint``
        converts one on the user's own machine; ``FedJob.export_job`` does for a local one).
    """

    file_args = ("source_ckpt_file_full_name",)

    def __init__(
        self,
        model: dict[str, Any] | str | None = None,
        global_model_file_name: str = "FL_global_model.pt",
        best_global_model_file_name: str = "best_FL_global_model.pt",
        source_ckpt_file_full_name: str | None = None,
    ) -> None:
        if model is None and source_ckpt_file_full_name is None:
            raise ValueError("PTFileModelPersistor needs a model or a source_ckpt_file_full_name")
        refusal = checkpoint_refusal(source_ckpt_file_full_name) if source_ckpt_file_full_name else None
        if refusal is not None:
            raise ValueError(f"source_ckpt_file_full_name: {refusal}")
        if isinstance(model, str):
            model = {"path": model, "args": {}}
        if model is not None and (not isinstance(model, dict) or not isinstance(model.get("path"), str)):
            raise ValueError("PTFileModelPersistor: model must be {'path': 'module.Class', 'args': {...}}")
        for name in (global_model_file_name, best_global_model_file_name):
            if not name or Path(name).name != name:
                raise ValueError(f"checkpoint file names must be plain file names, got {name!r}")
        self.model = model
        self.global_model_file_name = global_model_file_name
        self.best_global_model_file_name = best_global_model_file_name
        self.source_ckpt_file_full_name = source_ckpt_file_full_name
        self._global_version: int | None = None  # model version in FL_global_model.pt, if written here
        self._num_rounds: int | None = None  # the job's rounds, for the checkpoints' descriptions

    def handle_event(self, event: str, data: dict[str, Any], ctx: Any) -> None:
        if event == Events.ROUND_STARTED and data.get("num_rounds"):
            self._num_rounds = int(data["num_rounds"])

    def _info(self, model_version: int, ctx: Any) -> dict[str, Any]:
        """A checkpoint's metadata for ``model_version``, numbered as everywhere else (fl.rounds)."""
        return {
            "model_version": model_version,
            "round": model_version - 1 if model_version > 0 else None,
            "description": model_label(model_version, self._num_rounds),
            "job_id": ctx.job_id,
        }

    def _shipped_weights(self, app_dir: Path) -> Path | None:
        """The weights shipped with the job for this model config, if any (used when no checkpoint is given)."""
        from fl.tensors import LayoutError, open_tensors

        if self.model is None or self.source_ckpt_file_full_name:
            return None
        path = initial_weights_path(app_dir, self.model)
        try:
            f, layout, _ = open_tensors(path)
        except (LayoutError, OSError):
            return None
        f.close()
        return path if layout.metadata.get("fl.model") == model_fingerprint(self.model) else None

    def job_code_needed(self, app_dir: Path) -> str | None:
        """Why building the initial model needs the job's code on the server host; None if it doesn't."""
        if self.model is None or self.source_ckpt_file_full_name or self._shipped_weights(app_dir) is not None:
            return None
        limit = INITIAL_WEIGHTS_MAX_BYTES // 2**20
        return (
            f"the initial model {self.model['path']} would be built from the job's code on the server host, and "
            f"the job ships no weights for it; ship them (FedJob.export_job does for models up to {limit} MiB) "
            "or start from a checkpoint in the job folder or a data root (source_ckpt_file_full_name)"
        )

    def global_model_path(self, ctx: Any) -> Path:
        return Path(ctx.run_dir) / self.global_model_file_name

    def best_model_path(self, ctx: Any) -> Path:
        return Path(ctx.run_dir) / self.best_global_model_file_name

    def load_initial(self, ctx: Any) -> Path:
        """Write the initial global model as safetensors and return its path.

        Weights shipped with the job for this model config are used as they are; otherwise the
        model is built in a child process (so that the server never imports a job's code).
        """
        out = Path(ctx.run_dir) / "models" / "global-r0000.safetensors"
        out.parent.mkdir(parents=True, exist_ok=True)
        app_dir = Path(ctx.app_dir)
        shipped = self._shipped_weights(app_dir)
        if shipped is not None:
            with atomic_path(out) as tmp:
                shutil.copyfile(shipped, tmp)
            ctx.log.info("initial model: weights shipped with the job (%s)", self.model and self.model["path"])
            return out
        policy: HostPolicy = ctx.policy
        reason = None if policy.job_code else self.job_code_needed(app_dir)
        if reason is not None:
            raise ModelInitError(f"the server's policy runs no job code (fl server --no-custom-code): {reason}")
        command = module_command("fl.components.model_init", "--out", str(out))
        if self.source_ckpt_file_full_name:
            what = "PTFileModelPersistor source_ckpt_file_full_name"
            checkpoint = policy.resolve_path(self.source_ckpt_file_full_name, app_dir.parent, what=what)
            command += ["--checkpoint", str(checkpoint)]
        custom = app_dir / "custom"
        if self.model is not None and policy.job_code:
            command += ["--model", json.dumps(self.model), "--custom-dir", str(custom)]
        env = dict(os.environ)
        env["PYTHONSAFEPATH"] = "1"  # the working folder (the job's code) never shadows fl or installed modules
        env.setdefault("OMP_NUM_THREADS", "1")
        proc = popen_bound_to_parent(
            command,
            cwd=custom if policy.job_code and custom.is_dir() else ctx.run_dir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            raw_out, raw_err = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise ModelInitError("building the initial model took longer than 600 s") from None
        stdout, stderr = raw_out.decode(errors="replace"), raw_err.decode(errors="replace")
        if proc.returncode != 0:
            tail = "\n".join((stderr or stdout).strip().splitlines()[-15:])
            raise ModelInitError(f"building the initial model failed:\n{tail}")
        ctx.log.info("initial model ready: %s", stdout.strip().splitlines()[-1] if stdout.strip() else out)
        return out

    def save_global(
        self, ctx: Any, model_path: Path, *, round: int, arrays: Mapping[str, np.ndarray] | None = None
    ) -> None:
        """Write ``FL_global_model.pt`` for the global model after ``round``.

        ``arrays`` (the model in memory, in ``model_path``'s layout) saves reading the file back.
        """
        _save_pt(model_path, self.global_model_path(ctx), self._info(round + 1, ctx), arrays)
        self._global_version = round + 1

    def save_best(self, ctx: Any, model_path: Path, *, model_version: int, metric: float) -> None:
        """Write ``best_FL_global_model.pt`` for model version ``model_version`` (0: the initial model)."""
        target = self.best_model_path(ctx)
        info = {**self._info(model_version, ctx), "metric": metric}
        current = self.global_model_path(ctx)
        if self._global_version == model_version and current.exists():
            # FL_global_model.pt holds this very model: link to it, no copy (it is only ever replaced, by
            # rename, so the best model keeps its file when the next round's takes the name).
            with atomic_path(target) as tmp:
                tmp.unlink()
                try:
                    os.link(current, tmp)
                except OSError:  # a filesystem without hard links: copy (in the kernel)
                    shutil.copyfile(current, tmp)
            return
        _save_pt(model_path, target, info)


def _save_pt(source: Path, target: Path, info: dict[str, Any], arrays: Mapping[str, np.ndarray] | None = None) -> None:
    """A torch checkpoint of the safetensors model ``source`` (or of ``arrays`` in its layout), atomically.

    Written by :mod:`fl.components.torch_format`, block by block: the server never imports torch.
    """
    from fl.components.torch_format import write_pt
    from fl.tensors import BLOCK_BYTES, iter_blocks, open_tensors
    from fl.tensors.io import as_byte_view

    f, layout, data_offset = open_tensors(source)
    with f:

        def tensor_bytes(spec: TensorSpec) -> Iterable[bytes | memoryview]:
            if arrays is not None:
                view = as_byte_view(arrays[spec.name])
                return (view[i : i + BLOCK_BYTES] for i in range(0, len(view), BLOCK_BYTES))
            return (block.data for _, block in iter_blocks(f, spec, data_offset))  # mapped: no copy

        write_pt(target, layout, tensor_bytes, info)
