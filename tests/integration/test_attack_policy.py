"""What a job may run on the server host, against a real `fl server` with mutual TLS.

A class spec nested in a component's arguments is checked at submit like a top-level one (and is
never instantiated); `fl server --no-custom-code` refuses at submit a job that would need its own
code on the server and runs one whose initial weights ship with it or come from a checkpoint in a
data root; a checkpoint path outside the job folder and the data roots is refused.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fl.tensors import write_tensors
from tests.integration.federation import Federation, wait_for

pytestmark = pytest.mark.timeout(600)
SERVER_CONFIG = "app_server/config/config_fed_server.json"


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    fed = Federation(tmp_path / "fed", ["site-1"])
    yield fed
    fed.stop()


def _edit_persistor(folder: Path, **args: Any) -> None:
    """Set the persistor's arguments in the job's server config, and drop the weights shipped with it."""
    path = folder / SERVER_CONFIG
    config = json.loads(path.read_text())
    persistor = next(c for c in config["components"] if c["id"] == "persistor")
    persistor["args"].update(args)
    path.write_text(json.dumps(config))
    shutil.rmtree(folder / "app_server" / "initial_weights", ignore_errors=True)


def _refused(fed: Federation, folder: Path) -> str:
    proc = fed.fl("submit", str(folder), "--json")
    assert proc.returncode != 0, f"the server accepted {folder.name}: {proc.stdout}"
    return proc.stderr


def _run_to_the_end(fed: Federation, folder: Path) -> dict[str, Any]:
    proc = fed.fl("submit", str(folder), "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = json.loads(proc.stdout)["job_id"]
    status = lambda: (j := fed.job(job_id))["status"] in ("finished", "failed", "aborted") and j  # noqa: E731
    return wait_for(status, 240, f"job {folder.name} to end")  # type: ignore[no-any-return]


def _final_weight(fed: Federation, job_id: str, out: Path) -> Any:
    import torch

    proc = fed.fl("download", job_id, "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    return torch.load(out / "FL_global_model.pt", weights_only=True)["model"]["weight"]


def test_a_nested_class_outside_the_allow_list_is_refused_at_submit_and_never_built(federation, tmp_path, make_job):
    fed = federation
    fed.start_server()
    fed.start_site("site-1")  # a job accepted by mistake would start and build its model at once
    fed.wait_sites(["site-1"])
    marker = tmp_path / "instantiated"
    folder = make_job(name="nested", sites=1, rounds=1).export_job(tmp_path / "export")
    _edit_persistor(folder, model={"path": "subprocess.Popen", "args": {"args": ["touch", str(marker)]}})

    proc = fed.fl("submit", str(folder), "--wait", "--timeout", "60", "--json")
    assert not marker.exists(), "the class was instantiated on the server host"
    assert proc.returncode != 0, f"the server accepted the job: {proc.stdout}"
    assert f"{SERVER_CONFIG}: component 'persistor': args.model: subprocess.Popen: not allowed" in proc.stderr
    assert fed.fl_json("jobs") == []


def test_no_custom_code_server_refuses_job_code_and_runs_shipped_weights_or_a_data_root_checkpoint(
    federation, tmp_path, make_job
):
    fed = federation
    data_root = tmp_path / "data"
    data_root.mkdir()
    write_tensors(data_root / "init.safetensors", {"weight": np.full(16, 5.0, dtype=np.float32)})
    outside = tmp_path / "outside.safetensors"
    shutil.copyfile(data_root / "init.safetensors", outside)
    fed.start_server("--no-custom-code", "--data-root", str(data_root))
    fed.start_site("site-1")
    fed.wait_sites(["site-1"])

    needs_code = make_job(name="needs-code", sites=1, rounds=1).export_job(tmp_path / "export")
    _edit_persistor(needs_code)
    stderr = _refused(fed, needs_code)
    assert f"{SERVER_CONFIG}: component 'persistor': args.model: src.models.FlatModel" in stderr, stderr
    assert "--no-custom-code" in stderr and "ships no weights" in stderr, stderr

    for name, checkpoint in [("outside", str(outside)), ("escape", "../../outside.safetensors")]:
        folder = make_job(name=name, sites=1, rounds=1).export_job(tmp_path / "export")
        _edit_persistor(folder, source_ckpt_file_full_name=checkpoint)
        stderr = _refused(fed, folder)
        assert "component 'persistor': args.source_ckpt_file_full_name" in stderr and "outside" in stderr, stderr
    assert fed.fl_json("jobs") == []

    # The site adds one to what it receives: zeros shipped with the job, fives from the checkpoint.
    shipped = make_job(name="shipped", sites=1, rounds=1).export_job(tmp_path / "export")
    from_checkpoint = make_job(name="from-checkpoint", sites=1, rounds=1).export_job(tmp_path / "export")
    _edit_persistor(from_checkpoint, source_ckpt_file_full_name=str(data_root / "init.safetensors"))
    for folder, expected in [(shipped, 1.0), (from_checkpoint, 6.0)]:
        final = _run_to_the_end(fed, folder)
        assert final["status"] == "finished", final["message"]
        assert _final_weight(fed, final["job_id"], tmp_path / folder.name).tolist() == [expected] * 16
