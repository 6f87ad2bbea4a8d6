"""One alias table serves FLARE's config paths and FLARE's Python import paths (fl.aliases)."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from fl.aliases import NVFLARE_ALIASES, NoEquivalentError, canonical
from fl.config import ConfigError, resolve_class


def _flare_import(key: str) -> object:
    """What ``from fl.<module> import <Name>`` gives for the FLARE name ``nvflare.<module>.<Name>``."""
    module, _, name = key.rpartition(".")
    return getattr(importlib.import_module("fl." + module.removeprefix("nvflare.")), name)


def _target(path: str) -> object:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("key", sorted(NVFLARE_ALIASES))
def test_every_flare_name_in_the_table_imports_as_fls_own_object(key):
    assert _flare_import(key) is _target(NVFLARE_ALIASES[key])


def test_the_users_ported_import_lines_give_fls_classes():
    from fl.app_common.workflows.fedavg import FedAvg
    from fl.app_opt.pt.job_config.fed_avg import FedAvgJob
    from fl.app_opt.pt.recipes.fedavg import FedAvgRecipe
    from fl.job_config.api import FedJob
    from fl.job_config.script_runner import FrameworkType, ScriptRunner

    import fl.job
    import fl.recipe
    import fl.workflows.fedavg
    from fl.recipe import SimEnv, add_experiment_tracking

    assert FedAvg is fl.workflows.fedavg.FedAvg and FedJob is fl.job.FedJob and ScriptRunner is fl.job.ScriptRunner
    assert FedAvgJob is fl.job.FedAvgJob and FrameworkType is fl.job.FrameworkType
    assert FedAvgRecipe is fl.recipe.FedAvgRecipe and SimEnv is fl.recipe.SimEnv
    assert add_experiment_tracking is fl.recipe.add_experiment_tracking


def test_an_unknown_flare_name_says_what_comes_closest():
    with pytest.raises(ImportError, match=r"fl has no equivalent of nvflare\.app_common\.workflows\.fedavg\.FedAvgX; "
                       r"the closest is nvflare\.app_common\.workflows\.fedavg\.FedAvg"):  # fmt: skip
        from fl.app_common.workflows.fedavg import FedAvgX  # noqa: F401
    with pytest.raises(NoEquivalentError, match=r"fl has no equivalent of nvflare\.app_common\.workflows\.scaffod"):
        importlib.import_module("fl.app_common.workflows.scaffod")
    with pytest.raises(ModuleNotFoundError):  # still what code catching a missing module expects
        importlib.import_module("fl.job_config.nothing")


def test_fls_real_modules_win_over_flare_layout():
    import fl.client

    assert fl.client.__file__ is not None and fl.client.__file__.endswith("fl/client/__init__.py")
    with pytest.raises(ModuleNotFoundError, match=r"No module named 'fl\.not_flare_either'"):
        importlib.import_module("fl.not_flare_either")  # not FLARE's layout: Python's own error


def test_config_paths_and_imports_read_the_same_table(monkeypatch):
    monkeypatch.setitem(NVFLARE_ALIASES, "nvflare.app_common.demo.widget.Widget", "fl.workflows.fedavg.FedAvg")
    from fl.workflows.fedavg import FedAvg

    try:
        assert resolve_class("nvflare.app_common.demo.widget.Widget") is FedAvg
        assert resolve_class("fl.app_common.demo.widget.Widget") is FedAvg  # an exported FLARE config, ported
        assert importlib.import_module("fl.app_common.demo.widget").Widget is FedAvg
    finally:
        for name in ("fl.app_common.demo.widget", "fl.app_common.demo"):
            sys.modules.pop(name, None)
    assert canonical("fl.app_common.workflows.fedavg.FedAvg") == "fl.workflows.fedavg.FedAvg"


def test_config_resolver_refuses_a_flare_name_it_lacks_naming_the_closest():
    with pytest.raises(ConfigError, match=r"no fl equivalent; the closest is nvflare\.app_common\.workflows\.fedavg"):
        resolve_class("nvflare.app_common.workflows.fedavgx.FedAvg")


def test_import_fl_imports_nothing_the_table_names():
    code = "import fl, sys; print(sorted(m for m in sys.modules if m.startswith(('fl.', 'torch'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['fl.aliases']"
