"""SCAFFOLD's server side on the round engine against a plain numpy computation; resume; result layout."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fl.client.scaffold import C_DIFF_PREFIX, C_GLOBAL_PREFIX
from fl.tensors import Layout, load_numpy
from fl.workflows.base import RoundFailed
from fl.workflows.scaffold import Scaffold
from tests.unit.test_fedavg import Context, FakePersistor

# site: (model step k, control step q, claimed weight); a site returns x + k - c and c_diff = q - 0.5 c
SITES = {"a": (0.5, 1.0, 1), "b": (-0.2, 3.0, 3), "c": (1.0, -2.0, 2)}
ROUNDS = 3


def initial() -> dict[str, np.ndarray]:
    return {"w": np.arange(6, dtype=np.float32), "steps": np.array([7], np.int64)}


def site(name: str, fail_in_round: int | None = None) -> Any:
    k, q, weight = SITES[name]

    def answer(task: Any, model: dict[str, np.ndarray]) -> Any:
        if task.round == fail_in_round:
            raise RuntimeError("server stopping")
        assert set(model) == {"w", "steps", C_GLOBAL_PREFIX + "w"}  # controls for float tensors only
        c = model[C_GLOBAL_PREFIX + "w"]
        params = {"w": model["w"] + k - c, "steps": model["steps"], C_DIFF_PREFIX + "w": q - 0.5 * c}
        return params, {}, {"NUM_STEPS_CURRENT_ROUND": weight}

    return answer


def reference(names: list[str], num_sites: int) -> tuple[np.ndarray, np.ndarray]:
    """FedAvg of the params, c += |S| / N * weighted mean(c_diff), in float64."""
    x, c = initial()["w"].astype(np.float64), np.zeros(6)
    weights = np.array([SITES[n][2] for n in names], np.float64)
    for _ in range(ROUNDS):
        xs = [x + SITES[n][0] - c for n in names]
        diffs = [SITES[n][1] - 0.5 * c for n in names]
        x = np.average(xs, axis=0, weights=weights)
        c = c + len(names) / num_sites * np.average(diffs, axis=0, weights=weights)
    return x, c


def run(ctx: Context, **kwargs: Any) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    Scaffold(num_rounds=ROUNDS, **kwargs).run(ctx)
    assert ctx.state is not None
    models = ctx.run_dir / "models"
    return load_numpy(models / ctx.state["model_file"]), load_numpy(models / ctx.state["strategy_file"])


def test_scaffold_matches_numpy_fedavg_of_params_and_the_control_update(tmp_path):
    ctx = Context(tmp_path, {n: site(n) for n in SITES}, {"persistor": FakePersistor(initial())})
    model, state = run(ctx, num_clients=3)
    x, c = reference(sorted(SITES), 3)
    assert set(model) == {"w", "steps"}  # the global model holds no controls
    np.testing.assert_allclose(model["w"], x, rtol=1e-5)
    np.testing.assert_array_equal(model["steps"], [7])
    np.testing.assert_allclose(state[C_GLOBAL_PREFIX + "w"], c, rtol=1e-5)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == sorted(
        [ctx.state["model_file"], ctx.state["strategy_file"]]
    ), "the round's task files (model + controls) are gone"


def test_a_round_of_some_of_the_sites_moves_the_control_by_their_share(tmp_path):
    same = {n: site("b") for n in SITES}  # identical sites: any two of three give the same round
    ctx = Context(tmp_path, same, {"persistor": FakePersistor(initial())})
    _, state = run(ctx, num_clients=2)
    _, c = reference(["b", "b"], 3)
    np.testing.assert_allclose(state[C_GLOBAL_PREFIX + "w"], c, rtol=1e-5)


def test_a_stopped_scaffold_job_resumes_its_controls_to_the_uninterrupted_result(tmp_path):
    whole = Context(tmp_path / "whole", {n: site(n) for n in SITES}, {"persistor": FakePersistor(initial())})
    want, want_state = run(whole, num_clients=3)
    flaky = {n: site(n, fail_in_round=1 if n == "b" else None) for n in SITES}
    stopped = Context(tmp_path / "stopped", flaky, {"persistor": FakePersistor(initial())})
    with pytest.raises(RoundFailed, match="server stopping"):
        run(stopped, num_clients=3)
    stopped.communicator.sites.update({n: site(n) for n in SITES})
    got, got_state = run(stopped, num_clients=3)
    np.testing.assert_array_equal(got["w"], want["w"])
    np.testing.assert_array_equal(got_state[C_GLOBAL_PREFIX + "w"], want_state[C_GLOBAL_PREFIX + "w"])


def test_the_result_layout_is_the_model_plus_a_control_change_per_float_tensor():
    layout = Layout.build([("w", "BF16", (2, 3)), ("b", "F64", (3,)), ("n", "I64", ())])
    got = {s.name: (s.dtype, s.shape) for s in Scaffold().result_layout(layout).tensors}
    assert got == {
        "w": ("BF16", (2, 3)),
        "b": ("F64", (3,)),
        "n": ("I64", ()),
        C_DIFF_PREFIX + "w": ("F32", (2, 3)),  # numpy has no bfloat16: the site sends float32
        C_DIFF_PREFIX + "b": ("F64", (3,)),
    }


def test_saved_controls_that_do_not_fit_the_model_are_refused_naming_the_tensor(tmp_path):
    algo = Scaffold(num_clients=3, num_rounds=1)
    algo.load_strategy_state({C_GLOBAL_PREFIX + "w": np.zeros(5, np.float32)})
    with pytest.raises(ValueError, match=r"saved global control of 'w' has shape \[5\], the model's tensor \[6\]"):
        algo.task_model(0, (tmp_path / "unused.safetensors", None), Layout.build([("w", "F32", (6,))]))


def test_a_diff_result_is_refused_naming_the_site(tmp_path):
    ctx = Context(tmp_path, {n: site(n) for n in SITES}, {"persistor": FakePersistor(initial())})
    original = ctx.communicator.broadcast_and_wait

    def b_sends_a_diff(task: Any, targets: Any, **kwargs: Any) -> Any:
        on_result = kwargs.pop("on_result")

        def mark(result: Any) -> None:
            result.params_type = "DIFF" if result.site == "b" else "FULL"
            on_result(result)

        return original(task, targets, on_result=mark, **kwargs)

    ctx.communicator.broadcast_and_wait = b_sends_a_diff  # type: ignore[method-assign]
    with pytest.raises(RoundFailed, match="b: b sent params_type 'DIFF': Scaffold takes FULL results only"):
        Scaffold(num_clients=3, num_rounds=1).run(ctx)
