"""The simulator refuses, before it starts anything, a run whose estimated memory exceeds what is left, and
says what to change; without -t/--threads, a run whose sites cannot all train at once trains four a core instead;
the estimate's parts follow its documented constants."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from fl import simulator_memory as sim_memory
from fl.job import FedJob, ScriptRunner
from fl.simulator import simulate
from fl.simulator_memory import GiB, MiB, estimate, model_bytes_of, refusal
from fl.workflows.fedavg import FedAvg

FIXTURES = Path(__file__).parents[1] / "integration" / "fixture_jobs"


@pytest.fixture
def export(monkeypatch, tmp_path):
    """Export a numpy job for ``sites`` sites of which ``per_round`` train a round."""
    monkeypatch.syspath_prepend(str(FIXTURES))
    monkeypatch.chdir(FIXTURES)

    def make(sites: int, per_round: int) -> Path:
        from src.models import FlatModel

        job = FedJob(name="memory", min_clients=per_round)
        job.to(FedAvg(num_clients=per_round, num_rounds=1), "server")
        job.to(FlatModel(4), "server")
        job.to(ScriptRunner(script="src/plus_one.py", framework="numpy"), "@ALL")
        return Path(job.export_job(tmp_path / "export"))

    yield make
    for name in ("src.models", "src"):
        sys.modules.pop(name, None)


def test_the_estimate_adds_base_idle_sites_training_sites_and_models_in_flight():
    need = estimate(1000, 4, 10 * MiB, training_site_bytes=GiB)
    assert need.base == sim_memory.BASE_BYTES
    assert need.idle_sites == 1000 * sim_memory.IDLE_SITE_BYTES
    assert need.training == 4 * GiB
    assert need.models == 10 * MiB * (sim_memory.MODEL_COPIES_ON_SERVER + 4 * sim_memory.MODEL_COPIES_PER_TRAINING_SITE)
    assert need.total == need.base + need.idle_sites + need.training + need.models


def test_a_run_that_fits_is_not_refused():
    need = estimate(200, 2, 0)
    assert refusal(need, need.total, "available on this machine", threads=2) is None


def test_a_refusal_says_the_estimate_what_is_available_and_what_to_change():
    need = estimate(64, 64, 0)
    message = refusal(need, 4 * GiB, "left under this cgroup's memory limit", threads=None)
    assert message is not None
    assert "64 sites" in message and "16." in message  # 64 x 0.25 GiB of scripts
    assert "4.00 GiB is left under this cgroup's memory limit" in message
    for advice in ("-t/--threads", "num_clients", "fewer sites (-n)", "--site-memory-gib"):
        assert advice in message


def test_simulate_refuses_a_run_too_big_before_it_makes_its_workspace(export, tmp_path, monkeypatch, caplog):
    folder = export(sites=8, per_round=8)
    # Less than the base and one training site: not even one at a time fits.
    monkeypatch.setattr(sim_memory, "available_memory", lambda: (GiB // 4, "available on this machine"))
    workspace = tmp_path / "ws"
    logger = logging.getLogger("fl.simulator")  # fl's loggers do not propagate to caplog's root handler
    logger.addHandler(caplog.handler)
    try:
        assert simulate(folder, workspace, n_clients=8, progress=False) == 2
    finally:
        logger.removeHandler(caplog.handler)
    assert "this simulation of 8 sites needs an estimated" in caplog.text
    assert not workspace.exists(), "a refused run must leave nothing behind"


def test_sampling_and_threads_bound_the_sites_counted_as_training(export, monkeypatch):
    from fl.server.jobstore import JobError, read_job
    from fl.simulator import _check_memory

    sampled = export(sites=8, per_round=2)
    # Room for the base, 8 idle sites and two training sites, not for eight training sites.
    room = estimate(8, 2, model_bytes_of(sampled)).total
    monkeypatch.setattr(sim_memory, "available_memory", lambda: (room, "available on this machine"))
    _check_memory(read_job(sampled), 8, None, None)  # num_clients=2: two train at once
    everyone = export(sites=8, per_round=8)
    with pytest.raises(JobError, match="8 training at once"):
        _check_memory(read_job(everyone), 8, 8, None)  # threads=8, said so: refused, not changed
    assert _check_memory(read_job(everyone), 8, 2, None) == 2  # threads=2


def test_without_threads_a_run_whose_sites_cannot_all_train_at_once_trains_four_a_core(export, monkeypatch):
    from fl.server.jobstore import read_job
    from fl.simulator import AUTO_RUNS_PER_CORE, _check_memory

    assert AUTO_RUNS_PER_CORE == 4
    folder = export(sites=8, per_round=8)
    job = read_job(folder)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    room = estimate(8, 8, model_bytes_of(folder)).total
    monkeypatch.setattr(sim_memory, "available_memory", lambda: (room, "available on this machine"))
    assert _check_memory(job, 8, None, None) is None  # all at once fits, 4 a core: all at once
    monkeypatch.setattr(sim_memory, "available_memory", lambda: (room - 1, "available on this machine"))
    assert _check_memory(job, 8, None, None) == 7  # per task: at most all but one (all would run once)
    three = estimate(8, 3, model_bytes_of(folder)).total
    monkeypatch.setattr(sim_memory, "available_memory", lambda: (three, "available on this machine"))
    assert _check_memory(job, 8, None, None) == 3  # as many as fit


def test_without_threads_more_sites_than_four_a_core_train_four_a_core_even_when_all_would_fit(export, monkeypatch):
    """Memory is not the only bound: 64 scripts at once on 2 cores fit the estimate, but starved the
    sites' heartbeats on a loaded machine until sites were declared lost."""
    from fl.server.jobstore import read_job
    from fl.simulator import _check_memory

    folder = export(sites=8, per_round=8)
    job = read_job(folder)
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    plenty = 100 * estimate(8, 8, model_bytes_of(folder)).total
    monkeypatch.setattr(sim_memory, "available_memory", lambda: (plenty, "available on this machine"))
    assert _check_memory(job, 8, None, None) == 4  # 8 sites, 1 core: 4 at once, per task
    assert _check_memory(job, 8, None, None, launch_once=True) == 4  # the job's launch_once: 4 train at once
    assert _check_memory(job, 8, 8, None) == 8  # -t 8, said so: kept


