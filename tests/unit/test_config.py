"""Job configs: what the Job API exports, and which component paths may load."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from fl.components.model_selector import IntimeModelSelector
from fl.config import ConfigError, instantiate, resolve_class
from fl.job import FedJob, JobConfigError, ScriptRunner
from fl.server.jobstore import JobError, extract_zip, read_job, zip_folder
from fl.workflows.fedavg import FedAvg

REPO = Path(__file__).resolve().parents[2]
HELLO_PT = REPO / "jobs" / "hello-pt"
MISSION_SERVER_COMPONENTS = ["json_generator", "model_selector", "receiver", "persistor", "model_locator"]


@pytest.fixture
def hello_pt_job(monkeypatch):
    """The mission's job built with the Job API, from the hello-pt folder."""
    monkeypatch.chdir(HELLO_PT)
    monkeypatch.syspath_prepend(str(HELLO_PT))
    from src.simple_network import SimpleNetwork

    job = FedJob(name="hello-pt", min_clients=2)
    job.to(FedAvg(num_clients=2, num_rounds=2), "server")
    job.to(SimpleNetwork(), "server")
    for i in range(2):
        job.to(ScriptRunner(script="src/hello-pt_cifar10_fl.py"), f"site-{i + 1}")
    yield job
    sys.modules.pop("src.simple_network", None)
    sys.modules.pop("src", None)


def test_export_matches_the_missions_structure_and_keys(hello_pt_job, tmp_path):
    folder = hello_pt_job.export_job(tmp_path)
    assert folder == tmp_path / "hello-pt"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["deploy_map"] == {"app_server": ["server"], "app_site-1": ["site-1"], "app_site-2": ["site-2"]}
    server = json.loads((folder / "app_server/config/config_fed_server.json").read_text())
    assert server["format_version"] == 2
    assert server["workflows"] == [
        {"id": "controller", "path": "fl.workflows.fedavg.FedAvg", "args": {"num_clients": 2, "num_rounds": 2}}
    ]
    assert [c["id"] for c in server["components"]] == MISSION_SERVER_COMPONENTS
    by_id = {c["id"]: c for c in server["components"]}
    assert by_id["model_selector"]["args"] == {"key_metric": "accuracy", "aggregation_weights": {}}
    assert by_id["receiver"]["args"] == {"events": ["fed.analytix_log_stats"]}
    assert by_id["persistor"]["args"] == {"model": {"path": "src.simple_network.SimpleNetwork", "args": {}}}
    assert by_id["model_locator"]["args"] == {"pt_persistor_id": "persistor"}
    assert server["task_data_filters"] == [] and server["task_result_filters"] == []
    client = json.loads((folder / "app_site-1/config/config_fed_client.json").read_text())
    assert client["executors"][0]["tasks"] == ["*"]
    executor = client["executors"][0]["executor"]
    assert executor["path"] == "fl.components.script_executor.ScriptExecutor"
    assert executor["args"]["task_script_path"] == "src/hello-pt_cifar10_fl.py"
    assert client["components"] == [
        {
            "id": "event_to_fed",
            "path": "fl.components.convert_to_fed_event.ConvertToFedEvent",
            "args": {"events_to_convert": ["analytix_log_stats"], "fed_event_prefix": "fed."},
        }
    ]
    for app in ("app_server", "app_site-1", "app_site-2"):
        assert (folder / app / "custom/src/simple_network.py").is_file()
    assert (folder / "app_site-1/custom/src/hello-pt_cifar10_fl.py").is_file()
    spec = read_job(folder)
    assert spec.named_sites == ["site-1", "site-2"] and spec.min_clients == 2 and spec.num_rounds == 2


def test_export_to_all_clients_uses_one_app(tmp_path, monkeypatch):
    monkeypatch.chdir(HELLO_PT)
    job = FedJob(name="all", min_clients=3, key_metric=None)
    job.to(FedAvg(num_clients=3, num_rounds=1), "server")
    job.to_clients(ScriptRunner(script="src/hello-pt_cifar10_fl.py", framework="numpy"))
    folder = job.export_job(tmp_path)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["deploy_map"] == {"app": ["@ALL"], "app_server": ["server"]}
    server = json.loads((folder / "app_server/config/config_fed_server.json").read_text())
    assert "model_selector" not in [c["id"] for c in server["components"]]


def test_job_api_explains_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.chdir(HELLO_PT)
    job = FedJob(name="x")
    with pytest.raises(JobConfigError, match="no workflow"):
        job.export_job(tmp_path)
    job.to(FedAvg(num_clients=1, num_rounds=1), "server")
    with pytest.raises(JobConfigError, match="no sites"):
        job.export_job(tmp_path)
    with pytest.raises(JobConfigError, match="not found"):
        job.to(ScriptRunner(script="src/missing.py"), "site-1")
    with pytest.raises(JobConfigError, match="workflows run on the server"):
        job.to(FedAvg(num_clients=1, num_rounds=1), "site-1")
    with pytest.raises(JobConfigError, match="name"):
        FedJob(name="bad name/..")


