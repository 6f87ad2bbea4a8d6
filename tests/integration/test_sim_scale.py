"""The simulator holds many sites: 200 idle sites register and cost a bounded amount each (measured from the
tree's PSS against one site's, not a timing), with no thread per site; FedAvg samples num_clients of them a round."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fl.fsutil import read_json
from fl.simulator_memory import IDLE_SITE_BYTES, MiB
from fl.workflows.fedavg import FedAvg
from tests.integration.conftest import run_dir

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(900)


def idle_sites(*counts: int) -> list[dict[str, Any]]:
    """``bench.sim_idle``'s figures (a fresh process per count: its tree is what is measured)."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.sim_idle", *map(str, counts), "--idle", "5"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=800,
        check=True,
    )
    figures = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [f.get("sites") for f in figures] == list(counts), out.stdout + out.stderr[-3000:]
    for f in figures:
        assert "error" not in f, f["error"]
    return figures


def test_200_idle_sites_register_and_each_costs_less_than_the_estimate_counts():
    one, many = idle_sites(1, 200)
    assert many["connected_after_idle"] == 200
    per_site = (many["pss_mib"] - one["pss_mib"]) * MiB / 199
    assert per_site <= IDLE_SITE_BYTES, (
        f"an idle site costs {per_site / MiB:.2f} MiB of PSS (tree {one['pss_mib']} MiB with 1 site, "
        f"{many['pss_mib']} MiB with 200); the memory estimate counts {IDLE_SITE_BYTES / MiB:g} MiB"
    )
    # No thread per site in the sites hosts: the server holds one per long poll, the hosts a few each.
    assert many["threads"] - 200 < 200, f"{many['threads']} threads for 200 idle sites"


def test_fedavg_samples_num_clients_of_8_sites_each_round_and_the_run_records_them(make_job, tmp_path):
    seed, rounds = 11, 3
    sites = [f"site-{i}" for i in range(1, 9)]
    expected = [FedAvg(num_clients=2, num_rounds=rounds, seed=seed).sample_sites(sites, r) for r in range(rounds)]
    assert len({tuple(e) for e in expected}) > 1  # the seed is one whose rounds differ
    workflow = FedAvg(num_clients=2, num_rounds=rounds, min_clients=2, seed=seed, round_timeout=300.0)
    job = make_job(sites=8, rounds=rounds, min_clients=2, workflow=workflow)
    folder = job.export_job(tmp_path / "export")
    workspace = tmp_path / "ws"
    proc = subprocess.run(
        [sys.executable, "-m", "fl", "simulate", str(folder), "-w", str(workspace), "-n", "8", "--job-timeout", "600"],
        capture_output=True,
        text=True,
        timeout=800,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    sampled = [m.split(", ") for m in re.findall(r"round \d+/3: sampled 2 of 8 sites: ([\w, -]+)", output)]
    assert sampled == expected, output[-4000:]
    job_dir = run_dir(workspace)
    status = read_json(job_dir / "status.json")
    assert status["summary"]["round_sites"] and set(status["summary"]["round_sites"]) <= set(sites)
    trained = {s for s in sites if "task train" in (job_dir / "logs" / f"{s}.log").read_text(errors="replace")}
    assert trained == {s for r in expected for s in r}, "sites that were not sampled trained, or sampled ones did not"
