"""The non-streaming strategies (FedMedian, FedTrimmedAvg, Krum, MultiKrum) on the engine, against numpy.

Their updates wait on disk until the round closes (streams = False), so these also prove the
engine's spool path: files kept, combined, and gone when the round ends.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from fl.tensors import load_numpy
from fl.workflows.base import RoundFailed
from fl.workflows.engine import RoundEngine
from fl.workflows.robust_strategies import FedMedian, FedTrimmedAvg, Krum, MultiKrum
from tests.unit.test_fedavg import Context, FakePersistor

VALUES = {"a": 1.0, "b": 2.0, "c": 3.5, "d": 4.0, "evil": 1000.0}  # each site adds its value
STEPS = {"a": 1, "b": 1, "c": 2, "d": 1, "evil": 50}


def site(name: str) -> Any:
    return lambda task, model: ({"w": model["w"] + VALUES[name]}, {}, {"NUM_STEPS_CURRENT_ROUND": STEPS[name]})


def run(engine: RoundEngine, tmp_path: Any) -> tuple[np.ndarray, Context]:
    ctx = Context(tmp_path, {n: site(n) for n in VALUES}, {"persistor": FakePersistor({"w": np.zeros(6, np.float32)})})
    engine.run(ctx)
    assert ctx.state is not None
    return load_numpy(tmp_path / "models" / ctx.state["model_file"])["w"], ctx


def krum_choice(points: dict[str, float], f: int, keep: int) -> list[str]:
    """Plain Krum on scalar updates (every element equal): lowest sums of the N - f - 2 nearest squared distances."""
    names = sorted(points)
    nearest = max(1, len(names) - f - 2)
    score = {n: sum(sorted((points[n] - points[o]) ** 2 for o in names if o != n)[:nearest]) for n in names}
    return sorted(names, key=lambda n: score[n])[:keep]


CASES: dict[str, tuple[Callable[[], RoundEngine], Callable[[float], float]]] = {
    "FedMedian": (
        lambda: FedMedian(num_clients=5, num_rounds=2),
        lambda x: float(np.median([x + v for v in VALUES.values()])),
    ),
    "FedTrimmedAvg": (
        lambda: FedTrimmedAvg(num_clients=5, num_rounds=2, beta=0.2),
        lambda x: float(np.mean(sorted(x + v for v in VALUES.values())[1:-1])),
    ),
    "Krum": (
        lambda: Krum(num_clients=5, num_rounds=2, num_malicious_nodes=1),
        lambda x: x + VALUES[krum_choice(VALUES, 1, 1)[0]],
    ),
    "MultiKrum": (
        lambda: MultiKrum(num_clients=5, num_rounds=2, num_malicious_nodes=1, num_nodes_to_select=3),
        lambda x: (
            x
            + sum(VALUES[n] * STEPS[n] for n in krum_choice(VALUES, 1, 3))
            / sum(STEPS[n] for n in krum_choice(VALUES, 1, 3))
        ),
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_robust_strategy_matches_numpy_and_leaves_no_spool(name, tmp_path):
    make, reference = CASES[name]
    got, _ = run(make(), tmp_path)
    want = reference(reference(0.0))
    np.testing.assert_allclose(got, np.full(6, want, np.float32), rtol=1e-6)
    assert abs(want) < 100, "the outlier must not reach the model"
    assert not (tmp_path / "models" / "spool").exists()


def test_a_round_mixing_full_and_diff_results_fails_naming_the_sites(tmp_path):
    ctx = Context(
        tmp_path, {n: site(n) for n in ("a", "b")}, {"persistor": FakePersistor({"w": np.zeros(2, np.float32)})}
    )
    original = ctx.communicator.broadcast_and_wait

    def with_a_diff(task: Any, targets: Any, **kwargs: Any) -> Any:
        on_result = kwargs.pop("on_result")

        def mark(result: Any) -> None:
            if result.site == "b":
                result.params_type = "DIFF"
            on_result(result)

        return original(task, targets, on_result=mark, **kwargs)

    ctx.communicator.broadcast_and_wait = with_a_diff  # type: ignore[method-assign]
    with pytest.raises(
        RoundFailed, match="FedMedian: a round's results must all be FULL or all DIFF, got DIFF: b; FULL: a"
    ):
        FedMedian(num_clients=2, num_rounds=1).run(ctx)


def test_krum_sizes_are_checked_against_min_clients():
    with pytest.raises(ValueError, match=r"MultiKrum: num_nodes_to_select must be an integer in \[1, 3\]"):
        MultiKrum(num_clients=3, num_nodes_to_select=4)
    with pytest.raises(ValueError, match=r"Krum: num_malicious_nodes must be an integer in \[0, 2\]"):
        Krum(num_clients=3, num_malicious_nodes=3)
    with pytest.raises(ValueError, match="FedTrimmedAvg: beta must be"):
        FedTrimmedAvg(beta=0.5)
