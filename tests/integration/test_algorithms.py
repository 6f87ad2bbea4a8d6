"""Each server-side algorithm runs a small job to completion in the simulator (real server, agents, scripts).

The fixture job's sites return the model they received plus one, so every round's pseudo-gradient
is 1 everywhere and the final model follows the optimizer's numpy reference exactly (within
float32 rounding: rtol 1e-6).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch

from fl.simulator import simulate
from fl.tensors import load_numpy
from fl.workflows.cyclic import Cyclic
from fl.workflows.dp_strategies import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
)
from fl.workflows.engine import RoundEngine
from fl.workflows.fedopt import FedAdagrad, FedAdam, FedAvgM, FedOpt, FedYogi
from fl.workflows.robust_strategies import FedMedian
from fl.workflows.scaffold import Scaffold
from tests.integration.conftest import run_dir
from tests.unit.test_fedopt import Reference, adam_like, momentum

ROUNDS = 3
ARGS = {"num_clients": 2, "num_rounds": ROUNDS, "round_timeout": 120.0}
CASES: dict[str, tuple[Callable[[], RoundEngine], Reference]] = {
    "FedAvgM": (lambda: FedAvgM(server_momentum=0.5, **ARGS), momentum(lambda r: 1.0, 0.5)),
    "FedAdam": (lambda: FedAdam(**ARGS), adam_like(0.1, 0.9, 0.99, 1e-9, "adam")),
    "FedYogi": (lambda: FedYogi(**ARGS), adam_like(1e-2, 0.9, 0.99, 1e-3, "yogi")),
    "FedAdagrad": (lambda: FedAdagrad(**ARGS), adam_like(0.1, 0.0, 0.0, 1e-9, "adagrad")),
    "FedOpt": (lambda: FedOpt(**ARGS), momentum(lambda r: 0.9 + 0.1 * (1 + math.cos(math.pi * r / 3)) / 2, 0.6)),
}


def expected(step: Reference) -> float:
    """The final value of every weight: sites add 1, so each round's delta is 1."""
    x, moments = np.zeros(1), {"m": np.zeros(1), "v": np.zeros(1)}
    for rnd in range(ROUNDS):
        x = x + step(rnd, np.ones(1), moments)
    return float(x[0])


@pytest.mark.parametrize("name", sorted(CASES))
def test_algorithm_runs_a_job_to_completion_in_the_simulator(name, make_job, tmp_path):
    make, step = CASES[name]
    job = make_job(rounds=ROUNDS, workflow=make())
    assert simulate(job.export_job(tmp_path / "export"), tmp_path / "ws", progress=False) == 0
    folder = run_dir(tmp_path / "ws")
    final = torch.load(folder / "FL_global_model.pt", weights_only=True)["model"]["weight"]
    np.testing.assert_allclose(final.numpy(), np.full(16, expected(step)), rtol=1e-6)
    assert (folder / "models" / f"strategy-r{ROUNDS:04d}.safetensors").exists()  # the moments, resumable


def test_cyclic_runs_a_job_to_completion_in_the_simulator(make_job, tmp_path):
    job = make_job(rounds=ROUNDS, workflow=Cyclic(order="random", **ARGS))
    assert simulate(job.export_job(tmp_path / "export"), tmp_path / "ws", progress=False) == 0
    final = torch.load(run_dir(tmp_path / "ws") / "FL_global_model.pt", weights_only=True)["model"]["weight"]
    assert torch.equal(final, torch.full((16,), 2.0 * ROUNDS))  # each of 2 sites adds 1, in turn, every round


def test_fedmedian_runs_a_job_to_completion_in_the_simulator(make_job, tmp_path):
    job = make_job(rounds=ROUNDS, workflow=FedMedian(**ARGS))
    assert simulate(job.export_job(tmp_path / "export"), tmp_path / "ws", progress=False) == 0
    folder = run_dir(tmp_path / "ws")
    final = torch.load(folder / "FL_global_model.pt", weights_only=True)["model"]["weight"]
    assert torch.equal(final, torch.full((16,), float(ROUNDS)))  # the median of two "model + 1" updates
    assert not (folder / "models" / "spool").exists()  # the round's update files are gone


@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed", "adaptive"])
def test_a_dp_job_runs_to_completion_in_the_simulator_and_logs_its_epsilon(adaptive, make_job, tmp_path, caplog):
    dp_args = {"noise_multiplier": 0.5, "num_sampled_clients": 2, **ARGS}
    workflow = (
        DifferentialPrivacyServerSideAdaptiveClipping(initial_clipping_norm=2.0, clipped_count_stddev=1.0, **dp_args)
        if adaptive
        else DifferentialPrivacyServerSideFixedClipping(clipping_norm=2.0, **dp_args)
    )
    job = make_job(rounds=ROUNDS, workflow=workflow)
    fl_logger = logging.getLogger("fl")  # it does not propagate to the root logger caplog listens on
    fl_logger.addHandler(caplog.handler)
    try:
        assert simulate(job.export_job(tmp_path / "export"), tmp_path / "ws", progress=False) == 0
    finally:
        fl_logger.removeHandler(caplog.handler)
    folder = run_dir(tmp_path / "ws")
    final = torch.load(folder / "FL_global_model.pt", weights_only=True)["model"]["weight"]
    assert not torch.equal(final, torch.full((16,), float(ROUNDS)))  # noised
    # each round's delta (1 on 16 elements: norm 4) is clipped to norm 2 (0.5 each; adaptive: about 2), plus noise
    assert 0.5 * ROUNDS - 0.7 < float(final.mean()) < ROUNDS - 0.3
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "differential privacy (the job): noise_multiplier=0.5" in text
    assert f"rounds={ROUNDS}" in text and "epsilon=" in text


def test_a_scaffold_job_with_the_site_helper_runs_to_completion_in_the_simulator(make_job, tmp_path):
    job = make_job(rounds=ROUNDS, workflow=Scaffold(**ARGS), script="src/scaffold_train.py")
    assert simulate(job.export_job(tmp_path / "export"), tmp_path / "ws", progress=False) == 0
    folder = run_dir(tmp_path / "ws")
    final = torch.load(folder / "FL_global_model.pt", weights_only=True)["model"]
    assert set(final) == {"weight"}  # the checkpoint holds the model, not the controls
    # site-1 pulls toward 1, site-2 toward 3: the global model heads for their common optimum, 2
    assert 1.0 < float(final["weight"].mean()) < 2.5
    controls = load_numpy(folder / "models" / f"strategy-r{ROUNDS:04d}.safetensors")
    assert set(controls) == {"scaffold_c_global.weight"}
    assert float(np.abs(controls["scaffold_c_global.weight"]).max()) > 0  # the sites' control changes arrived
    assert not list((folder / "models").glob("task-r*.safetensors"))  # each round's task file is gone
