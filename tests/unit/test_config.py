"""Job configs: what the Job API exports, and which component paths may load."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from fl.components.model_selector import IntimeModelSelector
from fl.config import ConfigError, HostPolicy, check_config, instantiate, resolve_class
from fl.job import FedJob, JobConfigError, ScriptRunner
from fl.server.jobstore import JobError, extract_zip, read_job, zip_folder
from fl.workflows.fedavg import FedAvg
from fl.workflows.scaffold import Scaffold

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
        resolve_class("nvflare.app_common.ccwf.swarm_server_ctl.SwarmServerController")
    assert resolve_class("nvflare.app_common.workflows.cross_site_model_eval.CrossSiteModelEval").__name__ == (
        "CrossSiteModelEval"
    )
    assert resolve_class("nvflare.app_common.workflows.scaffold.Scaffold") is Scaffold
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


# --- one resolver, one allow-list, at any depth ---------------------------------------------------
def _custom(root: Path, files: dict[str, str]) -> Path:
    """A job's custom folder holding ``files`` (path -> source)."""
    custom = root / "app_server" / "custom"
    for rel, text in files.items():
        (custom / rel).parent.mkdir(parents=True, exist_ok=True)
        (custom / rel).write_text(text)
    custom.mkdir(parents=True, exist_ok=True)
    return custom


def _persistor_config(model: object, **extra: object) -> dict[str, object]:
    return {
        "format_version": 2,
        "workflows": [{"id": "controller", "path": "fl.workflows.fedavg.FedAvg", "args": {"num_rounds": 1}}],
        "components": [
            {
                "id": "persistor",
                "path": "fl.components.persistor.PTFileModelPersistor",
                "args": {"model": model, **extra},
            }
        ],
    }


@pytest.mark.parametrize(
    ("model", "arg_path", "cls"),
    [
        ({"path": "subprocess.Popen", "args": {"args": ["touch", "x"]}}, "args.model", "subprocess.Popen"),
        ({"path": "torch.nn.Linear", "args": {"in_features": 1, "out_features": 1}}, "args.model", "torch.nn.Linear"),
        (
            {"path": "src.net.Net", "args": {"layers": [{"nested": {"path": "os.system", "args": {}}}]}},
            "args.model.args.layers[0].nested",
            "os.system",
        ),
    ],
)
def test_a_class_outside_the_allow_list_is_refused_at_any_depth_naming_where(tmp_path, model, arg_path, cls):
    custom = _custom(tmp_path, {"src/net.py": "class Net:\n    pass\n"})
    with pytest.raises(ConfigError) as err:
        check_config(_persistor_config(model), custom_dir=custom, where="app_server/config/config_fed_server.json")
    message = str(err.value)
    assert message.startswith(f"app_server/config/config_fed_server.json: component 'persistor': {arg_path}: {cls}:")
    assert "not allowed" in message


def test_checking_a_config_imports_none_of_the_jobs_code(tmp_path):
    marker = tmp_path / "imported"
    touch = f"open({str(marker)!r}, 'w').close()\n"
    custom = _custom(tmp_path, {"pkg/__init__.py": touch, "pkg/net.py": touch + "class Net:\n    pass\n"})
    refs = check_config(
        _persistor_config({"path": "pkg.net.Net", "args": {}}), custom_dir=custom, where="config_fed_server.json"
    )
    assert [(r.component, r.arg_path, r.path, r.job_code) for r in refs if r.job_code] == [
        ("persistor", "args.model", "pkg.net.Net", True)
    ]
    assert not marker.exists()
    assert "pkg" not in sys.modules


def test_the_jobs_code_is_refused_where_the_host_builds_the_class_itself(tmp_path):
    custom = _custom(tmp_path, {"src/net.py": "class Net:\n    pass\n"})
    config = {"format_version": 2, "workflows": [{"id": "w", "path": "src.net.Net", "args": {}}]}
    with pytest.raises(ConfigError, match=r"component 'w': src\.net\.Net: not allowed here"):
        check_config(config, custom_dir=custom, where="config_fed_server.json")


