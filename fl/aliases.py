"""NVIDIA FLARE's names for fl's classes: ONE table, for config JSON paths and for Python imports.

:data:`NVFLARE_ALIASES` maps a FLARE dotted name (``nvflare.<module>.<Name>``) onto the fl object
that does the same job. The config resolver (:mod:`fl.config`) reads it for ``"path"`` entries, and
:class:`FlareLayoutFinder` (registered by ``import fl``) serves FLARE's module layout under ``fl.``
from it, so a script whose ``nvflare`` imports were replaced by ``fl`` imports fl's own classes::

    from fl.app_common.workflows.fedavg import FedAvg      # fl.workflows.fedavg.FedAvg
    from fl.job_config.api import FedJob                   # fl.job.fed_job.FedJob

Modules are made on first import and their attributes resolved on first use (nothing of fl is
imported before). A FLARE name fl lacks fails with "fl has no equivalent of X; the closest is Y".
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

__all__ = [
    "FLARE_PREFIX",
    "NVFLARE_ALIASES",
    "FlareLayoutFinder",
    "NoEquivalentError",
    "canonical",
    "closest",
    "install",
    "no_equivalent",
]

FLARE_PREFIX = "nvflare."

#: NVIDIA FLARE component paths and the fl classes that do the same job.
NVFLARE_ALIASES: dict[str, str] = {
    "nvflare.app_common.workflows.fedavg.FedAvg": "fl.workflows.fedavg.FedAvg",
    "nvflare.app_common.workflows.cross_site_model_eval.CrossSiteModelEval": (
        "fl.workflows.cross_site_eval.CrossSiteModelEval"
    ),
    "nvflare.app_common.widgets.validation_json_generator.ValidationJsonGenerator": (
        "fl.components.validation_json.ValidationJsonGenerator"
    ),
    "nvflare.app_common.widgets.intime_model_selector.IntimeModelSelector": (
        "fl.components.model_selector.IntimeModelSelector"
    ),
    "nvflare.app_opt.tracking.tb.tb_receiver.TBAnalyticsReceiver": "fl.components.tb_receiver.TBAnalyticsReceiver",
    "nvflare.app_opt.pt.file_model_persistor.PTFileModelPersistor": "fl.components.persistor.PTFileModelPersistor",
    "nvflare.app_opt.pt.file_model_locator.PTFileModelLocator": "fl.components.model_locator.PTFileModelLocator",
    "nvflare.app_common.executors.script_executor.ScriptExecutor": "fl.components.script_executor.ScriptExecutor",
    "nvflare.app_opt.pt.client_api_launcher_executor.PTClientAPILauncherExecutor": (
        "fl.components.script_executor.ScriptExecutor"
    ),
    "nvflare.app_common.widgets.convert_to_fed_event.ConvertToFedEvent": (
        "fl.components.convert_to_fed_event.ConvertToFedEvent"
    ),
    # FLARE's in-process executors: fl runs the script in a process of its own all the same.
    "nvflare.app_common.executors.in_process_client_api_executor.InProcessClientAPIExecutor": (
        "fl.components.script_executor.ScriptExecutor"
    ),
    "nvflare.app_opt.pt.in_process_client_api_executor.PTInProcessClientAPIExecutor": (
        "fl.components.script_executor.ScriptExecutor"
    ),
    # The Job API (FLARE 2.4/2.5).
    "nvflare.job_config.api.FedJob": "fl.job.fed_job.FedJob",
    "nvflare.job_config.script_runner.ScriptRunner": "fl.job.fed_job.ScriptRunner",
    "nvflare.job_config.script_runner.FrameworkType": "fl.job.fed_job.FrameworkType",
    "nvflare.job_config.defs.FilterType": "fl.job.fed_job.FilterType",
    "nvflare.app_opt.pt.job_config.fed_avg.FedAvgJob": "fl.job.fed_avg.FedAvgJob",
    "nvflare.app_opt.pt.job_config.model.PTModel": "fl.job.fed_job.PTModel",
    # The Recipe API.
    "nvflare.app_opt.pt.recipes.fedavg.FedAvgRecipe": "fl.recipe.fedavg.FedAvgRecipe",
    "nvflare.app_opt.pt.recipes.FedAvgRecipe": "fl.recipe.fedavg.FedAvgRecipe",
    "nvflare.app_opt.pt.recipes.fedprox.FedProxRecipe": "fl.recipe.fedavg.FedProxRecipe",
    "nvflare.app_opt.pt.recipes.scaffold.ScaffoldRecipe": "fl.recipe.fedavg.ScaffoldRecipe",
    "nvflare.app_opt.pt.recipes.fedopt.FedOptRecipe": "fl.recipe.fedavg.FedOptRecipe",
    "nvflare.app_opt.pt.recipes.cyclic.CyclicRecipe": "fl.recipe.fedavg.CyclicRecipe",
    "nvflare.app_opt.pt.recipes.fedeval.FedEvalRecipe": "fl.recipe.fedeval.FedEvalRecipe",
    "nvflare.app_common.np.recipes.fedavg.NumpyFedAvgRecipe": "fl.recipe.fedavg.NumpyFedAvgRecipe",
    "nvflare.app_common.np.recipes.NumpyFedAvgRecipe": "fl.recipe.fedavg.NumpyFedAvgRecipe",
    "nvflare.recipe.sim_env.SimEnv": "fl.recipe.env.SimEnv",
    "nvflare.recipe.poc_env.PocEnv": "fl.recipe.env.PocEnv",
    "nvflare.recipe.prod_env.ProdEnv": "fl.recipe.env.ProdEnv",
    "nvflare.recipe.run.Run": "fl.recipe.env.Run",
    # Algorithms.
    "nvflare.app_opt.pt.fedopt_ctl.FedOpt": "fl.workflows.fedopt.FedOpt",
    "nvflare.app_common.workflows.cyclic.Cyclic": "fl.workflows.cyclic.Cyclic",
    # The client side: constants, NumPy, Lightning, experiment tracking.
    "nvflare.app_common.np.constants.NPConstants": "fl.client.constants.NPConstants",
    "nvflare.client.config.TransferType": "fl.client.constants.TransferType",
    "nvflare.client.config.ExchangeFormat": "fl.client.constants.ExchangeFormat",
    "nvflare.client.config.ConfigKey": "fl.client.constants.ConfigKey",
    "nvflare.app_common.abstract.fl_model.ParamsType": "fl.client.model.ParamsType",
    "nvflare.app_common.abstract.fl_model.FLModel": "fl.client.model.FLModel",
    "nvflare.app_common.abstract.fl_model.FLModelConst": "fl.client.constants.FLModelConst",
    "nvflare.app_common.abstract.fl_model.MetaKey": "fl.client.model.FLMetaKey",
    "nvflare.apis.fl_constant.FLMetaKey": "fl.client.model.FLMetaKey",
    "nvflare.apis.fl_constant.ReturnCode": "fl.client.constants.ReturnCode",
    "nvflare.apis.dxo.DataKind": "fl.client.constants.DataKind",
    "nvflare.apis.dxo.MetaKey": "fl.client.model.FLMetaKey",
    "nvflare.app_common.np.np_model_persistor.NPModelPersistor": "fl.components.np_persistor.NPModelPersistor",
    "nvflare.app_opt.tracking.mlflow.mlflow_receiver.MLflowReceiver": "fl.components.mlflow_receiver.MLflowReceiver",
    "nvflare.app_opt.tracking.wandb.wandb_receiver.WandBReceiver": "fl.components.wandb_receiver.WandBReceiver",
    "nvflare.client.tracking.MLflowWriter": "fl.client.tracking.MLflowWriter",
    "nvflare.client.tracking.WandBWriter": "fl.client.tracking.WandBWriter",
    "nvflare.client.tracking.SummaryWriter": "fl.client.tracking.SummaryWriter",
    "nvflare.client.lightning.patch": "fl.client.lightning.patch",
    "nvflare.app_common.workflows.scaffold.Scaffold": "fl.workflows.scaffold.Scaffold",
    # Filters.
    "nvflare.app_common.filters.exclude_vars.ExcludeVars": "fl.filters.builtin.ExcludeVars",
    "nvflare.app_common.filters.ExcludeVars": "fl.filters.builtin.ExcludeVars",
    "nvflare.app_common.filters.percentile_privacy.PercentilePrivacy": "fl.filters.builtin.PercentilePrivacy",
    "nvflare.app_common.filters.PercentilePrivacy": "fl.filters.builtin.PercentilePrivacy",
}


class NoEquivalentError(ModuleNotFoundError):
    """A FLARE name (module or attribute) that fl has nothing for; says what comes closest."""


def _flare_name(name: str) -> str:
    """``nvflare.X`` for ``fl.X`` (FLARE's layout under fl); FLARE names are kept."""
    return FLARE_PREFIX + name[3:] if name.startswith("fl.") else name


def canonical(path: str) -> str:
    """The fl path for a FLARE name, written ``nvflare.X`` or ``fl.X``; any other path unchanged."""
    return NVFLARE_ALIASES.get(_flare_name(path), path)


def closest(name: str) -> str:
    """ "the closest is Y (fl: Z)" for a FLARE name fl lacks (difflib over the table)."""
    import difflib

    match = difflib.get_close_matches(_flare_name(name), list(NVFLARE_ALIASES), n=1, cutoff=0.0)
    return f"the closest is {match[0]} (fl: {NVFLARE_ALIASES[match[0]]})" if match else "the table is empty"


def no_equivalent(name: str) -> NoEquivalentError:
    """The error for a FLARE name (``nvflare.X`` or ``fl.X``) fl lacks, naming the closest one it has."""
    return NoEquivalentError(f"fl has no equivalent of {_flare_name(name)}; {closest(name)}", name=name)


def _modules() -> set[str]:
    """Every FLARE module the table names (``nvflare.a``, ``nvflare.a.b``, ...)."""
    found: set[str] = set()
    for key in NVFLARE_ALIASES:
        parts = key.split(".")[:-1]
        found.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
    return found


def _flare_tops() -> set[str]:
    """The top-level FLARE packages the table draws from (``app_common``, ``job_config``, ...)."""
    return {key.split(".")[1] for key in NVFLARE_ALIASES}


class _FlareModule(ModuleType):
    """A FLARE module under ``fl.``: attributes are the table's fl objects, imported on first use."""

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_"):  # probes of tools (__wrapped__, _pytest...): plain attribute errors
            raise AttributeError(attr)
        flare = f"{_flare_name(self.__name__)}.{attr}"
        target = NVFLARE_ALIASES.get(flare)
        if target is None:
            raise no_equivalent(flare)
        module_name, _, name = target.rpartition(".")
        value = getattr(importlib.import_module(module_name), name)
        setattr(self, attr, value)
        return value

    def __dir__(self) -> list[str]:
        prefix = _flare_name(self.__name__) + "."
        names = {k[len(prefix) :] for k in NVFLARE_ALIASES if k.startswith(prefix) and "." not in k[len(prefix) :]}
        return sorted(names | set(super().__dir__()))


class _FlareLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return _FlareModule(spec.name)

    def exec_module(self, module: ModuleType) -> None:
        module.__path__ = []  # a package: its submodules come from this finder too


class FlareLayoutFinder(importlib.abc.MetaPathFinder):
    """Serves ``fl.<FLARE module>`` from the table; consulted after fl's real modules (last on sys.meta_path)."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        parts = fullname.split(".")
        if parts[0] != "fl" or len(parts) < 2 or parts[1] not in _flare_tops():
            return None
        if _flare_name(fullname) not in _modules():
            raise no_equivalent(fullname)
        return importlib.machinery.ModuleSpec(fullname, _FlareLoader(), is_package=True)


def install() -> None:
    """Register the finder once, after the finders of real modules (fl's own modules always win)."""
    if not any(isinstance(f, FlareLayoutFinder) for f in sys.meta_path):
        sys.meta_path.append(FlareLayoutFinder())
