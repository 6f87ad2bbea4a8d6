"""Filters through the Job API and the Recipe API, as FLARE's: ``job.to(filter, target, filter_type=...)``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from fl.config import ConfigError
from fl.filters import ExcludeVars, FilterChain, PercentilePrivacy, server_result_filters
from fl.job import FedJob, FilterType, JobConfigError, ScriptRunner
from fl.recipe import NumpyFedAvgRecipe
from fl.server.jobstore import read_job
from fl.workflows.fedavg import FedAvg

FILTER_CODE = """
from fl.filters import Filter


class KeepAll(Filter):
    def __init__(self, note="x"):
        self.note = note

    def process(self, src, dst, ctx):
        return False
"""


@pytest.fixture()
def code(tmp_path, monkeypatch):
    """The current folder: train.py (a site script) and myfilters.py (a filter of the job's own)."""
    (tmp_path / "train.py").write_text("print('train')\n")
    (tmp_path / "myfilters.py").write_text(FILTER_CODE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("myfilters", None)


def _job(sites=("site-1", "site-2")) -> FedJob:
    job = FedJob(name="filtered", min_clients=len(sites))
    job.to(FedAvg(num_clients=len(sites), num_rounds=1), "server")
    for site in sites:
        job.to(ScriptRunner("train.py"), site)
    return job


def _config(job_dir: Path, app: str) -> dict:
    name = "config_fed_server.json" if app == "app_server" else "config_fed_client.json"
    return json.loads((job_dir / app / "config" / name).read_text())


def test_site_and_server_filters_export_in_flares_shape_and_load_back(code):
    job = _job()
    job.to(ExcludeVars(exclude_vars=["fc.bias"]), "site-1", filter_type=FilterType.TASK_RESULT, tasks=["train"])
    job.to(PercentilePrivacy(percentile=20, gamma=0.5), "site-1", filter_type=FilterType.TASK_RESULT, tasks=["train"])
    job.to(ExcludeVars(exclude_vars="^bn"), "site-2", filter_type=FilterType.TASK_DATA)
    job.to(ExcludeVars(exclude_vars="conv"), "server", filter_type=FilterType.TASK_RESULT, tasks=["train"])
    job_dir = job.export_job(code / "out")

    site1, site2, server = (_config(job_dir, a) for a in ("app_site-1", "app_site-2", "app_server"))
    assert site1["task_result_filters"] == [
        {
            "tasks": ["train"],
            "filters": [
                {"path": "fl.filters.builtin.ExcludeVars", "args": {"exclude_vars": ["fc.bias"]}},
                {"path": "fl.filters.builtin.PercentilePrivacy", "args": {"percentile": 20, "gamma": 0.5}},
            ],
        }
    ]
    assert site1["task_data_filters"] == [] and site2["task_result_filters"] == []
    assert site2["task_data_filters"] == [
        {"tasks": ["*"], "filters": [{"path": "fl.filters.builtin.ExcludeVars", "args": {"exclude_vars": "^bn"}}]}
    ]
    assert server["task_data_filters"] == []
    assert server["task_result_filters"][0]["filters"][0]["args"] == {"exclude_vars": "conv"}

    # What the site and the server build from the exported files: the filters, for their tasks only.
    chain = FilterChain.from_config(site1, "task_result_filters", where="config_fed_client.json")
    assert [type(f).__name__ for _, f in chain.for_task("train")] == ["ExcludeVars", "PercentilePrivacy"]
    assert chain.for_task("validate") == []
    data = FilterChain.from_config(site2, "task_data_filters", where="config_fed_client.json")
    assert data.for_task("validate")[0][1].pattern.pattern == "^bn"
    assert server_result_filters(server, where="config_fed_server.json").for_task("train")
    assert read_job(job_dir).num_rounds == 1  # the server's submit checks accept it


def test_a_job_without_filters_exports_empty_filter_lists(code):
    job_dir = _job().export_job(code / "out")
    for app in ("app_server", "app_site-1"):
        config = _config(job_dir, app)
        assert config["task_data_filters"] == [] and config["task_result_filters"] == []


def test_flares_import_paths_give_the_same_filter_classes(code):
    from fl.app_common.filters import ExcludeVars as FlareExclude
    from fl.app_common.filters import PercentilePrivacy as FlarePercentile
    from fl.job_config.defs import FilterType as FlareFilterType

    import fl

    assert FlareExclude is ExcludeVars and FlarePercentile is PercentilePrivacy
    assert FlareFilterType is FilterType and fl.FilterType is FilterType


def test_filters_for_other_task_sets_make_separate_entries_and_overlapping_ones_are_refused(code):
    job = _job(("site-1",))
    job.to(ExcludeVars(exclude_vars="a"), "site-1", filter_type=FilterType.TASK_RESULT, tasks=["train"])
    job.to(ExcludeVars(exclude_vars="b"), "site-1", filter_type=FilterType.TASK_RESULT, tasks=["validate"])
    with pytest.raises(JobConfigError, match=r"tasks \['submit_model', 'train'\] overlap the tasks \['train'\]"):
        job.to(ExcludeVars(), "site-1", filter_type=FilterType.TASK_RESULT, tasks=["train", "submit_model"])
    entries = _config(job.export_job(code / "out"), "app_site-1")["task_result_filters"]
    assert [e["tasks"] for e in entries] == [["train"], ["validate"]]


@pytest.mark.parametrize(
    ("target", "kwargs", "message"),
    [
        ("site-1", {}, "filter_type must be FilterType.TASK_RESULT or FilterType.TASK_DATA, got None"),
        ("site-1", {"filter_type": "RESULT"}, "got 'RESULT'"),
        ("site-1", {"filter_type": FilterType.TASK_RESULT, "tasks": "train"}, "a list of task names"),
        ("server", {"filter_type": FilterType.TASK_DATA}, "server does not filter task data"),
    ],
)
def test_bad_filter_placements_are_refused_saying_what_to_change(code, target, kwargs, message):
    job = _job(("site-1",))
    with pytest.raises(JobConfigError, match=message):
        job.to(ExcludeVars(), target, **kwargs)


def test_filter_type_on_something_that_is_not_a_filter_is_refused(code):
    with pytest.raises(JobConfigError, match="applies to a filter, not a FedAvg"):
        _job().to(FedAvg(), "server", filter_type=FilterType.TASK_RESULT)


def test_a_filter_of_the_jobs_own_code_is_refused_as_the_sites_would_refuse_it(code):
    from myfilters import KeepAll

    with pytest.raises(JobConfigError, match=r"myfilters.KeepAll is the job's own code; filters run in the site"):
        _job().to(KeepAll(note="y"), "site-2", filter_type=FilterType.TASK_RESULT)
    # What the site would do with it: its config may name fl's classes only.
    config = {"task_result_filters": [{"tasks": ["*"], "filters": [{"path": "myfilters.KeepAll", "args": {}}]}]}
    with pytest.raises(ConfigError, match=r"myfilters\.KeepAll"):
        FilterChain.from_config(config, "task_result_filters", where="config_fed_client.json")


def test_recipe_filter_methods_add_to_every_site_app_or_the_ones_named(code):
    recipe = NumpyFedAvgRecipe(name="r", min_clients=2, num_rounds=1, model=np.zeros(3), train_script="train.py")
    recipe.add_client_output_filter(ExcludeVars(exclude_vars="fc"), tasks=["train"])
    recipe.add_client_input_filter(ExcludeVars(exclude_vars="bn"))
    recipe.add_server_input_filter(ExcludeVars(exclude_vars="conv"), tasks=["train"])
    with pytest.raises(JobConfigError, match="server does not filter task data"):
        recipe.add_server_output_filter(ExcludeVars())
    job_dir = recipe.export(code / "out")
    sites = _config(job_dir, "app")
    assert sites["task_result_filters"][0]["tasks"] == ["train"]
    assert sites["task_data_filters"][0]["filters"][0]["args"] == {"exclude_vars": "bn"}
    assert _config(job_dir, "app_server")["task_result_filters"][0]["filters"][0]["args"] == {"exclude_vars": "conv"}
