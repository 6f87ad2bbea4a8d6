"""The PyTorch model persistor: the initial global model, and ``.pt`` checkpoints of each round's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from fl.components.base import Component
from fl.fsutil import atomic_path

__all__ = ["ModelInitError", "PTFileModelPersistor"]


class ModelInitError(RuntimeError):
    """The initial model could not be built from the job's model class or checkpoint."""


class PTFileModelPersistor(Component):
    """Builds the initial model and writes ``FL_global_model.pt`` / ``best_FL_global_model.pt``.

    The job's model class (``model={"path": ..., "args": ...}``) is instantiated in a child process,
    so that the server process never imports a job's code. Checkpoints hold
    ``{"model": state_dict, "round": ..., "job_id": ...}`` and load with ``torch.load(weights_only=True)``.

    Parameters
    ----------
    model:
        The model class and its constructor arguments, ``{"path": "src.net.Net", "args": {}}``.
    global_model_file_name, best_global_model_file_name:
        Checkpoint names in the job's folder on the server.
    source_ckpt_file_full_name:
        Start from this checkpoint (``.safetensors``, or ``.pt`` loaded with ``weights_only=True``).
    """

    def __init__(
        self,
        model: dict[str, Any] | str | None = None,
        global_model_file_name: str = "FL_global_model.pt",
        best_global_model_file_name: str = "best_FL_global_model.pt",
        source_ckpt_file_full_name: str | None = None,
    ) -> None:
        if model is None and source_ckpt_file_full_name is None:
            raise ValueError("PTFileModelPersistor needs a model or a source_ckpt_file_full_name")
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

    def global_model_path(self, ctx: Any) -> Path:
        return Path(ctx.run_dir) / self.global_model_file_name

    def best_model_path(self, ctx: Any) -> Path:
        return Path(ctx.run_dir) / self.best_global_model_file_name

    def load_initial(self, ctx: Any) -> Path:
        """Write the initial global model as safetensors and return its path."""
        out = Path(ctx.run_dir) / "models" / "global-r0000.safetensors"
        out.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "fl.components.model_init", "--out", str(out)]
        if self.model is not None:
            command += ["--model", json.dumps(self.model)]
        if self.source_ckpt_file_full_name:
            command += ["--checkpoint", self.source_ckpt_file_full_name]
        custom = Path(ctx.app_dir) / "custom"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(custom), env.get("PYTHONPATH", "")) if p)
        env.setdefault("OMP_NUM_THREADS", "1")
        try:
            proc = subprocess.run(
                command,
                cwd=custom if custom.is_dir() else ctx.run_dir,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
        except subprocess.TimeoutExpired:
            raise ModelInitError("building the initial model took longer than 600 s") from None
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            raise ModelInitError(f"building the initial model failed:\n{tail}")
        ctx.log.info("initial model ready: %s", proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else out)
        return out

    def save_global(self, ctx: Any, model_path: Path, *, round: int) -> None:
        _save_pt(model_path, self.global_model_path(ctx), {"round": round, "job_id": ctx.job_id})

    def save_best(self, ctx: Any, model_path: Path, *, model_version: int, metric: float) -> None:
        _save_pt(
            model_path,
            self.best_model_path(ctx),
            {"round": model_version - 1, "model_version": model_version, "metric": metric, "job_id": ctx.job_id},
        )


def _save_pt(source: Path, target: Path, info: dict[str, Any]) -> None:
    """Convert a safetensors model to a torch checkpoint, atomically."""
    import torch

    from fl.tensors import load_torch

    state = load_torch(source)
    with atomic_path(target) as tmp:
        torch.save({"model": state, **info}, tmp)
