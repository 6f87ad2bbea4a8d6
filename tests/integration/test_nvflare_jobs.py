"""NVIDIA FLARE's own job scripts run on fl with ``nvflare`` replaced by ``fl`` in their import lines.

The scripts are FLARE's own, unmodified (tests/nvflare_examples.py: copies kept in tests/data/nvflare, or
``FL_NVFLARE_REPO``'s, at the ref a test names). Any other
change a test makes to FLARE's files is named where it is made (small offline data, a workspace).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from tests.integration.federation import Federation, wait_for
from tests.nvflare_examples import example_files

ROOT = Path(__file__).resolve().parents[2]
HELLO_PT = "examples/hello-world/hello-pt"
SMALL = ["--n_clients", "2", "--num_rounds", "1", "--epochs", "1", "--batch_size", "16", "--num_workers", "0",
         "--synthetic_data", "--train_size", "64", "--test_size", "32"]  # fmt: skip
#: Prepended to FLARE 2.5's training script, which downloads CIFAR10: torchvision's FakeData instead (offline).
OFFLINE_CIFAR10 = (
    "import torchvision.datasets as _datasets  # fl test: offline stand-in for CIFAR10\n"
    "_datasets.CIFAR10 = lambda root, transform=None, download=False, train=True: _datasets.FakeData(\n"
    "    size=32 if train else 16, image_size=(3, 32, 32), num_classes=10, transform=transform)\n"
)


def _fl_imports(text: str) -> str:
    """``nvflare`` -> ``fl`` in import lines only, the port the README promises."""
    return re.sub(r"(?m)^(\s*(?:from|import)\s+)nvflare\b", r"\1fl", text)


def _write(files: dict[str, str], folder: Path) -> None:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(_fl_imports(text))


def _run(script: str, args: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FL_SIMULATOR_WORKSPACE_ROOT": str(cwd / "simulation")}
    return subprocess.run(
        [sys.executable, script, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _hello_pt_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> Any:
    """FLARE's hello-pt client.py and model.py (imports ported) as a small FedAvgRecipe of fl's."""
    files = example_files(HELLO_PT, "main")
    if "client.py" not in files or "model.py" not in files:
        pytest.skip("this NVFlare has no hello-pt client.py/model.py")
    code = tmp_path / "code"
    code.mkdir()
    _write({k: v for k, v in files.items() if k in ("client.py", "model.py")}, code)
    monkeypatch.chdir(code)
    monkeypatch.syspath_prepend(str(code))
    from model import SimpleNetwork

    from fl.recipe import FedAvgRecipe

    try:
        return FedAvgRecipe(
            name=name, min_clients=2, num_rounds=1, model=SimpleNetwork(), train_script="client.py",
            train_args="--synthetic_data --train_size 64 --test_size 32 --epochs 1 --batch_size 16 --num_workers 0",
        )  # fmt: skip
    finally:
        sys.modules.pop("model", None)


@pytest.mark.timeout(1000)
def test_flare_recipe_hello_pt_job_runs_with_its_imports_changed(tmp_path):
    files = example_files(HELLO_PT, "main")
    if "job.py" not in files or "FedAvgRecipe" not in files["job.py"]:
        pytest.skip("this NVFlare has no recipe form of hello-pt")
    _write(files, tmp_path)
    proc = _run("job.py", SMALL, tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "Job Status is: finished" in proc.stdout, proc.stdout[-2000:]
    result = Path(re.search(r"Result can be found in : (\S+)", proc.stdout).group(1))
    assert torch.load(result / "FL_global_model.pt", weights_only=True)["round"] == 0
    assert (result / "validation.json").is_file()


@pytest.mark.timeout(1000)
def test_flare_2_5_fedavg_job_script_runs_with_its_imports_changed(tmp_path):
    files = example_files(HELLO_PT, "2.5")
    if "fedavg_script_runner_pt.py" not in files:
        pytest.skip("this NVFlare has no 2.5 hello-pt job script")
    workspace = tmp_path / "workdir"
    job = files["fedavg_script_runner_pt.py"]
    assert '"/tmp/nvflare/jobs/workdir"' in job
    files["fedavg_script_runner_pt.py"] = job.replace('"/tmp/nvflare/jobs/workdir"', repr(str(workspace)))
    files["src/hello-pt_cifar10_fl.py"] = OFFLINE_CIFAR10 + files["src/hello-pt_cifar10_fl.py"]
    _write(files, tmp_path)
    proc = _run("fedavg_script_runner_pt.py", [], tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    run = (workspace / "latest").resolve()
    logs = (run / "logs" / "site-1.log").read_text()
    assert "Finished Training" in logs
    assert torch.load(run / "FL_global_model.pt", weights_only=True)["round"] == 1


@pytest.mark.timeout(1000)
def test_poc_env_runs_hello_pt_as_tls_daemons_and_stops_them(tmp_path, monkeypatch):
    from fl.recipe import PocEnv

    recipe = _hello_pt_recipe(tmp_path, monkeypatch, "hello-pt-poc")
    env = PocEnv(num_clients=2, workspace=tmp_path / "poc")
    run = recipe.execute(env)
    pids = env.pids
    result = run.get_result(timeout=900)
    logs = "\n".join(p.read_text()[-1500:] for p in sorted((tmp_path / "poc" / "logs").glob("*.log")))
    assert run.get_status() == "finished", logs
    assert len(pids) == 3 and all(not Path(f"/proc/{pid}").exists() for pid in pids), "POC daemons left running"
    assert "listening" in (tmp_path / "poc" / "logs" / "server.log").read_text()
    assert (tmp_path / "poc" / "tls" / "site-1").is_dir()
    assert result is not None and any(result.rglob("FL_global_model.pt")), sorted(result.rglob("*"))


@pytest.mark.timeout(1000)
def test_flares_in_process_executor_config_runs_in_a_process_of_its_own(tmp_path, monkeypatch):
    from fl.simulator import simulate

    recipe = _hello_pt_recipe(tmp_path, monkeypatch, "in-process")
    job_dir = recipe.export(tmp_path / "export")
    config_path = job_dir / "app" / "config" / "config_fed_client.json"
    config = json.loads(config_path.read_text())
    args = config["executors"][0]["executor"]["args"]
    # What FLARE 2.5 writes for ScriptRunner(launch_external_process=False): its in-process executor.
    config["executors"][0]["executor"] = {
        "path": "nvflare.app_opt.pt.in_process_client_api_executor.PTInProcessClientAPIExecutor",
        "args": {
            "task_script_path": args["task_script_path"], "task_script_args": args["task_script_args"],
            "task_wait_time": None, "result_pull_interval": 0.5, "log_pull_interval": None,
            "params_transfer_type": "FULL", "train_with_evaluation": True, "train_task_name": "train",
            "evaluate_task_name": "validate", "submit_model_task_name": "submit_model",
            "params_exchange_format": "pytorch",
        },
    }  # fmt: skip
    config_path.write_text(json.dumps(config))
    code_ = simulate(job_dir, tmp_path / "ws", progress=False)
    run = (tmp_path / "ws" / "latest").resolve()
    logs = (run / "logs" / "site-1.log").read_text()
    assert code_ == 0, logs[-3000:]
    # The job log holds what the script printed: the agent relays it from the script's own process.
    assert "Finished Training for site-1" in logs


@pytest.mark.timeout(1000)
def test_prod_env_submits_to_a_running_federation_with_the_admin_folder(tmp_path, monkeypatch):
    from fl.recipe import ProdEnv

    recipe = _hello_pt_recipe(tmp_path, monkeypatch, "hello-pt-prod")
    federation = Federation(tmp_path / "federation", ["site-1", "site-2"])
    try:
        federation.start_server()
        for site in ("site-1", "site-2"):
            federation.start_site(site)
        federation.wait_sites(["site-1", "site-2"], timeout=120)
        env = ProdEnv(startup_kit=federation.tls / "admin", server=federation.address, results_dir=tmp_path / "res")
        run = recipe.execute(env)
        result = run.get_result(timeout=900)
        assert run.get_status() == "finished", federation.server.log()[-3000:] if federation.server else ""
        assert result == tmp_path / "res" / run.get_job_id()
        assert any(result.rglob("FL_global_model.pt")), sorted(result.rglob("*"))
    finally:
        federation.stop()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.timeout(300)
def test_poc_daemons_end_when_the_process_that_started_them_is_killed(tmp_path):
    starter = (
        "import sys, time\n"
        "from fl.recipe import PocEnv\n"
        f"env = PocEnv(num_clients=1, workspace={str(tmp_path / 'poc')!r})\n"
        "env.start()\n"
        "print(*env.pids, flush=True)\n"
        "time.sleep(600)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", starter], stdout=subprocess.PIPE, env=env, text=True)
    pids: list[int] = []
    try:
        assert proc.stdout is not None
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        proc.kill()  # SIGKILL: no cleanup code of the starter runs
        proc.wait()
        wait_for(lambda: not any(_alive(p) for p in pids), 60, "the POC daemons to end with their starter")
    finally:
        proc.kill()
        proc.wait()
        for pid in pids:  # only if the test failed: the daemons it started
            if _alive(pid):
                os.kill(pid, 9)


@pytest.mark.timeout(1000)
def test_flares_privacy_filter_job_script_runs_its_filter_on_the_sites(tmp_path):
    """FLARE's Job API example with PercentilePrivacy as a site result filter (job.to(..., filter_type=...))."""
    folder = "examples/advanced/job_api/pt"
    files = example_files(folder, "main")
    name = "fedavg_script_runner_dp_filter_cifar10.py"
    if name not in files or "FilterType.TASK_RESULT" not in files[name]:
        pytest.skip("this NVFlare has no Job API example with a privacy filter")
    workspace = tmp_path / "workdir"
    job = files[name]
    assert '"/tmp/nvflare/jobs/workdir/pt_dp_filter"' in job
    files[name] = job.replace('"/tmp/nvflare/jobs/workdir/pt_dp_filter"', repr(str(workspace)))
    files["src/cifar10_fl.py"] = OFFLINE_CIFAR10 + files["src/cifar10_fl.py"].replace(
        '"/tmp/nvflare/data/cifar10"', repr(str(tmp_path / "data"))
    )
    _write(files, tmp_path)
    proc = _run(name, [], tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    run = (workspace / "latest").resolve()
    config = json.loads((run / "job" / "app_site-1" / "config" / "config_fed_client.json").read_text())
    (rule,) = config["task_result_filters"]
    assert rule["tasks"] == ["train"] and rule["filters"][0]["args"] == {"percentile": 10, "gamma": 0.01}
    output = proc.stdout + proc.stderr
    assert output.count("train: task_result_filters applied") >= 4, output[-4000:]  # 2 sites x 2 rounds
    assert torch.load(run / "FL_global_model.pt", weights_only=True)["round"] == 1
