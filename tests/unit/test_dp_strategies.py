"""Server-side DP strategies on the round engine against a plain numpy computation of clip, average, noise, adapt."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest

from fl.tensors import load_numpy
from fl.workflows.dp_strategies import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
)
from tests.unit.test_fedavg import Context, FakePersistor

# Each site adds its own delta; their L2 norms are 0.5, 2.0, 10.0 (one inside small norms, two beyond).
DELTAS = {
    "a": np.array([0.3, 0.4, 0.0, 0.0], np.float32),
    "b": np.array([0.0, 0.0, 2.0, 0.0], np.float32),
    "c": np.array([6.0, 0.0, 0.0, -8.0], np.float32),
}
STEPS = {"a": 1, "b": 5, "c": 1000}  # claimed weights: ignored (uniform averaging)
ROUNDS = 3


def site(name: str) -> Any:
    return lambda task, model: ({"w": model["w"] + DELTAS[name]}, {}, {"NUM_STEPS_CURRENT_ROUND": STEPS[name]})


def run(engine: Any, tmp_path: Any, seed: int) -> np.ndarray:
    engine._rng = np.random.default_rng(seed)
    ctx = Context(tmp_path, {n: site(n) for n in DELTAS}, {"persistor": FakePersistor({"w": np.zeros(4, np.float32)})})
    engine.run(ctx)
    assert ctx.state is not None
    return load_numpy(tmp_path / "models" / ctx.state["model_file"])["w"]


def reference(seed: int, z: float, norm: float, *, adaptive: dict[str, float] | None = None) -> np.ndarray:
    """Clip each delta to ``norm``, average uniformly, add N(0, (z * norm / n)^2); adapt the norm (Andrew et al.)."""
    rng = np.random.default_rng(seed)
    x = np.zeros(4, np.float64)
    n = len(DELTAS)
    for _ in range(ROUNDS):
        deltas = [d.astype(np.float64) for d in DELTAS.values()]
        norms = [float(np.linalg.norm(d)) for d in deltas]
        clipped = [d * min(1.0, norm / m) for d, m in zip(deltas, norms, strict=True)]
        model_z = z
        if adaptive is not None and adaptive["stddev"] > 0:
            model_z = (z**-2 - (2 * adaptive["stddev"]) ** -2) ** -0.5
        x = x + np.mean(clipped, axis=0) + rng.normal(0.0, model_z * norm / n, 4).astype(np.float32)
        if adaptive is not None:
            unclipped = sum(m <= norm for m in norms) + rng.normal(0.0, adaptive["stddev"])
            norm *= float(np.exp(-adaptive["lr"] * (unclipped / n - adaptive["quantile"])))
    return x


def test_fixed_clipping_matches_numpy_clip_uniform_average_and_noise(tmp_path):
    dp = DifferentialPrivacyServerSideFixedClipping(
        noise_multiplier=0.8, clipping_norm=1.5, num_sampled_clients=3, num_clients=3, num_rounds=ROUNDS
    )
    np.testing.assert_allclose(run(dp, tmp_path, seed=7), reference(7, 0.8, 1.5), rtol=1e-5, atol=1e-6)


def test_adaptive_clipping_matches_numpy_including_the_norm_update(tmp_path):
    dp = DifferentialPrivacyServerSideAdaptiveClipping(
        noise_multiplier=0.5,
        num_sampled_clients=3,
        initial_clipping_norm=1.0,
        target_clipped_quantile=0.5,
        clip_norm_lr=0.2,
        clipped_count_stddev=1.0,
        num_clients=3,
        num_rounds=ROUNDS,
    )
    want = reference(11, 0.5, 1.0, adaptive={"stddev": 1.0, "lr": 0.2, "quantile": 0.5})
    np.testing.assert_allclose(run(dp, tmp_path, seed=11), want, rtol=1e-5, atol=1e-6)
    assert dp.clipping.clipping_norm != 1.0  # it moved


def test_without_noise_the_outlier_moves_the_model_at_most_the_clipping_norm_over_n(tmp_path):
    dp = DifferentialPrivacyServerSideFixedClipping(
        noise_multiplier=0.0, clipping_norm=1.0, num_sampled_clients=3, num_clients=3, num_rounds=1
    )
    got = run(dp, tmp_path, seed=0)
    np.testing.assert_allclose(got, reference(0, 0.0, 1.0)[:4] / ROUNDS, rtol=1e-6)
    assert np.linalg.norm(got) <= 1.0 + 1e-6


def test_each_round_and_the_job_log_the_noise_multiplier_and_epsilon(tmp_path, caplog):
    dp = DifferentialPrivacyServerSideFixedClipping(
        noise_multiplier=1.0, clipping_norm=1.0, num_sampled_clients=3, num_clients=3, num_rounds=2
    )
    with caplog.at_level(logging.INFO, logger="fl.test"):
        run(dp, tmp_path, seed=1)
    lines = [r.getMessage() for r in caplog.records if "differential privacy" in r.getMessage()]
    assert len(lines) == 3, lines
    assert all("noise_multiplier=1" in line and "epsilon=" in line for line in lines)
    assert "(the job)" in lines[-1] and "rounds=2" in lines[-1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"noise_multiplier": -1.0, "clipping_norm": 1.0, "num_sampled_clients": 2}, "noise_multiplier must be"),
        ({"noise_multiplier": 1.0, "clipping_norm": 0.0, "num_sampled_clients": 2}, "clipping_norm must be"),
        ({"noise_multiplier": 1.0, "clipping_norm": 1.0, "num_sampled_clients": 0}, "num_sampled_clients must be"),
        (
            {"noise_multiplier": 1.0, "clipping_norm": 1.0, "num_sampled_clients": 2, "target_delta": 1.0},
            "target_delta must be below 1",
        ),
    ],
)
def test_bad_privacy_arguments_are_refused_naming_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DifferentialPrivacyServerSideFixedClipping(**kwargs)
