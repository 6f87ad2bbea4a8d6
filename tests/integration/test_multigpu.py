"""Multi-GPU sites on CPU: a site runs its script as 2 gloo ranks of torch.distributed.run (DDP), only rank 0
talks to the site, every rank trains on the model of the round, and ending the job ends every rank."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from fl.job import FedJob, ScriptRunner
from fl.site.launch import free_port
from fl.workflows.fedavg import FedAvg
from tests.integration.conftest import FIXTURES, run_dir
from tests.integration.federation import Federation, start_simulation, wait_for
from tests.integration.test_no_orphans import _kill, _still_alive_after

pytestmark = pytest.mark.timeout(900)
DEATH_BOUND_S = 15.0  # kill -9 of the site: the kernel ends torchrun, then its ranks
ABORT_BOUND_S = 60.0  # an abort: SIGTERM, 10 s, then SIGKILL of torchrun's group (and so of its ranks)


def _flare_command() -> str:
    """FLARE's multi-GPU example's command, as its job.py spells it (with a port free here)."""
    return f"python3 -m torch.distributed.run --nnodes=1 --nproc_per_node=2 --master_port={free_port()}"


def _ddp_job(monkeypatch: pytest.MonkeyPatch, sites: dict[str, tuple[str | None, str]], rounds: int) -> FedJob:
    """A FlatModel job whose sites run src/ddp_train.py with (command, script args) each."""
    monkeypatch.chdir(FIXTURES)
    monkeypatch.syspath_prepend(str(FIXTURES))
    from src.models import FlatModel

    job = FedJob(name="ddp", min_clients=len(sites))
    job.to(FedAvg(num_clients=len(sites), num_rounds=rounds, round_timeout=600), "server")
    job.to(FlatModel(16), "server")
    for site, (command, args) in sites.items():
        job.to(ScriptRunner(script="src/ddp_train.py", script_args=args, command=command, framework="pytorch"), site)
    return job


def _evidence(folder: Path, site: str, rank: int) -> list[dict[str, Any]]:
    path = folder / f"{site}-rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _rank_pids(root_pid: int) -> list[int]:
    """The rank processes (ddp_train.py, not torchrun) below ``root_pid``."""
    found = []
    for proc in psutil.Process(root_pid).children(recursive=True):
        try:
            cmdline = proc.cmdline()
        except psutil.NoSuchProcess:
            continue
        # the rank itself: not torchrun, nor an exec wrapper (python -I -S -c ...) not yet become the rank
        if any(arg.endswith("ddp_train.py") for arg in cmdline) and not {"torch.distributed.run", "-c"} & set(cmdline):
            found.append(proc.pid)
    return found


def test_two_gloo_ranks_per_site_train_every_round_and_only_rank_0_talks(monkeypatch, tmp_path):
    evidence = tmp_path / "evidence"
    job = _ddp_job(
        monkeypatch,
        {
            "site-1": (_flare_command(), f"--evidence {evidence} --pattern helper"),
            "site-2": (_flare_command(), f"--evidence {evidence} --pattern flare"),
        },
        rounds=2,
    )
    folder = job.export_job(tmp_path / "export")
    sim = start_simulation(folder, tmp_path / "ws", tmp_path)
    try:
        assert sim.proc is not None
        assert sim.proc.wait(600) == 0, sim.log()[-4000:]
    finally:
        sim.stop()
    log = sim.log()
    # w -> 0.5 w + 0.25 each round on every rank (DDP averages rank 0's and rank 1's gradients): 0.25, 0.375.
    final = torch.load(run_dir(tmp_path / "ws") / "FL_global_model.pt", weights_only=True)["model"]["weight"]
    assert torch.equal(final, torch.full((16,), 0.375))
    for site in ("site-1", "site-2"):
        rank0, rank1 = _evidence(evidence, site, 0), _evidence(evidence, site, 1)
        assert [r["round"] for r in rank0] == [0, 1], rank0
        assert len(rank1) == 2 and all(r["talks"] for r in rank0) and not any(r["talks"] for r in rank1)
        assert [r["synced"] for r in rank0] == [r["synced"] for r in rank1]  # the same model each round
        assert [r["trained"] for r in rank0] == [r["trained"] for r in rank1]
        connected = re.findall(rf"{site}.*training script connected: rank (\d+), pid (\d+)", log)
        assert [(int(rank), int(pid)) for rank, pid in connected] == [(0, rank0[0]["pid"])], connected
    helper0, helper1 = _evidence(evidence, "site-1", 0), _evidence(evidence, "site-1", 1)
    assert [r["round"] for r in helper1] == [0, 1]  # receive_all: rank 1 got the FLModel, rounds and all
    assert [r["received"] for r in helper0] == [r["received"] for r in helper1]
    assert [r["received"] for r in _evidence(evidence, "site-2", 1)] == [None, None]  # FLARE's: None off rank 0


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    fed = Federation(tmp_path, ["site-1"])
    yield fed
    fed.stop()


@pytest.mark.parametrize("how", ["abort", "kill -9 of the site"])
def test_ending_the_job_ends_every_rank(federation, monkeypatch, tmp_path, how):
    """A site with --nproc-per-node 2 runs a plain-command job as 2 ranks; an abort (SIGTERM, then SIGKILL of
    torchrun's group) or a kill -9 of the site agent ends both ranks, which torchrun starts in sessions of their own
    (out of the group's reach). The ranks ignore SIGTERM: torchrun's forwarding of it does not end them."""
    fed = federation
    fed.start_server()
    site = fed.start_site("site-1", extra=("--nproc-per-node", "2"))
    fed.wait_sites(["site-1"])
    evidence = tmp_path / "evidence"
    job = _ddp_job(monkeypatch, {"site-1": (None, f"--evidence {evidence} --sleep 300 --ignore-sigterm")}, rounds=1)
    job_id = json.loads(fed.fl("submit", str(job.export_job(tmp_path / "export")), "--json").stdout)["job_id"]
    wait_for(lambda: site.log().count("sleeping") >= 2, 300, "both ranks to train")
    assert site.proc is not None
    ranks = _rank_pids(site.proc.pid)
    assert len(ranks) == 2, [psutil.Process(p).cmdline() for p in ranks]
    try:
        if how == "abort":
            proc = fed.fl("abort", job_id)
            assert proc.returncode == 0, proc.stderr
        else:
            site.kill9()
        assert _still_alive_after(ranks, ABORT_BOUND_S if how == "abort" else DEATH_BOUND_S) == [], (
            f"ranks outlived the job ({how})"
        )
    finally:
        _kill(ranks)
    assert "--nproc_per_node=2" in site.log()


def test_a_bad_launcher_option_fails_the_job_naming_it(monkeypatch, tmp_path):
    job = _ddp_job(monkeypatch, {"site-1": ("torchrun --nproc_per_node=2 --no-python", "--evidence x")}, rounds=1)
    folder = job.export_job(tmp_path / "export")
    proc = subprocess.run(
        [sys.executable, "-m", "fl", "simulate", str(folder), "-w", str(tmp_path / "ws")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    status = json.loads((run_dir(tmp_path / "ws") / "status.json").read_text())
    assert "site-1" in status["message"] and "--no-python" in status["message"], status["message"]
