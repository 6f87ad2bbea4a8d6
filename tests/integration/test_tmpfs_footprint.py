"""A real simulation holds at most one model in /dev/shm at any time, however many sites it has.

A sampler follows ``fl.footprint.tmpfs_bytes`` of the simulation's process tree while it runs (no
timing is asserted): with 2 sites, the run's tmpfs bytes never pass one model (the sites share one
download of the global model, and their results go back on their channels, not through files),
and nothing of the run is left in /dev/shm afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
import torch

from fl.footprint import OWNER_FILE, tmpfs_bytes
from fl.simulator import SHM
from tests.integration.conftest import run_dir

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(not os.access(SHM, os.W_OK), reason="no writable /dev/shm: the simulator uses the disk"),
]

NUMEL = 8 * 1024 * 1024  # a 32 MiB float32 model
HEADER_SLACK = 64 * 1024  # safetensors headers, the folder's owner file


class TreeTmpfsSampler:
    """Peak of ``tmpfs_bytes`` over a process and its descendants, sampled until it exits."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.peak = 0
        self.samples = 0
        self.nonzero = 0
        self.folders: set[Path] = set()  # the run's folders in /dev/shm (made by a process of its tree)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        root = psutil.Process(self.proc.pid)
        while self.proc.poll() is None:
            try:
                pids = [root.pid, *(p.pid for p in root.children(recursive=True))]
            except psutil.Error:
                break
            self.folders |= {f for f in SHM.glob("fl-sim-*") if _owner(f) in pids}
            held = tmpfs_bytes(pids)
            self.peak = max(self.peak, held)
            self.samples += 1
            self.nonzero += held > 2 * HEADER_SLACK


def _owner(folder: Path) -> int | None:
    """The pid in a simulator folder's owner file (None if unreadable)."""
    try:
        return int((folder / OWNER_FILE).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def test_two_sites_never_hold_more_than_one_model_in_tmpfs(make_job, tmp_path):
    folder = make_job(name="tmpfs", numel=NUMEL, framework="pytorch", rounds=2).export_job(tmp_path / "export")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fl", "simulate", str(folder), "-w", str(tmp_path / "ws")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    sampler = TreeTmpfsSampler(proc)
    output, _ = proc.communicate(timeout=540)
    sampler.thread.join(10)
    assert proc.returncode == 0, output[-4000:]
    assert "model shared with another site of this host" in output, output[-4000:]
    model_bytes = NUMEL * 4
    assert sampler.nonzero > 0, f"the sampler never saw a model in tmpfs ({sampler.samples} samples)"
    assert sampler.peak <= model_bytes + HEADER_SLACK, (
        f"peak tmpfs bytes {sampler.peak} for a {model_bytes}-byte model and 2 sites "
        f"({sampler.peak / model_bytes:.2f}x, {sampler.samples} samples)"
    )
    model = torch.load(run_dir(tmp_path / "ws") / "FL_global_model.pt", weights_only=True)["model"]
    assert torch.equal(model["weight"], torch.full((NUMEL,), 2.0))  # two rounds of params + 1, exact
    assert sampler.folders, "the sampler never saw the run's folder in /dev/shm"
    assert not [f for f in sampler.folders if f.exists()], "the run left its folder in /dev/shm"
