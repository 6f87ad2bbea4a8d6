"""FedAvgM, FedAdam, FedYogi, FedAdagrad and FLARE's FedOpt against a plain numpy reference on fake sites.

The engine averages in float32 with a running mean; the reference averages in float64 with a plain
weighted sum, so models agree within rtol 1e-5 / atol 1e-6 (float32 rounding of values near 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fl.config import ConfigError, instantiate
from fl.tensors import load_numpy
from fl.workflows.base import RoundFailed
from fl.workflows.engine import RoundEngine
from fl.workflows.fedavg import FedAvg
from fl.workflows.fedopt import FedAdagrad, FedAdam, FedAvgM, FedOpt, FedYogi
from tests.unit.test_fedavg import Context, FakePersistor

SHAPE = (3, 4)
SITES = {"a": (0.9, 0.05, 1), "b": (1.1, -0.02, 3), "c": (1.0, 0.08, 2)}  # site: (scale, shift, weight)
Reference = Callable[[int, np.ndarray, dict[str, np.ndarray]], np.ndarray]


def initial() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {"w": rng.normal(size=SHAPE).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}


def site_update(name: str, rnd: int, model: np.ndarray) -> np.ndarray:
    """What fake site ``name`` returns in round ``rnd`` for ``model`` (same in the engine and the reference)."""
    scale, shift, _ = SITES[name]
    return model * scale + shift * (rnd + 1)


def make_site(name: str) -> Any:
    def site(task: Any, model: dict[str, np.ndarray]) -> Any:
        update = {k: site_update(name, task.round, v.astype(np.float64)).astype(np.float32) for k, v in model.items()}
        return update, {}, {"NUM_STEPS_CURRENT_ROUND": SITES[name][2]}

    return site


def run_engine(engine: RoundEngine, run_dir: Path) -> dict[str, np.ndarray]:
    ctx = Context(run_dir, {name: make_site(name) for name in SITES}, {"persistor": FakePersistor(initial())})
    engine.run(ctx)
    assert ctx.state is not None
    return load_numpy(run_dir / "models" / ctx.state["model_file"])


def reference_run(step: Reference, rounds: int) -> dict[str, np.ndarray]:
    """Plain numpy FedOpt: average the sites' updates, then ``x += step(rnd, delta, moments)``."""
    out = {}
    for key, value in initial().items():
        x = value.astype(np.float64)
        moments: dict[str, np.ndarray] = {"m": np.zeros_like(x), "v": np.zeros_like(x)}
        for rnd in range(rounds):
            total = sum(w for _, _, w in SITES.values())
            average = sum(
                site_update(n, rnd, x.astype(np.float32).astype(np.float64)) * w for n, (_, _, w) in SITES.items()
            )
            x = x + step(rnd, average / total - x, moments)
        out[key] = x
    return out


def adam_like(eta: float, b1: float, b2: float, tau: float, second: str) -> Reference:
    def step(rnd: int, delta: np.ndarray, mo: dict[str, np.ndarray]) -> np.ndarray:
        mo["m"] = b1 * mo["m"] + (1 - b1) * delta
        d2 = delta**2
        if second == "adam":
            mo["v"] = b2 * mo["v"] + (1 - b2) * d2
        elif second == "yogi":
            mo["v"] = mo["v"] - (1 - b2) * d2 * np.sign(mo["v"] - d2)
        else:
            mo["v"] = mo["v"] + d2
        return eta * mo["m"] / (np.sqrt(mo["v"]) + tau)

    return step


def momentum(lr: Callable[[int], float], beta: float) -> Reference:
    def step(rnd: int, delta: np.ndarray, mo: dict[str, np.ndarray]) -> np.ndarray:
        mo["m"] = beta * mo["m"] + delta
        return lr(rnd) * mo["m"]

    return step


