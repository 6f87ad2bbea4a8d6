"""Operators' Prometheus metrics: scrape a TLS federation's server and a site during and after a job."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.federation import export_hello_pt, free_port, wait_for

pytestmark = pytest.mark.timeout(600)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """Every sample of ``http://127.0.0.1:PORT/metrics``, by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def test_server_and_site_metrics_move_during_a_job(federation, tmp_path):
    fed = federation
    server_port, site_port = free_port(), free_port()
    fed.start_server("--metrics-port", str(server_port))
    fed.start_site("site-1", extra=("--metrics-port", str(site_port)))
    fed.start_site("site-2")
    fed.wait_sites(["site-1", "site-2"])
    before = scrape(server_port)
    assert total(before, "fl_sites_connected") == 2
    assert total(before, "fl_rounds_completed_total") == 0
    assert total(before, "fl_jobs", state="finished") == 0
    ages = {dict(ls)["site"]: v for (n, ls), v in before.items() if n == "fl_site_last_heartbeat_age_seconds"}
    assert set(ages) == {"site-1", "site-2"} and all(0 <= a < 30 for a in ages.values()), ages

    proc = fed.fl("submit", str(export_hello_pt(tmp_path / "export")), "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = json.loads(proc.stdout)["job_id"]
    seen: list[Samples] = []

    def finished() -> bool:
        seen.append(scrape(server_port))
        return total(seen[-1], "fl_jobs", state="finished") == 1

    wait_for(finished, 300, f"job {job_id} to finish, as the server's metrics tell")
    rounds = [total(s, "fl_rounds_completed_total") for s in seen]
    assert rounds == sorted(rounds) and rounds[-1] == 2, rounds  # hello-pt runs 2 rounds; the counter only rises
    assert any(total(s, "fl_jobs", state="running") == 1 for s in seen), "no scrape saw the job running"
    assert fed.job(job_id)["status"] == "finished"

    after = seen[-1]
    model_bytes = max(p.stat().st_size for p in (tmp_path / "server").rglob("*.safetensors"))
    assert total(after, "fl_round_duration_seconds_count") == 2
    assert total(after, "fl_round_duration_seconds_sum") > 0
    for site in ("site-1", "site-2"):
        assert total(after, "fl_transfer_bytes_total", direction="download", site=site) > model_bytes
        assert total(after, "fl_transfer_bytes_total", direction="upload", site=site) > model_bytes
    assert total(after, "fl_transfer_failures_total") == 0
    assert total(after, "fl_sites_connected") == 2

    site = scrape(site_port)
    assert total(site, "fl_transfer_bytes_total", direction="download") > model_bytes
    assert total(site, "fl_transfer_bytes_total", direction="upload") > model_bytes
    assert total(site, "fl_transfer_failures_total") == 0


def test_a_bad_metrics_port_is_a_usage_error_that_names_it():
    proc = subprocess.run(
        [sys.executable, "-m", "fl", "server", "--workspace", "/nonexistent", "--metrics-port", "99999"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and "'99999' is not a port number" in proc.stderr, proc.stderr


def test_a_metrics_port_in_use_stops_the_daemon_with_an_error_that_names_it(federation, tmp_path):
    fed = federation
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        common = ["--tls", str(fed.tls / "server"), "--metrics-port", str(port), "--metrics-host", "127.0.0.1"]
        server = subprocess.run(
            [sys.executable, "-m", "fl", "server", "--workspace", str(tmp_path / "srv"), "--host", "127.0.0.1",
             "--port", "0", *common],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        site = subprocess.run(
            [sys.executable, "-m", "fl", "site", "--name", "site-1", "--server", fed.address, "--tls",
             str(fed.tls / "site-1"), "--workspace", str(tmp_path / "site"), "--metrics-port", str(port)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    for proc in (server, site):
        assert proc.returncode == 3, proc.stderr
        assert f"cannot serve metrics on 127.0.0.1:{port}" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