def test_model_defined_in_the_job_script_is_refused():
    class Local(torch.nn.Module):
        pass

    Local.__module__ = "__main__"
    job = FedJob(name="x")
    with pytest.raises(JobConfigError, match="module of its own"):
        job.to(Local(), "server")


def test_model_args_are_recorded_from_its_attributes():
    from fl.job.fed_job import _model_config

    class Net(torch.nn.Module):
        def __init__(self, width: int, depth: int = 2):
            super().__init__()
            self.width = width
            self.depth = depth

    assert _model_config(Net(8, 3))["args"] == {"width": 8, "depth": 3}
    assert _model_config(Net(8))["args"] == {"width": 8}


def test_components_record_their_arguments():
    assert IntimeModelSelector(key_metric="loss", negate_key_metric=True)._init_args == {
        "key_metric": "loss",
        "negate_key_metric": True,
    }


def test_component_paths_load_only_from_fl_or_flare_names():
    assert resolve_class("fl.workflows.fedavg.FedAvg") is FedAvg
    assert resolve_class("nvflare.app_common.workflows.fedavg.FedAvg") is FedAvg
    with pytest.raises(ConfigError, match="not allowed here"):
        resolve_class("os.system")
    with pytest.raises(ConfigError, match="not a component"):
        resolve_class("fl.fsutil.Path")
    with pytest.raises(ConfigError, match="no fl equivalent"):
        resolve_class("nvflare.app_common.workflows.scaffold.Scaffold")
    with pytest.raises(ConfigError, match="cannot import"):
        resolve_class("fl.nothing_here.Thing")


def test_component_arguments_are_checked():
    with pytest.raises(ConfigError, match=r"unexpected keyword argument 'rounds'.*accepted arguments: num_clients"):
        instantiate({"path": "fl.workflows.fedavg.FedAvg", "args": {"rounds": 3}})
    with pytest.raises(ConfigError, match="num_rounds must be at least 1"):
        instantiate({"path": "fl.workflows.fedavg.FedAvg", "args": {"num_rounds": 0}})


def _write_job(folder: Path, meta: object, server: object) -> Path:
    (folder / "app_server/config").mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps(meta))
    (folder / "app_server/config/config_fed_server.json").write_text(json.dumps(server))
    return folder


@pytest.mark.parametrize(
    ("meta", "server", "message"),
    [
        ({"name": "j"}, {}, "deploy_map"),
        ({"name": "j", "deploy_map": {"app_server": ["server"]}}, {"workflows": []}, "at least one workflow"),
        (
            {"name": "j", "deploy_map": {"app_server": ["server"]}},
            {"workflows": [{"id": "w", "path": "builtins.eval", "args": {}}]},
            "not allowed here",
        ),
        ({"name": "j", "deploy_map": {"app_x": ["server"]}}, {}, "no such folder"),
        ({"name": "j", "deploy_map": {"app_server": ["server"]}}, {"format_version": 1}, "format_version"),
    ],
)
def test_bad_job_folders_are_refused_with_a_reason(tmp_path, meta, server, message):
    with pytest.raises(JobError, match=message):
        read_job(_write_job(tmp_path / "job", meta, server))


def test_job_archives_cannot_escape_their_folder(tmp_path):
    import zipfile

    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../outside.txt", "x")
    with pytest.raises(JobError, match="outside the job folder"):
        extract_zip(archive.read_bytes(), tmp_path / "out")
    assert not (tmp_path / "outside.txt").exists()


def test_zip_round_trip(tmp_path):
    (tmp_path / "a/b").mkdir(parents=True)
    (tmp_path / "a/b/c.py").write_text("print(1)\n")
    extract_zip(zip_folder(tmp_path / "a"), tmp_path / "copy")
    assert (tmp_path / "copy/b/c.py").read_text() == "print(1)\n"


def test_a_model_config_that_builds_another_model_is_refused():
    class Net(torch.nn.Module):
        def __init__(self, width: int = 4):
            super().__init__()
            self.layer = torch.nn.Linear(width, 2)  # width is not kept as an attribute

    Net.__module__, Net.__qualname__ = "tests.unit.test_config", "Net"
    globals()["Net"] = Net
    job = FedJob(name="x")
    job.to(Net(), "server")  # the default width: the config builds the same model
    with pytest.raises(JobConfigError, match="builds a different model"):
        job.to(Net(width=8), "server")