def test_scripts_that_run_once_count_every_site_a_sampled_round_leaves_idle(export, monkeypatch):
    """With launch_once every site's script exists for the whole job, sampled this round or not: the
    estimate counts them all, and a run that cannot hold them runs per task, the sampled sites at once."""
    from fl.server.jobstore import JobError, read_job
    from fl.simulator import _check_memory

    folder = export(sites=8, per_round=2)
    job = read_job(folder)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    room = estimate(8, 2, model_bytes_of(folder)).total
    monkeypatch.setattr(sim_memory, "available_memory", lambda: (room, "available on this machine"))
    assert _check_memory(job, 8, None, None) == 2  # per task: the two sampled sites at once
    with pytest.raises(JobError, match="8 training at once"):
        _check_memory(job, 8, None, None, launch_once=True)  # the job insists on 8 scripts: refused


def test_a_lighter_script_said_so_fits_where_the_default_does_not(export, monkeypatch):
    from fl.server.jobstore import JobError, read_job
    from fl.simulator import _check_memory

    folder = export(sites=8, per_round=8)
    room = estimate(8, 8, model_bytes_of(folder), training_site_bytes=64 * MiB).total
    monkeypatch.setattr(sim_memory, "available_memory", lambda: (room, "available on this machine"))
    with pytest.raises(JobError, match="needs an estimated"):
        _check_memory(read_job(folder), 8, 8, None)
    _check_memory(read_job(folder), 8, 8, 64 * MiB)


def test_the_cgroup_room_is_the_limit_less_the_usage(tmp_path, monkeypatch):
    group = tmp_path / "fl.slice"
    group.mkdir()
    (group / "memory.max").write_text(f"{2 * GiB}\n")
    (group / "memory.current").write_text(f"{GiB // 2}\n")
    cgroup = tmp_path / "self-cgroup"
    cgroup.write_text("0::/fl.slice\n")
    assert sim_memory._cgroup_room(tmp_path, cgroup) == GiB + GiB // 2
    (group / "memory.max").write_text("max\n")
    assert sim_memory._cgroup_room(tmp_path, cgroup) is None


def test_the_cgroup_v1_room_counts_and_its_no_limit_value_does_not(tmp_path):
    group = tmp_path / "memory" / "fl"
    group.mkdir(parents=True)
    (group / "memory.limit_in_bytes").write_text(f"{GiB}\n")
    (group / "memory.usage_in_bytes").write_text(f"{GiB // 4}\n")
    cgroup = tmp_path / "self-cgroup"
    cgroup.write_text("4:cpu,cpuacct:/fl\n7:memory:/fl\n")
    assert sim_memory._cgroup_room(tmp_path, cgroup) == GiB - GiB // 4
    (group / "memory.limit_in_bytes").write_text(f"{(1 << 63) - 4096}\n")
    assert sim_memory._cgroup_room(tmp_path, cgroup) is None


def test_the_cli_passes_what_one_site_needs_and_refuses_a_size_that_is_not_positive(monkeypatch, tmp_path, capsys):
    from fl.cli.main import main

    calls: list[dict[str, object]] = []
    monkeypatch.setattr("fl.simulator.simulate", lambda *a, **k: calls.append(k) or 0)
    monkeypatch.setattr("fl.cli.commands.setup_logging", lambda *a, **k: None)
    job = tmp_path / "job"
    job.mkdir()
    assert main(["simulate", "--site-memory-gib", "0.5", str(job)]) == 0
    assert calls[-1]["site_memory"] == GiB // 2
    with pytest.raises(SystemExit):
        main(["simulate", "--site-memory-gib", "-1", str(job)])
    assert "'-1' is not a positive number of GiB" in capsys.readouterr().err
