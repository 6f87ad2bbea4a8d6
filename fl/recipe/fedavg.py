"""FedAvg-shaped recipes with FLARE's arguments: ``FedAvgRecipe`` (PyTorch), ``FedProxRecipe``,
``NumpyFedAvgRecipe``, ``FedOptRecipe``, ``CyclicRecipe`` and ``ScaffoldRecipe`` (each differs only in its
server workflow).

Each builds a :class:`~fl.job.fed_job.FedJob` (the Job API does the work): FedAvg on the server, the
initial model (an instance, or FLARE's ``{"class_path", "args"}`` dict) with its persistor, and a
:class:`~fl.job.fed_job.ScriptRunner` per site (``per_site_config``) or for all sites.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from fl.job.fed_job import FedJob, JobConfigError, PTModel, ScriptRunner
from fl.recipe.spec import Recipe

__all__ = ["CyclicRecipe", "FedAvgRecipe", "FedOptRecipe", "FedProxRecipe", "NumpyFedAvgRecipe", "ScaffoldRecipe"]

#: What ``per_site_config[site]`` may set for that site's script.
SITE_KEYS = frozenset({"train_script", "train_args", "launch_external_process", "command"})


def _model_from_dict(spec: Mapping[str, Any]) -> PTModel:
    """FLARE's ``{"class_path": "model.Net", "args": {...}}``: the class built here, its config shipped as given."""
    path, args = spec.get("class_path"), spec.get("args") or {}
    if not isinstance(path, str) or "." not in path or not isinstance(args, Mapping):
        raise JobConfigError(f"model: expected {{'class_path': 'module.Class', 'args': {{...}}}}, got {dict(spec)!r}")
    module_name, _, attr = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise JobConfigError(f"model: cannot import {path}: {exc}") from None
    return PTModel(cls(**args), persistor_args={"model": {"path": path, "args": dict(args)}})


class FedAvgRecipe(Recipe):
    """FLARE's PyTorch ``FedAvgRecipe``: ``min_clients`` sites train ``train_script`` for ``num_rounds`` rounds.

    ``initial_ckpt``: weights to start from (a file in the job folder or under a server data root).
    ``client_memory_gc_rounds`` must be 0: fl's training script runs in its own process per job.
    """

    framework = "pytorch"

    def __init__(
        self,
        *,
        name: str = "fedavg",
        model: Any = None,
        initial_ckpt: str | None = None,
        min_clients: int,
        num_rounds: int = 2,
        train_script: str,
        train_args: str = "",
        launch_external_process: bool = False,
        command: str = "python3 -u",
        server_expected_format: str = "numpy",
        params_transfer_type: str = "FULL",
        per_site_config: Mapping[str, Mapping[str, Any]] | None = None,
        key_metric: str = "accuracy",
        client_memory_gc_rounds: int = 0,
    ) -> None:
        if client_memory_gc_rounds:
            raise JobConfigError(
                f"client_memory_gc_rounds={client_memory_gc_rounds}: not supported; fl frees a site's "
                "training memory when its script's process ends with the job"
            )
        job = FedJob(name=name, min_clients=min_clients, key_metric=key_metric)
        job.to(self._workflow(min_clients=min_clients, num_rounds=num_rounds), "server")
        self._add_model(job, model, initial_ckpt)
        runner_args = {
            "train_script": train_script,
            "train_args": train_args,
            "launch_external_process": launch_external_process,
            "command": command,
        }
        sites: dict[str | None, Mapping[str, Any]] = {None: {}}
        if per_site_config:
            sites = {str(site): overrides for site, overrides in per_site_config.items()}
        for site, overrides in sites.items():
            unknown = set(overrides) - SITE_KEYS
            if unknown:
                raise JobConfigError(
                    f"per_site_config[{site!r}]: unknown keys {sorted(unknown)} "
                    f"(accepted: {', '.join(sorted(SITE_KEYS))})"
                )
            settings = {**runner_args, **overrides}
            runner = ScriptRunner(
                script=settings["train_script"],
                script_args=settings["train_args"],
                launch_external_process=settings["launch_external_process"],
                command=settings["command"],
                framework=self.framework,
                params_transfer_type=params_transfer_type,
                server_expected_format=server_expected_format,
            )
            if site is None:
                job.to_clients(runner)
            else:
                job.to(runner, site)
        super().__init__(job)

    def _workflow(self, *, min_clients: int, num_rounds: int) -> Any:
        """The server workflow this recipe runs."""
        from fl.workflows.fedavg import FedAvg

        return FedAvg(num_clients=min_clients, num_rounds=num_rounds)

    def _add_model(self, job: FedJob, model: Any, initial_ckpt: str | None) -> None:
        """The initial model and its persistor on the server."""
        if model is None:
            raise JobConfigError(f"{type(self).__name__}: give model= (an instance or a class_path dict)")
        initial = _model_from_dict(model) if isinstance(model, Mapping) else model
        if initial_ckpt is not None:
            if not isinstance(initial, PTModel):
                initial = PTModel(initial)
            initial.persistor_args["source_ckpt_file_full_name"] = initial_ckpt
        job.to(initial, "server")


class FedProxRecipe(FedAvgRecipe):
    """FLARE's ``FedProxRecipe``: FedAvg on the server; the sites' scripts add the proximal term to their loss."""

    def __init__(self, *, name: str = "fedprox", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)