@pytest.mark.parametrize(
    ("files", "path", "message"),
    [
        ({"json/evil.py": "class X: pass\n"}, "json.evil.X", "name of a standard or fl module"),
        ({"torch/evil.py": "class X: pass\n"}, "torch.evil.X", "torch is already imported from outside the job's code"),
        ({}, "src.missing.X", "not there"),
    ],
)
def test_job_modules_must_be_files_in_the_custom_folder_that_shadow_nothing(tmp_path, files, path, message):
    custom = _custom(tmp_path, files)
    with pytest.raises(ConfigError, match=message):
        resolve_class(path, custom_dir=custom)


def test_a_symlink_out_of_the_custom_folder_is_not_the_jobs_code(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "net.py").write_text("class Net:\n    pass\n")
    custom = _custom(tmp_path, {})
    (custom / "src").mkdir()
    (custom / "src" / "net.py").symlink_to(outside / "net.py")
    with pytest.raises(ConfigError, match="not there"):
        resolve_class("src.net.Net", custom_dir=custom)


def test_the_jobs_class_loads_from_its_folder_even_when_the_name_is_found_first_elsewhere(tmp_path, monkeypatch):
    marker = tmp_path / "wrong-module-ran"
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "jobsrc").mkdir(parents=True)
    for name in ("__init__.py", "net.py"):  # a regular package of the same name, first on sys.path
        (elsewhere / "jobsrc" / name).write_text(f"open({str(marker)!r}, 'w').close()\nclass Net: pass\n")
    monkeypatch.syspath_prepend(str(elsewhere))
    custom = _custom(tmp_path, {"jobsrc/__init__.py": "", "jobsrc/net.py": "class Net:\n    origin = 'custom'\n"})
    try:
        cls = resolve_class("jobsrc.net.Net", custom_dir=custom)
        assert cls.origin == "custom" and not marker.exists()
    finally:
        for name in ("jobsrc.net", "jobsrc"):
            sys.modules.pop(name, None)


def test_a_class_the_jobs_module_imports_from_elsewhere_is_refused(tmp_path):
    custom = _custom(tmp_path, {"reexport/net.py": "from subprocess import Popen\n"})
    try:
        with pytest.raises(ConfigError, match=r"subprocess\.Popen, not defined in the job's code"):
            resolve_class("reexport.net.Popen", custom_dir=custom)
    finally:
        for name in ("reexport.net", "reexport"):
            sys.modules.pop(name, None)


def test_the_model_building_child_refuses_a_class_outside_the_allow_list(tmp_path):
    from fl.components import model_init

    marker = tmp_path / "marker"
    model = json.dumps({"path": "subprocess.Popen", "args": {"args": ["touch", str(marker)]}})
    custom = _custom(tmp_path, {})
    with pytest.raises(ConfigError, match=r"subprocess\.Popen: not allowed"):
        model_init.main(["--out", str(tmp_path / "out.safetensors"), "--model", model, "--custom-dir", str(custom)])
    assert not marker.exists()


def test_nested_specs_in_lists_and_objects_are_built_through_the_resolver():
    built = instantiate(
        {
            "path": "fl.components.model_locator.PTFileModelLocator",
            "args": {"pt_persistor_id": "p"},
        },
        recursive=True,
    )
    assert built.pt_persistor_id == "p"
    with pytest.raises(ConfigError, match=r"os\.system: not allowed here"):
        instantiate(
            {"path": "fl.components.validation_json.ValidationJsonGenerator", "args": {"x": [{"path": "os.system"}]}},
            recursive=True,
        )


