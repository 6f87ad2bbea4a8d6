"""The round engine's public strategy hooks: check_result refuses before the fold, results_in sees each round."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fl.tensors import load_numpy
from fl.workflows.base import TaskResult
from fl.workflows.engine import RoundEngine
from fl.workflows.resume import RoundState
from tests.unit.test_fedavg import Context, FakePersistor, Site, plus_one


def plus(value: float) -> Site:
    def site(task, model):
        if task.name == "validate":
            return None, {}, {}
        return {k: v + value for k, v in model.items()}, {}, {}

    return site


class RefusesLargeSteps(RoundEngine):
    """A strategy written only against the public hooks: refuses values above 50, notes each round's results."""

    def __init__(self, **engine_args: Any) -> None:
        super().__init__(**engine_args)
        self.noted: list[tuple[int, list[str], list[str]]] = []

    def check_result(self, result: TaskResult) -> None:
        assert result.params_path is not None
        if float(np.abs(load_numpy(result.params_path)["w"]).max()) > 50:
            raise ValueError(f"{result.site}: update too large")

    def results_in(self, rnd: int, results: Sequence[TaskResult], sites: Sequence[str]) -> None:
        self.noted.append((rnd, sorted(r.site for r in results), list(sites)))


def test_check_result_refuses_a_result_before_it_reaches_the_average(tmp_path):
    ctx = Context(
        tmp_path,
        {"a": plus(1.0), "b": plus(1.0), "evil": plus(100.0)},
        {"persistor": FakePersistor({"w": np.zeros(4, np.float32)})},
    )
    strategy = RefusesLargeSteps(num_clients=3, min_clients=2, num_rounds=2)
    strategy.run(ctx)
    final = load_numpy(tmp_path / "models" / "global-r0002.safetensors")
    np.testing.assert_array_equal(final["w"], np.full(4, 2.0, np.float32))  # evil's +100 never folded
    assert strategy.noted == [(0, ["a", "b"], ["a", "b", "evil"]), (1, ["a", "b"], ["a", "b", "evil"])]


def test_the_saved_round_state_is_the_json_engine_jobs_always_saved(tmp_path):
    ctx = Context(tmp_path, {"a": plus_one()}, {"persistor": FakePersistor({"w": np.zeros(2, np.float32)})})
    RoundEngine(num_clients=1, num_rounds=1).run(ctx)
    assert ctx.state == {"next_round": 1, "model_file": "global-r0001.safetensors", "sites_report_metrics": True}
    state = RoundState.load(ctx, start_round=0)
    assert state == RoundState(1, tmp_path / "models" / "global-r0001.safetensors", None, True) and state.resumed
    ctx.state = None
    assert RoundState.load(ctx, start_round=3) == RoundState(3) and not RoundState(3).resumed
