"""Aggregation one site cannot poison: absurd weight claims are refused, the global model stays finite.

Every site here is an :class:`~tests.integration.adversary.Adversary` holding that site's real
certificate, so the test knows exactly what each site sent and can compare the global models the
server hands out (and saves) with numpy's average of the honest updates.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fl.tensors import load_numpy, write_tensors
from tests.integration.adversary import Adversary
from tests.integration.federation import Federation, wait_for

pytestmark = pytest.mark.timeout(300)
NUMEL = 16
TOP = float(np.finfo(np.float32).max)
SITES = ["site-1", "site-2", "site-3"]


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    # The adversaries poll only when they act: a long timeout keeps them from being declared lost.
    fed = Federation(tmp_path, SITES, heartbeat_timeout=300)
    yield fed
    fed.stop()


def _start(
    fed: Federation, tmp_path: Path, make_job: Any, rounds: int, min_clients: int
) -> tuple[list[Adversary], str]:
    fed.start_server()
    sites = [Adversary(fed, name) for name in SITES]
    for site in sites:
        site.register()
    job = make_job(sites=len(SITES), rounds=rounds, min_clients=min_clients)
    job_id = json.loads(fed.fl("submit", str(job.export_job(tmp_path / "export")), "--json").stdout)["job_id"]
    return sites, job_id


def _received_model(site: Adversary, task: Any, tmp_path: Path) -> np.ndarray:
    """The global model the server sent ``site`` with ``task``."""
    path = tmp_path / f"{site.name}-received.safetensors"
    path.write_bytes(site.download(task.model))
    return load_numpy(path)["weight"]


def _send(site: Adversary, task: Any, values: Sequence[float], meta: dict[str, Any], tmp_path: Path, **kw: Any) -> Any:
    """Upload ``values`` as ``site``'s result of ``task`` and submit it with ``meta``; returns the reply."""
    path = tmp_path / f"{site.name}-update.safetensors"
    write_tensors(path, {"weight": np.asarray(values, np.float32)})
    upload_id, reply = site.upload(task, path.read_bytes())
    assert reply.complete
    return site.submit(task, upload_id=upload_id, meta=meta, **kw)


def _saved_global(fed: Federation, job_id: str, out: Path) -> np.ndarray:
    proc = fed.fl("download", job_id, "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    return torch.load(out / "FL_global_model.pt", weights_only=True)["model"]["weight"].numpy()


def _average(updates: Sequence[tuple[np.ndarray, float]]) -> np.ndarray:
    """The reference: numpy's float64 weighted average, in float32."""
    total = sum(w for _, w in updates)
    return (sum(np.asarray(v, np.float64) * w for v, w in updates) / total).astype(np.float32)


def test_absurd_weight_claims_are_refused_naming_the_site_and_the_honest_average_is_exact(
    federation, tmp_path, make_job
):
    claims: list[Any] = [1e30, -5, "NaN", float("nan"), "abc", True]
    shown = ["1e+30", "-5", "'NaN'", "nan", "'abc'", "True"]
    fed = federation
    (honest_1, honest_2, attacker), job_id = _start(fed, tmp_path, make_job, rounds=len(claims), min_clients=2)
    rng = np.random.default_rng(9)
    expected = np.zeros(NUMEL, np.float32)
    for rnd, claim in enumerate(claims):
        tasks = {site.name: site.poll_for("task") for site in (honest_1, honest_2, attacker)}
        for site in (honest_1, honest_2, attacker):
            np.testing.assert_array_equal(_received_model(site, tasks[site.name], tmp_path), expected)
        # Integer values and weights 3 and 1: the float32 average is exact, so equality is the test.
        sent_1 = rng.integers(-1000, 1000, NUMEL).astype(np.float32)
        sent_2 = rng.integers(-1000, 1000, NUMEL).astype(np.float32)
        assert _send(honest_1, tasks["site-1"], sent_1, {"NUM_STEPS_CURRENT_ROUND": 3}, tmp_path).accepted
        refused = _send(attacker, tasks["site-3"], np.full(NUMEL, 1e6), {"NUM_STEPS_CURRENT_ROUND": claim}, tmp_path)
        assert not refused.accepted, f"round {rnd + 1}: claim {claim!r} was accepted"
        assert f"site-3 claimed NUM_STEPS_CURRENT_ROUND={shown[rnd]}: " in refused.message, refused.message
        assert "at most 1e+09" in refused.message
        assert _send(honest_2, tasks["site-2"], sent_2, {"NUM_STEPS_CURRENT_ROUND": 1}, tmp_path).accepted
        expected = _average([(sent_1, 3.0), (sent_2, 1.0)])
    final = wait_for(lambda: (j := fed.job(job_id))["status"] in ("finished", "failed") and j, 120, "the job to end")
    assert final["status"] == "finished", final["message"]
    np.testing.assert_array_equal(_saved_global(fed, job_id, tmp_path / "out"), expected)
    assert fed.server is not None and "site-3 claimed NUM_STEPS_CURRENT_ROUND=1e+30" in fed.server.log()
    for site in (honest_1, honest_2, attacker):
        site.close()


def test_updates_near_the_float32_maximum_never_make_a_non_finite_global_model(federation, tmp_path, make_job):
    fed = federation
    sites, job_id = _start(fed, tmp_path, make_job, rounds=2, min_clients=2)
    # Per element (column), what the three sites send: sums of these overflow float32.
    sent = np.array([[TOP, TOP, TOP, -TOP, 1.0], [TOP, TOP, -TOP, -TOP, 2.0], [TOP, -TOP, TOP, -TOP, 3.0]])
    sent = np.pad(sent, ((0, 0), (0, NUMEL - sent.shape[1])), constant_values=TOP)
    weights = [1e9, 1.0, 1.0]  # the largest claim allowed, and two small ones
    tasks = [site.poll_for("task") for site in sites]
    for site, task, values, weight in zip(sites, tasks, sent, weights, strict=True):
        assert _send(site, task, values, {"NUM_STEPS_CURRENT_ROUND": weight}, tmp_path).accepted
    expected = _average(list(zip(sent, weights, strict=True)))
    assert np.isfinite(expected).all()

    # Round 2: the global model came out finite and right.
    tasks = [site.poll_for("task") for site in sites]
    received = _received_model(sites[0], tasks[0], tmp_path)
    assert np.isfinite(received).all(), received
    np.testing.assert_allclose(received, expected, rtol=1e-6)
    # A DIFF update of +max on a global model at max is finite as sent but overflows once added to
    # the global model: that one result is refused, the round completes with the honest sites.
    honest = [np.full(NUMEL, 2.0, np.float32), np.full(NUMEL, 4.0, np.float32)]
    for site, task, values in zip(sites[:2], tasks[:2], honest, strict=True):
        assert _send(site, task, values, {"NUM_STEPS_CURRENT_ROUND": 1}, tmp_path).accepted
    refused = _send(sites[2], tasks[2], np.full(NUMEL, TOP), {}, tmp_path, params_type="DIFF")
    assert not refused.accepted
    assert "the DIFF update is not finite once added to the global model" in refused.message, refused.message
    final = wait_for(lambda: (j := fed.job(job_id))["status"] in ("finished", "failed") and j, 120, "the job to end")
    assert final["status"] == "finished", final["message"]
    assert fed.server is not None and "site-3: result refused: tensor 'weight': the DIFF update" in fed.server.log()
    saved = _saved_global(fed, job_id, tmp_path / "out")
    np.testing.assert_array_equal(saved, np.full(NUMEL, 3.0, np.float32))  # the honest average, exactly
    for site in sites:
        site.close()
