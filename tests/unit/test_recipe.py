"""The Recipe API and FLARE 2.4/2.5's Job API arguments build the jobs FLARE users expect."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from fl.config import instantiate
from fl.job import FedAvgJob, FedJob, FrameworkType, JobConfigError, ScriptRunner
from fl.recipe import (
    CyclicRecipe,
    FedAvgRecipe,
    FedOptRecipe,
    FedProxRecipe,
    ScaffoldRecipe,
    SimEnv,
    add_cross_site_evaluation,
    add_experiment_tracking,
)
from fl.workflows.fedavg import FedAvg

NET = """
import torch


class Net(torch.nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.width = width
        self.fc = torch.nn.Linear(3, width)
"""


@pytest.fixture()
def code(tmp_path, monkeypatch):
    """A job's code folder, the current folder: net.py (a model) and train.py (a script)."""
    (tmp_path / "net.py").write_text(NET)
    (tmp_path / "train.py").write_text("print('train')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("net", None)


def _configs(job_dir: Path) -> dict[str, dict]:
    return {p.parent.parent.name: json.loads(p.read_text()) for p in job_dir.glob("*/config/*.json")}


def _recipe(**kwargs):
    from net import Net

    args = {"name": "r", "min_clients": 2, "num_rounds": 3, "model": Net(), "train_script": "train.py"}
    return FedAvgRecipe(**{**args, **kwargs})


def test_fedavg_recipe_exports_fedavg_the_model_and_the_script_for_all_sites(code):
    configs = _configs(_recipe(train_args="--epochs 1").export(code / "out"))
    workflow = configs["app_server"]["workflows"][0]
    assert workflow["path"] == "fl.workflows.fedavg.FedAvg"
    assert workflow["args"] == {"num_clients": 2, "num_rounds": 3}
    persistor = next(c for c in configs["app_server"]["components"] if c["id"] == "persistor")
    assert persistor["args"]["model"] == {"path": "net.Net", "args": {}}
    executor = configs["app"]["executors"][0]["executor"]["args"]
    assert executor["task_script_path"] == "train.py" and executor["task_script_args"] == "--epochs 1"
    assert "command" not in executor  # FLARE's default "python3 -u" is the site's own Python
    meta = json.loads((code / "out" / "r" / "meta.json").read_text())
    assert meta["min_clients"] == 2 and meta["deploy_map"]["app"] == ["@ALL"]


def test_a_model_given_as_class_path_dict_is_shipped_as_written(code):
    recipe = _recipe(model={"class_path": "net.Net", "args": {"width": 6}}, initial_ckpt="ckpt/start.safetensors")
    server = _configs(recipe.export(code / "out"))["app_server"]
    persistor = next(c for c in server["components"] if c["id"] == "persistor")
    assert persistor["args"]["model"] == {"path": "net.Net", "args": {"width": 6}}
    assert persistor["args"]["source_ckpt_file_full_name"] == "ckpt/start.safetensors"


def test_per_site_config_gives_each_site_its_own_script_arguments(code):
    recipe = _recipe(per_site_config={"site-a": {"train_args": "--lr 1"}, "site-b": {"train_args": "--lr 2"}})
    configs = _configs(recipe.export(code / "out"))
    assert "app" not in configs
    args = {site: configs[f"app_{site}"]["executors"][0]["executor"]["args"] for site in ("site-a", "site-b")}
    assert args["site-a"]["task_script_args"] == "--lr 1" and args["site-b"]["task_script_args"] == "--lr 2"
    with pytest.raises(JobConfigError, match=r"per_site_config\['site-a'\]: unknown keys \['gpu'\]"):
        _recipe(per_site_config={"site-a": {"gpu": 1}})


def test_recipe_options_fl_cannot_honour_are_refused_not_ignored(code):
    with pytest.raises(JobConfigError, match="client_memory_gc_rounds=2: not supported"):
        _recipe(client_memory_gc_rounds=2)
    with pytest.raises(JobConfigError, match="params_transfer_type must be one of FULL, DIFF, got 'HALF'"):
        _recipe(params_transfer_type="HALF")
    with pytest.raises(JobConfigError, match="give model="):
        _recipe(model=None)


def test_fedprox_recipe_is_fedavg_on_the_server(code):
    from net import Net

    recipe = FedProxRecipe(min_clients=1, model=Net(), train_script="train.py")
    assert recipe.name == "fedprox"
    assert _configs(recipe.export(code / "out"))["app_server"]["workflows"][0]["path"] == "fl.workflows.fedavg.FedAvg"


def test_scaffold_recipe_takes_flares_arguments_and_exports_scaffold(code):
    from net import Net

    recipe = ScaffoldRecipe(
        model=Net(),
        min_clients=2,
        num_rounds=4,
        train_script="train.py",
        server_memory_gc_rounds=1,
        cuda_empty_cache=True,
    )
    workflow = _configs(recipe.export(code / "out"))["app_server"]["workflows"][0]
    assert workflow["path"] == "fl.workflows.scaffold.Scaffold"
    built = instantiate(workflow)
    assert (recipe.name, built.num_rounds, built.num_clients) == ("scaffold", 4, 2)
    with pytest.raises(JobConfigError, match="ScaffoldRecipe: params_transfer_type='DIFF' is not supported"):
        ScaffoldRecipe(model=Net(), min_clients=2, train_script="train.py", params_transfer_type="DIFF")


def test_fedopt_recipe_takes_flares_example_arguments_and_exports_fedopt(code):
    """FLARE's documented FedOptRecipe example: "{num_rounds}" in the scheduler becomes the round count."""
    from net import Net

    recipe = FedOptRecipe(
        name="my_fedopt_job",
        model=Net(),
        min_clients=2,
        num_rounds=10,
        train_script="train.py",
        device="cpu",
        source_model="model",
        optimizer_args={"path": "torch.optim.SGD", "args": {"lr": 1.0, "momentum": 0.6}, "config_type": "dict"},
        lr_scheduler_args={
            "class_path": "torch.optim.lr_scheduler.CosineAnnealingLR",
            "args": {"T_max": "{num_rounds}", "eta_min": 0.9},
            "config_type": "dict",
        },
    )
    workflow = _configs(recipe.export(code / "out"))["app_server"]["workflows"][0]
    assert workflow["path"] == "fl.workflows.fedopt.FedOpt"
    assert workflow["args"]["lr_scheduler_args"]["args"] == {"T_max": 10, "eta_min": 0.9}
    built = instantiate(workflow)
    assert (built.num_rounds, built.schedule) == (10, (10, 0.9))


def test_cyclic_recipe_exports_cyclic(code):
    from net import Net

    recipe = CyclicRecipe(model=Net(), num_rounds=3, train_script="train.py")
    workflow = _configs(recipe.export(code / "out"))["app_server"]["workflows"][0]
    assert workflow["path"] == "fl.workflows.cyclic.Cyclic"
    assert (recipe.name, instantiate(workflow).num_rounds) == ("cyclic", 3)


def test_experiment_tracking_and_cross_site_evaluation(code):
    recipe = _recipe()
    add_experiment_tracking(recipe, tracking_type="tensorboard")
    server = _configs(recipe.export(code / "out"))["app_server"]
    assert any(c["path"] == "fl.components.tb_receiver.TBAnalyticsReceiver" for c in server["components"])
    with pytest.raises(JobConfigError, match="tracking_type 'neptune': one of tensorboard, mlflow, wandb"):
        add_experiment_tracking(recipe, tracking_type="neptune")
    add_cross_site_evaluation(recipe)
    workflows = _configs(recipe.export(code / "out2"))["app_server"]["workflows"]
    assert [w["path"] for w in workflows] == [
        "fl.workflows.fedavg.FedAvg",
        "fl.workflows.cross_site_eval.CrossSiteModelEval",
    ]


def test_sim_env_checks_its_clients():
    with pytest.raises(JobConfigError, match="num_clients"):
        SimEnv()
    with pytest.raises(JobConfigError, match="num_clients=3 but 2 clients named"):
        SimEnv(num_clients=3, clients=["a", "b"])


def test_script_runner_takes_flares_arguments(code):
    assert ScriptRunner("train.py", launch_external_process=True, command="python3 -u").command is None
    assert ScriptRunner("train.py", framework=FrameworkType.NUMPY).framework == "numpy"
    job = FedJob(name="j", min_clients=1)
    job.to(FedAvg(num_clients=1, num_rounds=1), "server")
    job.to(ScriptRunner("train.py", framework=FrameworkType.RAW), "site-1", tasks=["train"])
    executors = _configs(job.export_job(code / "out"))["app_site-1"]["executors"]
    assert executors[0]["tasks"] == ["train"]
    assert executors[0]["executor"]["args"]["params_exchange_format"] == "raw"  # FLARE's value, as given
    assert instantiate(executors[0]["executor"]).params_exchange_format == "numpy"  # what fl's sites hand over
    with pytest.raises(JobConfigError, match=r"framework must be one of FrameworkType\.PYTORCH, NUMPY, RAW"):
        ScriptRunner("train.py", framework=FrameworkType.TENSORFLOW)
    with pytest.raises(
        JobConfigError, match=r"unexpected arguments to FedJob.to: gpu \(accepted: id, tasks, filter_type\)"
    ):
        job.to(ScriptRunner("train.py"), "site-2", gpu=0)
    with pytest.raises(JobConfigError, match="mandatory_clients"):
        FedJob(name="j", mandatory_clients=["site-1"])


def test_fedavg_job_of_flare_2_5(code):
    from net import Net

    job = FedAvgJob(name="hello", n_clients=2, num_rounds=4, initial_model=Net(width=5))
    for i in range(2):
        job.to(ScriptRunner(script="train.py", script_args=""), f"site-{i + 1}")
    server = _configs(job.export_job(code / "out"))["app_server"]
    assert server["workflows"][0]["args"] == {"num_clients": 2, "num_rounds": 4}
    persistor = next(c for c in server["components"] if c["id"] == "persistor")
    assert persistor["args"]["model"] == {"path": "net.Net", "args": {"width": 5}}


def test_flares_exported_in_process_executor_config_builds_fls_script_executor():
    spec = {
        "path": "nvflare.app_opt.pt.in_process_client_api_executor.PTInProcessClientAPIExecutor",
        "args": {
            "task_script_path": "src/client.py", "task_script_args": "--epochs 1", "task_wait_time": None,
            "result_pull_interval": 0.5, "log_pull_interval": None, "params_transfer_type": "FULL",
            "train_with_evaluation": True, "train_task_name": "train", "evaluate_task_name": "validate",
            "submit_model_task_name": "submit_model", "params_exchange_format": "pytorch",
        },
    }  # fmt: skip
    executor = instantiate(spec)
    assert type(executor).__name__ == "ScriptExecutor"
    assert executor.task_script_path == "src/client.py" and executor.params_exchange_format == "pytorch"


def test_numpy_fedavg_recipe_uses_the_numpy_persistor_or_says_it_is_missing(code):
    import importlib.util

    from fl.recipe import NumpyFedAvgRecipe

    args = {"name": "np", "min_clients": 2, "num_rounds": 1, "model": [[1.0, 2.0]], "train_script": "train.py"}
    if importlib.util.find_spec("fl.components.np_persistor") is None:
        with pytest.raises(JobConfigError, match=r"no NumPy persistor \(fl.components.np_persistor\)"):
            NumpyFedAvgRecipe(**args)
        return
    configs = _configs(NumpyFedAvgRecipe(**args).export(code / "out"))
    persistor = next(c for c in configs["app_server"]["components"] if c["id"] == "persistor")
    assert persistor["path"] == "fl.components.np_persistor.NPModelPersistor"
    assert configs["app"]["executors"][0]["executor"]["args"]["params_exchange_format"] == "numpy"


def test_sim_env_takes_flare_log_config_modes_and_levels_and_refuses_others():
    for accepted in (None, "concise", "full", "verbose", "debug", "ERROR", "/tmp/log_config.json"):
        assert SimEnv(num_clients=1, log_config=accepted).log_config == accepted
    with pytest.raises(JobConfigError, match="log_config 'loud' is not one of concise, full, verbose"):
        SimEnv(num_clients=1, log_config="loud")


def test_recipe_passes_params_transfer_type_diff_to_the_sites_executor(code):
    configs = _configs(_recipe(params_transfer_type="DIFF").export(code / "out"))
    executor = configs["app"]["executors"][0]["executor"]["args"]
    assert executor["params_transfer_type"] == "DIFF"
