"""Cross-site model evaluation (FLARE's ``CrossSiteModelEval``): every site scores every model.

The models are the server's global model (``SRV_FL_global_model.pt``: the last global model of the
workflow before, e.g. FedAvg, or the initial model), its best model (``SRV_best_FL_global_model.pt``:
the one the model selector chose, when there is one) and, unless ``evaluate_site_models`` is off, each
site's local model, which a ``submit_model`` task asks for (``flare.is_submit_model()`` on the site:
it sends its weights, in the global model's layout). Each model then goes to every site in a
``validate`` task. The result is ``cross_site_val/cross_val_results.json`` in FLARE's shape,
``{site: {model_name: metrics}}``; an evaluation that failed holds ``{"error": why}`` instead.

Models stay on disk (``cross_site_val/model_shareables``); progress is saved after each step, so a
resumed job goes on with the models and evaluations it had.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fl.fsutil import atomic_path, atomic_write_json
from fl.tensors import Layout
from fl.workflows.base import Controller, JobContext, TaskResult, TaskSpec
from fl.workflows.support import VALIDATE_TASK, best_model_path, check_number, read_layout

__all__ = [
    "BEST_MODEL_NAME",
    "GLOBAL_MODEL_NAME",
    "MODEL_OWNER",
    "RESULTS_FILE",
    "SERVER_MODEL_PREFIX",
    "CrossSiteModelEval",
]

SUBMIT_MODEL_TASK = "submit_model"
#: FLARE's name of the server's global model (PTFileModelLocator's), with its "SRV_" prefix.
SERVER_MODEL_PREFIX = "SRV_"
GLOBAL_MODEL_NAME = SERVER_MODEL_PREFIX + "FL_global_model.pt"
BEST_MODEL_NAME = SERVER_MODEL_PREFIX + "best_FL_global_model.pt"
#: The validate task's meta key naming the model being evaluated (FLARE's AppConstants.MODEL_OWNER).
MODEL_OWNER = "_model_owner_"
RESULTS_FILE = "cross_val_results.json"
_MAX_TIMEOUT = 7 * 24 * 3600.0


class CrossSiteModelEval(Controller):
    """Every site evaluates the server's global model and every other site's local model.

    FLARE's arguments; ``task_check_period``, ``model_locator_id`` and ``formatter_id`` are accepted
    and not needed (results come as they arrive; the global model is found on the server's disk).
    ``persistor_id`` gives the initial model when no workflow before made a global model;
    ``evaluate_site_models=False`` evaluates the global model only (federated evaluation).
    """

    def __init__(
        self,
        task_check_period: float = 0.5,
        cross_val_dir: str = "cross_site_val",
        submit_model_timeout: float = 600,
        validation_timeout: float = 6000,
        model_locator_id: str = "",
        formatter_id: str = "",
        submit_model_task_name: str = SUBMIT_MODEL_TASK,
        validation_task_name: str = VALIDATE_TASK,
        cleanup_models: bool = False,
        participating_clients: Sequence[str] | None = None,
        wait_for_clients_timeout: float = 300,
        persistor_id: str = "persistor",
        evaluate_site_models: bool = True,
    ) -> None:
        owner = "CrossSiteModelEval"
        check_number(owner, "task_check_period", task_check_period, 0, _MAX_TIMEOUT)
        self.submit_model_timeout = check_number(owner, "submit_model_timeout", submit_model_timeout, 0, _MAX_TIMEOUT)
        self.validation_timeout = check_number(owner, "validation_timeout", validation_timeout, 0, _MAX_TIMEOUT)
        self.wait_for_clients_timeout = check_number(
            owner, "wait_for_clients_timeout", wait_for_clients_timeout, 0, _MAX_TIMEOUT
        )
        if not cross_val_dir or Path(cross_val_dir).is_absolute() or ".." in Path(cross_val_dir).parts:
            raise ValueError(f"{owner}: cross_val_dir must be a folder inside the job's folder, got {cross_val_dir!r}")
        for name, value in (
            ("submit_model_task_name", submit_model_task_name),
            ("validation_task_name", validation_task_name),
        ):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{owner}: {name} must be a non-empty string, got {value!r}")
        if participating_clients is not None and (
            isinstance(participating_clients, str) or not all(isinstance(s, str) and s for s in participating_clients)
        ):
            raise ValueError(
                f"{owner}: participating_clients must be a list of site names, got {participating_clients!r}"
            )
        self.cross_val_dir = cross_val_dir
        self.submit_model_task_name = submit_model_task_name
        self.validation_task_name = validation_task_name
        self.cleanup_models = bool(cleanup_models)
        self.participating_clients = list(participating_clients or [])
        self.persistor_id = persistor_id
        self.evaluate_site_models = bool(evaluate_site_models)

    # ------------------------------------------------------------------ run
    def run(self, ctx: JobContext) -> None:
        folder = ctx.run_dir / self.cross_val_dir
        models_dir = folder / "model_shareables"
        models_dir.mkdir(parents=True, exist_ok=True)
        state = ctx.load_state() or {}
        sites: list[str] = state.get("sites") or self._sites(ctx)
        models: dict[str, str] = dict(state.get("models") or {})
        results: dict[str, dict[str, Any]] = {site: {} for site in sites}
        results.update(state.get("results") or {})
        evaluated: list[str] = list(state.get("evaluated") or [])

        def save(submitted: bool) -> None:
            atomic_write_json(folder / RESULTS_FILE, results)
            ctx.save_state(
                {"sites": sites, "models": models, "submitted": submitted, "results": results, "evaluated": evaluated}
            )

        if GLOBAL_MODEL_NAME not in models:
            models[GLOBAL_MODEL_NAME] = self._copy_global_model(ctx, models_dir / "0.safetensors").name
            best = self._copy_best_model(ctx, models_dir / "best.safetensors")
            if best is not None:
                models[BEST_MODEL_NAME] = best.name
            save(False)
        layout = read_layout(models_dir / models[GLOBAL_MODEL_NAME])
        if self.evaluate_site_models and not state.get("submitted"):
            ctx.set_progress(phase="cross-site evaluation: collecting the sites' models")
            models.update(self._collect_site_models(ctx, sites, layout, models_dir))
            save(True)
        for name in [m for m in models if m not in evaluated]:
            ctx.set_progress(phase=f"cross-site evaluation: {name} ({len(evaluated) + 1}/{len(models)})")
            for site, outcome in self._evaluate(ctx, sites, name, models_dir / models[name], layout).items():
                results.setdefault(site, {})[name] = outcome
            evaluated.append(name)
            save(True)
        ctx.log.info(
            "cross-site evaluation: %d sites x %d models in %s", len(sites), len(models), folder / RESULTS_FILE
        )
        ctx.set_progress(phase="cross-site evaluation done")
        if self.cleanup_models:
            shutil.rmtree(models_dir, ignore_errors=True)

    def _sites(self, ctx: JobContext) -> list[str]:
        """The sites taking part: ``participating_clients`` (waited for), or those that can take tasks now."""
        if not self.participating_clients:
            return sorted(ctx.sites)
        ready = set(ctx.wait_for_sites(len(self.participating_clients), self.wait_for_clients_timeout))
        missing = [s for s in self.participating_clients if s not in ready]
        if missing:
            ctx.log.warning("cross-site evaluation: %s cannot take tasks now; their evaluations will fail", missing)
        return list(self.participating_clients)

    def _copy_global_model(self, ctx: JobContext, target: Path) -> Path:
        """The server's global model, copied to ``target``: the newest global model on disk, else the initial one."""
        made = sorted((ctx.run_dir / "models").glob("global-r*.safetensors"))
        if made:
            source = made[-1]
        else:
            persistor = ctx.components.get(self.persistor_id)
            if persistor is None:
                raise ValueError(
                    f"CrossSiteModelEval: no global model in {ctx.run_dir / 'models'} and no component "
                    f"{self.persistor_id!r} (the model persistor) for the initial one"
                )
            source = persistor.load_initial(ctx)
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
        ctx.log.info("cross-site evaluation: the server's model is %s", source.name)
        return target

    def _copy_best_model(self, ctx: JobContext, target: Path) -> Path | None:
        """The best global model the selector kept (``keep_best_model``), copied to ``target``.

        None when the job has none (no selector, or no site reported its key metric), as FLARE's locator.
        """
        source = best_model_path(ctx.run_dir)
        if not source.is_file():
            ctx.log.info("cross-site evaluation: no best global model to score (no model selector chose one)")
            return None
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
        return target

    def _collect_site_models(
        self, ctx: JobContext, sites: list[str], layout: Layout, models_dir: Path
    ) -> dict[str, str]:
        """Ask each site for its local model (in ``layout``); returns {site: file name} of those that sent one."""
        received: dict[str, str] = {}

        def on_result(result: TaskResult) -> None:
            if result.params_path is None:
                raise ValueError(f"{result.site}: a {self.submit_model_task_name} result must carry the site's model")
            name = f"{sites.index(result.site) + 1}.safetensors"
            shutil.move(result.params_path, models_dir / name)
            received[result.site] = name

        task = TaskSpec(
            name=self.submit_model_task_name, round=0, num_rounds=1, model_layout=layout, expect_params=True
        )
        ctx.communicator.broadcast_and_wait(
            task, sites, min_responses=0, timeout=self.submit_model_timeout, on_result=on_result
        )
        for site in sites:
            if site not in received:
                ctx.log.warning(
                    "cross-site evaluation: %s sent no model within %.0f s (submit_model_timeout), or it was refused",
                    site,
                    self.submit_model_timeout,
                )
        return {site: received[site] for site in sites if site in received}

    def _evaluate(
        self, ctx: JobContext, sites: list[str], name: str, path: Path, layout: Layout
    ) -> dict[str, dict[str, Any]]:
        """Send model ``name`` to every site for validation: {site: metrics, or {"error": why}}."""
        task = TaskSpec(
            name=self.validation_task_name,
            round=0,
            num_rounds=1,
            model_path=path,
            model_layout=layout,
            meta={MODEL_OWNER: name},
            expect_params=False,
        )
        answers = ctx.communicator.broadcast_and_wait(task, sites, min_responses=0, timeout=self.validation_timeout)
        metrics = {r.site: dict(r.metrics) for r in answers}
        outcome: dict[str, dict[str, Any]] = {}
        for site in sites:
            if site in metrics:
                outcome[site] = metrics[site]
            else:
                why = (
                    f"no result within {self.validation_timeout:.0f} s (validation_timeout), or its result was refused"
                )
                ctx.log.warning("cross-site evaluation: %s did not evaluate %s: %s", site, name, why)
                outcome[site] = {"error": why}
        return outcome
