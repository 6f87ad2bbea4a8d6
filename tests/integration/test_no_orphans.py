"""Processes die with their parents: a kill -9 of a site agent or of the simulator leaves no process of
its run behind (the kernel ends them, not cleanup code)."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.integration.federation import Federation, wait_for

pytestmark = pytest.mark.timeout(600)
DEATH_BOUND_S = 10.0


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def _still_alive_after(pids: list[int], bound: float = DEATH_BOUND_S) -> list[int]:
    """The processes of ``pids`` still running ``bound`` seconds from now (sooner if all end)."""
    deadline = time.monotonic() + bound
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _alive(pids)


def _kill(pids: list[int]) -> None:
    for pid in _alive(pids):
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).kill()


def _remove_memory_folders_of(pids: list[int]) -> None:
    """The /dev/shm folders of killed sites hosts (the next simulator start would sweep them)."""
    for owner in Path("/dev/shm").glob("fl-sim-*/.owner"):
        with contextlib.suppress(OSError, ValueError):
            if int(owner.read_text().strip() or 0) in pids:
                shutil.rmtree(owner.parent, ignore_errors=True)


def _scripts_of(pid: int) -> list[psutil.Process]:
    """The training scripts below ``pid``: processes, or forks of the warm worker (named after the script)."""
    return [
        p
        for p in psutil.Process(pid).children(recursive=True)
        if "plus_one.py" in " ".join(p.cmdline()) or p.name() == "plus_one.py"
    ]


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    fed = Federation(tmp_path, ["site-1"])
    yield fed
    fed.stop()


def test_a_child_outlives_the_thread_that_started_it_and_dies_with_its_process(tmp_path):
    code = (
        "import threading, time\n"
        "from fl.process import popen_bound_to_parent\n"
        "started = []\n"
        "t = threading.Thread(target=lambda: started.append(popen_bound_to_parent(['sleep', '300'])))\n"
        "t.start(); t.join(); time.sleep(1)\n"  # the thread that asked is gone: the child must not be
        "print(started[0].pid, started[0].poll(), flush=True)\n"
        "time.sleep(300)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = -1
    try:
        assert parent.stdout is not None
        pid, poll = parent.stdout.readline().split()
        child = int(pid)
        assert poll == "None" and _alive([child]) == [child]
        parent.kill()
        parent.wait(10)
        assert _still_alive_after([child]) == []
    finally:
        parent.kill()
        _kill([child])


def test_kill_9_of_a_site_agent_ends_its_training_script(federation, tmp_path, make_job):
    fed = federation
    fed.start_server()
    site = fed.start_site("site-1")
    fed.wait_sites(["site-1"])
    job = make_job(sites=1, rounds=2, script_args={"site-1": "--sleep 120"})
    fed.fl("submit", str(job.export_job(tmp_path / "export")), "--json")
    site.wait_for_log("site-1: round 0 task train", 120)  # the script trains (sleeps), not waiting on its agent
    assert site.proc is not None
    pids = [p.pid for p in _scripts_of(site.proc.pid)]
    assert pids, "no training script under the site agent"
    site.kill9()
    try:
        assert _still_alive_after(pids) == [], "the training script outlived its site agent"
    finally:
        _kill(pids)


def test_processes_a_script_started_end_with_its_job(federation, tmp_path, make_job):
    fed = federation
    fed.start_server()
    site = fed.start_site("site-1")
    fed.wait_sites(["site-1"])
    job_id = json.loads(
        fed.fl(
            "submit",
            str(make_job(sites=1, rounds=1, script_args={"site-1": "--spawn-sleeper"}).export_job(tmp_path / "export")),
            "--json",
        ).stdout
    )["job_id"]
    sleeper = int(site.wait_for_log(r"sleeper pid (\d+)", 120).group(1))
    try:
        final = wait_for(
            lambda: (j := fed.job(job_id))["status"] in ("finished", "failed") and j, 120, "the job to end"
        )
        assert final["status"] == "finished", final["message"]
        assert _still_alive_after([sleeper]) == [], "a process the script started outlived its job"
    finally:
        _kill([sleeper])


def _simulate_sleeping_scripts(make_job, tmp_path):
    """`fl simulate` of a 2-site job whose scripts sleep 120 s; the driver and its log file."""
    job = make_job(rounds=2, script_args={s: "--sleep 120" for s in ("site-1", "site-2")})
    folder = job.export_job(tmp_path / "export")
    log = tmp_path / "sim.log"
    with open(log, "wb") as out:
        driver = subprocess.Popen(
            [sys.executable, "-m", "fl", "simulate", str(folder), "-w", str(tmp_path / "ws")],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    return driver, log


@pytest.mark.parametrize("victim", ["driver", "sites host"])
def test_kill_9_in_a_simulation_ends_every_process_below_the_killed_one(make_job, tmp_path, victim):
    """kill -9 of `fl simulate` ends its whole run (sites host and scripts); of the sites host, its scripts."""
    driver, log = _simulate_sleeping_scripts(make_job, tmp_path)
    pids: list[int] = []
    hosts: list[psutil.Process] = []
    try:
        wait_for(lambda: log.read_text().count(": round 0 task train") >= 2, 180, "both scripts to train", 0.3)
        hosts = [p for p in psutil.Process(driver.pid).children() if "fl.simulator" in p.cmdline()]
        killed = driver if victim == "driver" else hosts[0]
        below = psutil.Process(killed.pid).children(recursive=True)
        run_scripts = _scripts_of(driver.pid)
        if victim == "sites host":  # its scripts are forks of the run's warm worker, tied to it by their connection
            names = set(killed.cmdline()[killed.cmdline().index("--sites") + 1].split(","))
            below += [p for p in run_scripts if Path(p.cwd()).parent.name in names]  # <site>/<job>
        pids = [p.pid for p in below]
        scripts = [p for p in below if p in run_scripts]
        assert scripts and len(run_scripts) == 2, json.dumps([p.cmdline() for p in below])
        killed.kill()
        left = _still_alive_after(pids)
        assert left == [], f"still running after kill -9 of the {victim}: {left}"
    finally:
        driver.kill()
        driver.wait(10)
        _kill(pids)
        _remove_memory_folders_of([h.pid for h in hosts])


def _gone_after(procs: list[psutil.Process], bound: float = DEATH_BOUND_S) -> list[psutil.Process]:
    """Of ``procs`` (each known by its PID and start time, so a reused PID is not mistaken), those
    still running ``bound`` seconds from now (sooner if all end)."""
    deadline = time.monotonic() + bound

    def running() -> list[psutil.Process]:
        alive = []
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
        return alive

    while running() and time.monotonic() < deadline:
        time.sleep(0.1)
    return running()


def test_kill_9_of_one_sites_host_ends_the_whole_run_driver_included(make_job, tmp_path):
    """The driver sees its sites process die, aborts the job and ends every process of the run (the
    other sites host and its script too) at once, instead of waiting out the round's timeout."""
    driver, log = _simulate_sleeping_scripts(make_job, tmp_path)
    run: list[psutil.Process] = []
    hosts: list[psutil.Process] = []
    try:
        wait_for(lambda: log.read_text().count(": round 0 task train") >= 2, 180, "both scripts to train", 0.3)
        root = psutil.Process(driver.pid)
        hosts = [p for p in root.children() if "fl.simulator" in p.cmdline()]
        assert len(hosts) == 2, [p.cmdline() for p in root.children()]  # two cores: a sites host per site
        run = [root, *root.children(recursive=True)]
        assert len(_scripts_of(driver.pid)) == 2
        hosts[0].kill()
        left = _gone_after(run)
        assert left == [], f"still running after kill -9 of a sites host: {[p.cmdline() for p in left]}"
        assert driver.wait(1) == 1
        assert "exited with code -9 during the job" in log.read_text()
    finally:
        driver.kill()
        driver.wait(10)
        _kill([p.pid for p in run])
        _remove_memory_folders_of([h.pid for h in hosts])