# --- file paths in configs ------------------------------------------------------------------------
def test_config_paths_stay_in_the_job_folder_or_a_data_root(tmp_path):
    job, data, other = tmp_path / "job", tmp_path / "data", tmp_path / "other"
    for folder in (job / "app_server", data, other):
        folder.mkdir(parents=True)
    for f in (job / "app_server/init.pt", data / "init.pt", other / "init.pt"):
        f.write_bytes(b"x")
    (data / "link.pt").symlink_to(other / "init.pt")
    policy = HostPolicy(data_roots=(data,))
    assert policy.resolve_path("app_server/init.pt", job, what="ckpt") == (job / "app_server/init.pt").resolve()
    assert policy.resolve_path(str(data / "init.pt"), job, what="ckpt") == (data / "init.pt").resolve()
    for bad, rule in [
        ("../other/init.pt", "stay in the job folder"),
        (str(other / "init.pt"), "must lie under the server's data roots"),
        (str(data / "link.pt"), "must lie under the server's data roots"),
        (str(job / "app_server/init.pt"), "must lie under"),
    ]:
        with pytest.raises(ConfigError, match=rule):
            policy.resolve_path(bad, job, what="ckpt")
    with pytest.raises(ConfigError, match="the server has none: fl server --data-root DIR"):
        HostPolicy().resolve_path(str(data / "init.pt"), job, what="ckpt")


# --- the server's policy at submit ----------------------------------------------------------------
def test_no_custom_code_accepts_shipped_weights_and_refuses_a_model_it_would_build(hello_pt_job, tmp_path):
    folder = hello_pt_job.export_job(tmp_path / "export")
    no_code = HostPolicy(job_code=False)
    assert read_job(folder, no_code).num_rounds == 2
    shutil.rmtree(folder / "app_server" / "initial_weights")
    with pytest.raises(JobError) as err:
        read_job(folder, no_code)
    message = str(err.value)
    assert message.startswith(
        "app_server/config/config_fed_server.json: component 'persistor': args.model: src.simple_network.SimpleNetwork"
    )
    assert "--no-custom-code" in message and "ships no weights" in message
    assert read_job(folder, HostPolicy()).num_rounds == 2  # the default policy builds it in a child process


def test_no_custom_code_accepts_a_checkpoint_in_the_job_folder_and_refuses_one_outside(hello_pt_job, tmp_path):
    folder = hello_pt_job.export_job(tmp_path / "export")
    shutil.rmtree(folder / "app_server" / "initial_weights")
    (folder / "app_server" / "init.safetensors").write_bytes(b"x")
    config_path = folder / "app_server/config/config_fed_server.json"
    config = json.loads(config_path.read_text())
    persistor = next(c for c in config["components"] if c["id"] == "persistor")
    for value, ok in [
        ("app_server/init.safetensors", True),
        (str(tmp_path / "x.safetensors"), False),
        ("../x.safetensors", False),
    ]:
        persistor["args"]["source_ckpt_file_full_name"] = value
        config_path.write_text(json.dumps(config))
        if ok:
            read_job(folder, HostPolicy(job_code=False))
        else:
            with pytest.raises(JobError, match=r"component 'persistor': args\.source_ckpt_file_full_name: .*outside"):
                read_job(folder, HostPolicy(job_code=False))


# --- checkpoints: safetensors only in a job; .pt converted on the user's machine -----------------
def _persistor_checkpoint(folder: Path, value: str) -> None:
    config_path = folder / "app_server/config/config_fed_server.json"
    config = json.loads(config_path.read_text())
    next(c for c in config["components"] if c["id"] == "persistor")["args"]["source_ckpt_file_full_name"] = value
    config_path.write_text(json.dumps(config))


@pytest.mark.parametrize("name", ["init.pt", "init.pth"])
def test_a_torch_checkpoint_named_in_a_config_is_refused_at_submit_saying_how_to_convert_it(
    hello_pt_job, tmp_path, name
):
    folder = hello_pt_job.export_job(tmp_path / "export")
    torch.save({"w": torch.zeros(2)}, folder / "app_server" / name)
    _persistor_checkpoint(folder, f"app_server/{name}")
    for policy in (None, HostPolicy(), HostPolicy(job_code=False)):
        with pytest.raises(JobError) as refused:
            read_job(folder, policy)
        message = str(refused.value)
        assert "config_fed_server.json: component 'persistor'" in message, message
        assert f"checkpoint 'app_server/{name}' is not safetensors (.safetensors)" in message, message
        assert f"`fl convert-checkpoint {name} init.safetensors`" in message, message