CASES: dict[str, tuple[Callable[[], RoundEngine], Reference]] = {
    "FedAvgM": (
        lambda: FedAvgM(num_clients=3, num_rounds=4, server_learning_rate=0.8, server_momentum=0.9),
        momentum(lambda r: 0.8, 0.9),
    ),
    "FedAvgM-no-momentum": (lambda: FedAvgM(num_clients=3, num_rounds=4), momentum(lambda r: 1.0, 0.0)),
    "FedAdam": (lambda: FedAdam(num_clients=3, num_rounds=4), adam_like(0.1, 0.9, 0.99, 1e-9, "adam")),
    "FedYogi": (lambda: FedYogi(num_clients=3, num_rounds=4), adam_like(1e-2, 0.9, 0.99, 1e-3, "yogi")),
    "FedAdagrad": (lambda: FedAdagrad(num_clients=3, num_rounds=4), adam_like(0.1, 0.0, 0.0, 1e-9, "adagrad")),
    "FedOpt-FLARE-defaults": (
        lambda: FedOpt(num_clients=3, num_rounds=4),
        momentum(lambda r: 0.9 + 0.1 * (1 + math.cos(math.pi * r / 3)) / 2, 0.6),
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_server_optimizer_matches_the_numpy_reference(name, tmp_path):
    make, step = CASES[name]
    got = run_engine(make(), tmp_path)
    want = reference_run(step, 4)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6)


def test_fedavgm_without_momentum_is_fedavg(tmp_path):
    fedavg = run_engine(FedAvg(num_clients=3, num_rounds=3), tmp_path / "avg")
    fedavgm = run_engine(FedAvgM(num_clients=3, num_rounds=3), tmp_path / "avgm")
    for key in fedavg:
        np.testing.assert_allclose(fedavgm[key], fedavg[key], rtol=1e-6, atol=1e-7)


def test_adaptive_optimizers_send_the_site_learning_rate():
    assert FedYogi().train_meta(0) == {"eta_l": 0.0316}
    assert FedAvgM().train_meta(0) == {}


def test_moments_are_saved_as_safetensors_next_to_the_model(tmp_path):
    ctx = Context(tmp_path, {n: make_site(n) for n in SITES}, {"persistor": FakePersistor(initial())})
    FedAdam(num_clients=3, num_rounds=2).run(ctx)
    assert ctx.state is not None and ctx.state["strategy_file"] == "strategy-r0002.safetensors"
    saved = load_numpy(tmp_path / "models" / "strategy-r0002.safetensors")
    assert sorted(saved) == ["m:b", "m:w", "v:b", "v:w"]
    assert all(a.dtype == np.float32 for a in saved.values())
    assert not (tmp_path / "models" / "strategy-r0001.safetensors").exists()  # superseded state dropped


def test_a_non_finite_server_step_is_refused_and_not_written(tmp_path):
    ctx = Context(tmp_path, {n: make_site(n) for n in SITES}, {"persistor": FakePersistor(initial())})
    with pytest.raises(RoundFailed, match="round 1: FedAvgM's server step is not finite"):
        FedAvgM(num_clients=3, num_rounds=1, server_learning_rate=1e6, server_momentum=1.0).run(_huge(ctx, tmp_path))
    assert not (tmp_path / "models" / "global-r0001.safetensors").exists()


def _huge(ctx: Context, run_dir: Path) -> Context:
    """``ctx`` whose initial model is near float32's largest value, so the server step overflows."""
    ctx.components["persistor"] = FakePersistor({"w": np.full(4, 3e38, np.float32)})
    for name in ctx.communicator.sites:
        ctx.communicator.sites[name] = lambda task, model: ({"w": model["w"] * 0.5}, {}, {})
    return ctx


@pytest.mark.parametrize(
    ("cls", "args", "message"),
    [
        (FedAdam, {"beta_1": 1.5}, r"FedAdam: beta_1 must be a number in \[0, 1\], got 1.5"),
        (FedYogi, {"tau": 0}, r"FedYogi: tau must be a number in \(0, 1e\+06\], got 0"),
        (FedAvgM, {"server_momentum": True}, "FedAvgM: server_momentum must be a number"),
        (FedOpt, {"optimizer_args": {"path": "torch.optim.Adam"}}, "optimizer_args path 'torch.optim.Adam' is not"),
        (
            FedOpt,
            {"optimizer_args": {"path": "torch.optim.SGD", "args": {"lr": 1, "nesterov": True}}},
            r"unsupported arguments \['nesterov'\]",
        ),
    ],
)
def test_bad_hyperparameters_are_refused_naming_the_value(cls, args, message):
    with pytest.raises(ValueError, match=message):
        cls(**args)


def test_config_export_and_flare_path_use_the_algorithms_own_arguments():
    algo = FedAdam(num_clients=3, num_rounds=2, eta=0.05)
    assert algo._init_args == {"num_clients": 3, "num_rounds": 2, "eta": 0.05}
    flare = instantiate(
        {
            "path": "nvflare.app_opt.pt.fedopt_ctl.FedOpt",
            "args": {
                "num_clients": 2,
                "num_rounds": 3,
                "source_model": "model",
                "optimizer_args": {"path": "torch.optim.SGD", "args": {"lr": 0.5, "momentum": 0.9}},
                "lr_scheduler_args": {},
            },
        }
    )
    assert isinstance(flare, FedOpt)
    assert (flare.server_learning_rate, flare.server_momentum, flare.schedule) == (0.5, 0.9, None)
    with pytest.raises(ConfigError, match=r"unexpected keyword argument 'etaa'.*accepted arguments: eta, eta_l"):
        instantiate({"path": "fl.workflows.fedopt.FedAdam", "args": {"etaa": 1}})