class NumpyFedAvgRecipe(FedAvgRecipe):
    """FLARE's ``NumpyFedAvgRecipe``: FedAvg over NumPy arrays (the NumPy persistor holds the initial model)."""

    framework = "numpy"

    def __init__(self, *, name: str = "fedavg", **kwargs: Any) -> None:
        kwargs.setdefault("model", kwargs.pop("initial_model", None))
        super().__init__(name=name, **kwargs)

    def _add_model(self, job: FedJob, model: Any, initial_ckpt: str | None) -> None:
        if initial_ckpt is not None:
            raise JobConfigError("NumpyFedAvgRecipe: initial_ckpt is not supported; pass model= (an array)")
        if model is None:
            raise JobConfigError("NumpyFedAvgRecipe: give model= (a NumPy array or a list of numbers)")
        import numpy as np

        try:
            job.to(np.asarray(model, dtype=np.float32), "server")
        except JobConfigError as exc:
            if "don't know how to add" in str(exc):
                raise JobConfigError(
                    "NumpyFedAvgRecipe: this fl has no NumPy persistor (fl.components.np_persistor) yet"
                ) from None
            raise


class FedOptRecipe(FedAvgRecipe):
    """FLARE's ``FedOptRecipe``: FedAvg's rounds with a server optimizer (FLARE's SGD with momentum and
    cosine schedule: :class:`fl.workflows.fedopt.FedOpt`); ``"{num_rounds}"`` in ``lr_scheduler_args``
    is replaced by the number of rounds, as FLARE does.

    ``server_memory_gc_rounds`` and ``enable_tensor_disk_offload`` are accepted and have nothing to do:
    fl's server folds updates from disk in bounded memory and hands memory back at each job's end.
    """

    def __init__(
        self,
        *,
        name: str = "fedopt",
        source_model: str = "model",
        optimizer_args: Mapping[str, Any] | None = None,
        lr_scheduler_args: Mapping[str, Any] | None = None,
        device: str | None = None,
        server_memory_gc_rounds: int = 1,
        enable_tensor_disk_offload: bool = False,
        **kwargs: Any,
    ) -> None:
        self._source_model, self._device = source_model, device
        self._optimizer_args = _flare_spec(optimizer_args)
        self._lr_scheduler_args = _flare_spec(lr_scheduler_args)
        super().__init__(name=name, **kwargs)

    def _workflow(self, *, min_clients: int, num_rounds: int) -> Any:
        from fl.workflows.fedopt import FedOpt

        scheduler = self._lr_scheduler_args
        if scheduler is not None and isinstance(scheduler.get("args"), Mapping):
            scheduler = {
                **scheduler,
                "args": {k: num_rounds if v == "{num_rounds}" else v for k, v in scheduler["args"].items()},
            }
        return FedOpt(
            num_clients=min_clients,
            num_rounds=num_rounds,
            source_model=self._source_model,
            optimizer_args=self._optimizer_args,
            lr_scheduler_args=scheduler,
            device=self._device,
        )


def _flare_spec(spec: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """FLARE's optimizer/scheduler spec as fl's ``{"path", "args"}`` (``class_path`` and ``config_type`` dropped)."""
    if spec is None:
        return None
    out = {k: v for k, v in spec.items() if k != "config_type"}  # FLARE's "data, not an object": always so here
    if "class_path" in out:
        out["path"] = out.pop("class_path")
    return out


class CyclicRecipe(FedAvgRecipe):
    """FLARE's ``CyclicRecipe``: the model passes from site to site (:class:`fl.workflows.cyclic.Cyclic`)."""

    def __init__(self, *, name: str = "cyclic", min_clients: int = 2, **kwargs: Any) -> None:
        super().__init__(name=name, min_clients=min_clients, **kwargs)

    def _workflow(self, *, min_clients: int, num_rounds: int) -> Any:
        from fl.workflows.cyclic import Cyclic

        return Cyclic(num_clients=min_clients, num_rounds=num_rounds)


class ScaffoldRecipe(FedAvgRecipe):
    """FLARE's ``ScaffoldRecipe``: FedAvg's rounds plus control variates (:class:`fl.workflows.scaffold.Scaffold`).

    The training script uses :class:`fl.client.scaffold.PTScaffoldHelper`: the controls come and go
    as extra tensors of the params (``split_controls`` / ``with_control_diff``), not in FLARE's meta.
    Results are FULL models (the control changes are already differences). ``server_memory_gc_rounds``,
    ``cuda_empty_cache`` and ``enable_tensor_disk_offload`` are accepted and have nothing to do here.
    """

    def __init__(
        self,
        *,
        name: str = "scaffold",
        params_transfer_type: str = "FULL",
        server_memory_gc_rounds: int = 0,
        cuda_empty_cache: bool = False,
        enable_tensor_disk_offload: bool = False,
        **kwargs: Any,
    ) -> None:
        if params_transfer_type != "FULL":
            raise JobConfigError(
                f"ScaffoldRecipe: params_transfer_type={params_transfer_type!r} is not supported; SCAFFOLD's "
                "results are FULL models with their control changes"
            )
        super().__init__(name=name, params_transfer_type=params_transfer_type, **kwargs)

    def _workflow(self, *, min_clients: int, num_rounds: int) -> Any:
        from fl.workflows.scaffold import Scaffold

        return Scaffold(num_clients=min_clients, num_rounds=num_rounds)
