"""bench/measure.py's memory cap on a real process tree: the kernel's cgroup limit where the machine
allows one, else the RSS watchdog process; either way the run is reported out of memory, and nothing
of the tree outlives it."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid

import psutil
import pytest

from bench import measure

HOG = """
import os, sys, time
blocks = []
print(os.getpid(), flush=True)
for _ in range(int(sys.argv[1])):
    blocks.append(bytearray(32 << 20))
    for i in range(0, len(blocks[-1]), 4096):
        blocks[-1][i] = 1
    time.sleep(0.005)
print('{"done": true}', flush=True)
"""


def hog(blocks: int) -> list[str]:
    return [sys.executable, "-c", HOG, str(blocks)]


def cgroup_allowed() -> bool:
    group = measure.MemoryCgroup.create(64 << 20, f"fl-bench-probe-{uuid.uuid4().hex}")
    if group is None:
        return False
    group.close()
    return True


def assert_gone(result: dict[str, object]) -> None:
    pid = int(str(result["stdout_tail"]).split()[0])
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.skipif(not cgroup_allowed(), reason="no memory cgroup can be made here")
def test_the_cgroup_limit_stops_a_tree_that_outgrows_the_cap() -> None:
    result = measure.run_measured(hog(40), mem_cap_gib=0.25, timeout_s=120, parse_json=True)  # 1.25 GiB wanted
    assert str(result["status"]).startswith("did not finish: out of memory at 0.25 GiB (cgroup v")
    assert result["output"] is None  # it never got to the end
    assert result["cgroup_peak_bytes"] is not None and result["cgroup_peak_bytes"] <= 0.25 * measure.GiB
    assert_gone(result)


def test_the_watchdog_process_stops_the_tree_where_no_cgroup_can_be_made(monkeypatch) -> None:
    monkeypatch.setattr(measure.MemoryCgroup, "create", classmethod(lambda cls, limit, name: None))
    result = measure.run_measured(hog(40), mem_cap_gib=0.25, timeout_s=120, parse_json=True)
    assert str(result["status"]).startswith("did not finish: out of memory at 0.25 GiB (")  # watchdog or sampler
    assert str(result["mem_cap_mechanism"]).startswith("RSS watchdog process")
    assert result["peak_rss_sum_bytes"] < 0.6 * measure.GiB  # stopped near the cap, not at 1.25 GiB
    assert_gone(result)


def test_the_watchdog_alone_kills_the_tree_and_says_why(tmp_path) -> None:
    tree = subprocess.Popen(hog(40), stdout=subprocess.DEVNULL)
    reason = tmp_path / "reason"
    watchdog = measure.start_watchdog(tree.pid, 0.25, uuid.uuid4().hex, str(reason))
    try:
        assert tree.wait(timeout=60) == -signal.SIGKILL
        assert reason.read_text() == "did not finish: out of memory at 0.25 GiB (RSS watchdog process)"
        assert watchdog.wait(timeout=30) == 0  # it ends with the tree it watched
    finally:
        tree.kill()
        watchdog.kill()
        tree.wait()
        watchdog.wait()


def test_a_tree_under_the_cap_finishes() -> None:
    result = measure.run_measured(hog(2), mem_cap_gib=0.5, timeout_s=120, parse_json=True)
    assert result["status"] == "ok" and result["output"] == {"done": True}