def test_the_model_building_child_never_unpickles_a_checkpoint(tmp_path, monkeypatch):
    from fl.components import model_init

    checkpoint = tmp_path / "init.pt"
    torch.save({"w": torch.ones(2)}, checkpoint)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called on a job's file"))
    with pytest.raises(ValueError, match=r"'.*init\.pt' is not safetensors"):
        model_init.main(["--out", str(tmp_path / "out.safetensors"), "--checkpoint", str(checkpoint)])
    assert not (tmp_path / "out.safetensors").exists()


def test_fl_convert_checkpoint_writes_the_state_dict_as_safetensors_and_refuses_bad_input(tmp_path, capsys):
    from fl.cli.main import main
    from fl.tensors import load_torch

    state = {"layer.weight": torch.randn(3, 2), "layer.bias": torch.randn(3)}
    torch.save({"model": state, "round": 4}, tmp_path / "in.pt")
    assert main(["convert-checkpoint", str(tmp_path / "in.pt"), str(tmp_path / "out.safetensors")]) == 0
    converted = load_torch(tmp_path / "out.safetensors")
    assert converted.keys() == state.keys() and all(torch.equal(converted[k], v) for k, v in state.items())
    assert main(["convert-checkpoint", str(tmp_path / "in.pt"), str(tmp_path / "out.pt")]) == 2
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert main(["convert-checkpoint", str(tmp_path / "junk.pt"), str(tmp_path / "j.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "the output must end in .safetensors" in err and f"cannot convert {tmp_path / 'junk.pt'}" in err
    assert not (tmp_path / "j.safetensors").exists()


def test_export_job_converts_a_local_torch_initial_checkpoint_and_the_server_accepts_it(hello_pt_job, tmp_path):
    from src.simple_network import SimpleNetwork

    from fl.job import PTModel
    from fl.tensors import load_torch

    net = SimpleNetwork()
    torch.save(net.state_dict(), tmp_path / "start.pt")
    job = FedJob(name="from-pt", min_clients=1)
    job.to(FedAvg(num_clients=1, num_rounds=1), "server")
    job.to(PTModel(net, persistor_args={"source_ckpt_file_full_name": str(tmp_path / "start.pt")}), "server")
    job.to(ScriptRunner(script="src/hello-pt_cifar10_fl.py"), "site-1")
    folder = job.export_job(tmp_path / "export")
    config = json.loads((folder / "app_server/config/config_fed_server.json").read_text())
    persistor = next(c for c in config["components"] if c["id"] == "persistor")
    assert persistor["args"]["source_ckpt_file_full_name"] == "app_server/initial_checkpoint/start.safetensors"
    converted = load_torch(folder / "app_server/initial_checkpoint/start.safetensors")
    assert all(torch.equal(converted[k], v) for k, v in net.state_dict().items())
    assert not list(folder.rglob("*.pt"))
    assert read_job(folder, HostPolicy(job_code=False)).num_rounds == 1


def test_site_configs_are_checked_at_submit_too(hello_pt_job, tmp_path):
    folder = hello_pt_job.export_job(tmp_path / "export")
    config_path = folder / "app_site-1/config/config_fed_client.json"
    config = json.loads(config_path.read_text())
    config["components"][0]["args"]["hook"] = {"path": "os.system", "args": {"command": "true"}}
    config_path.write_text(json.dumps(config))
    with pytest.raises(
        JobError, match=r"app_site-1/config/config_fed_client.json: component 'event_to_fed': args.hook"
    ):
        read_job(folder)
