"""FedAvg against an in-memory Communicator: no network, fake sites as functions."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fl.components.model_selector import IntimeModelSelector
from fl.components.validation_json import ValidationJsonGenerator
from fl.fsutil import read_json
from fl.log import adapter
from fl.tensors import load_numpy, write_tensors
from fl.workflows.base import RoundFailed, TaskResult, TaskSpec
from fl.workflows.fedavg import FedAvg

Site = Callable[[TaskSpec, dict[str, np.ndarray]], tuple[dict[str, np.ndarray] | None, dict[str, Any], dict[str, Any]]]


class MemoryCommunicator:
    """Runs each target's function on the task's model and hands results to on_result."""

    def __init__(self, sites: dict[str, Site], workdir: Path) -> None:
        self.sites = sites
        self.workdir = workdir
        self.tasks: list[tuple[str, int, list[str]]] = []

    def broadcast_and_wait(self, task, targets: Sequence[str], *, min_responses, timeout, on_result=None):
        self.tasks.append((task.name, task.round, list(targets)))
        model = load_numpy(task.model_path) if task.model_path else {}
        accepted, missing = [], []
        for site in targets:
            try:
                params, metrics, meta = self.sites[site](task, model)
            except Exception as exc:
                missing.append(f"{site}: {exc}")
                continue
            path = None
            if params is not None:
                path = self.workdir / f"{site}-{task.name}-{task.round}.safetensors"
                write_tensors(path, params)
            result = TaskResult(site, f"t{task.round}", meta, metrics, "FULL", path)
            try:
                if on_result is not None:
                    on_result(result)
            except Exception as exc:
                missing.append(f"{site}: {exc}")
                continue
            result.params_path = None
            accepted.append(result)
        if len(accepted) < min_responses:
            raise RoundFailed("; ".join(missing))
        return accepted


class FakePersistor:
    def __init__(self, initial: dict[str, np.ndarray]) -> None:
        self.initial = initial
        self.saved: list[int] = []
        self.best: list[tuple[int, float]] = []
        self.best_global_model_file_name = "best.pt"

    def load_initial(self, ctx):
        path = ctx.run_dir / "models" / "global-r0000.safetensors"
        write_tensors(path, self.initial)
        return path

    def save_global(self, ctx, model_path, *, round, arrays=None):
        self.saved.append(round)

    def save_best(self, ctx, model_path, *, model_version, metric):
        self.best.append((model_version, metric))


class Context:
    def __init__(self, run_dir: Path, sites: dict[str, Site], components: dict[str, Any]) -> None:
        self.job_id = "job-1"
        self.job_name = "test"
        self.run_dir = run_dir
        self.sites = sorted(sites)
        self.communicator = MemoryCommunicator(sites, run_dir)
        self.components = components
        self.log = adapter("fl.test", job="job-1")
        self.abort_event = threading.Event()
        self.events: list[str] = []
        self.state: dict[str, Any] | None = None

    def wait_for_sites(self, count, timeout):
        return self.sites

    def fire(self, event, **data):
        self.events.append(event)
        for component in self.components.values():
            if hasattr(component, "handle_event"):
                component.handle_event(event, data, self)

    def save_state(self, state):
        self.state = dict(state)

    def load_state(self):
        return self.state

    def set_progress(self, **kwargs):
        pass


def plus_one(accuracy: Callable[[int], float] = lambda r: 0.5) -> Site:
    def site(task, model):
        if task.name == "validate":
            return None, {"accuracy": accuracy(task.round)}, {}
        return {k: v + 1 for k, v in model.items()}, {"accuracy": accuracy(task.round)}, {"NUM_STEPS_CURRENT_ROUND": 10}

    return site


def test_fedavg_runs_rounds_and_aggregates(tmp_path):
    persistor = FakePersistor({"w": np.zeros(4, np.float32)})
    ctx = Context(tmp_path, {"a": plus_one(), "b": plus_one()}, {"persistor": persistor})
    FedAvg(num_clients=2, num_rounds=3).run(ctx)
    final = load_numpy(tmp_path / "models" / "global-r0003.safetensors")
    np.testing.assert_array_equal(final["w"], np.full(4, 3.0, np.float32))
    assert persistor.saved == [0, 1, 2]
    assert [t[0] for t in ctx.communicator.tasks] == ["train", "train", "train", "validate"]
    assert ctx.state == {"next_round": 3, "model_file": "global-r0003.safetensors", "sites_report_metrics": True}
    assert not (tmp_path / "models" / "global-r0001.safetensors").exists()  # superseded models are dropped


def test_weights_follow_the_reported_steps(tmp_path):
    def site(value: float, steps: int) -> Site:
        return lambda task, model: ({"w": np.full(2, value, np.float32)}, {}, {"NUM_STEPS_CURRENT_ROUND": steps})

    ctx = Context(
        tmp_path, {"a": site(1.0, 1), "b": site(4.0, 3)}, {"persistor": FakePersistor({"w": np.zeros(2, np.float32)})}
    )
    FedAvg(num_clients=2, num_rounds=1).run(ctx)
    np.testing.assert_allclose(load_numpy(tmp_path / "models" / "global-r0001.safetensors")["w"], [3.25, 3.25])
    assert "validate" not in [t[0] for t in ctx.communicator.tasks]  # sites report no metrics


def test_round_survives_a_failing_site_when_min_clients_is_met(tmp_path):
    def broken(task, model):
        raise RuntimeError("out of memory")

    ctx = Context(
        tmp_path, {"a": plus_one(), "b": broken}, {"persistor": FakePersistor({"w": np.zeros(1, np.float32)})}
    )
    FedAvg(num_clients=2, num_rounds=1, min_clients=1).run(ctx)
    np.testing.assert_array_equal(load_numpy(tmp_path / "models" / "global-r0001.safetensors")["w"], [1.0])


def test_round_fails_naming_the_site_when_min_clients_is_not_met(tmp_path):
    def broken(task, model):
        raise RuntimeError("out of memory")

    ctx = Context(
        tmp_path, {"a": plus_one(), "b": broken}, {"persistor": FakePersistor({"w": np.zeros(1, np.float32)})}
    )
    with pytest.raises(RoundFailed, match="b: out of memory"):
        FedAvg(num_clients=2, num_rounds=1).run(ctx)


def test_a_bad_update_is_refused_and_never_reaches_the_model(tmp_path):
    def wrong_shape(task, model):
        return {"w": np.ones(3, np.float32)}, {}, {}

    ctx = Context(
        tmp_path, {"a": plus_one(), "b": wrong_shape}, {"persistor": FakePersistor({"w": np.zeros(2, np.float32)})}
    )
    FedAvg(num_clients=2, num_rounds=1, min_clients=1).run(ctx)
    np.testing.assert_array_equal(load_numpy(tmp_path / "models" / "global-r0001.safetensors")["w"], [1.0, 1.0])


def test_resume_continues_from_the_saved_round(tmp_path):
    persistor = FakePersistor({"w": np.zeros(1, np.float32)})
    ctx = Context(tmp_path, {"a": plus_one()}, {"persistor": persistor})
    FedAvg(num_clients=1, num_rounds=2).run(ctx)
    # A restarted job with more rounds picks up at round 2 from the saved global model.
    ctx.communicator.tasks.clear()
    FedAvg(num_clients=1, num_rounds=4).run(ctx)
    assert [t[1] for t in ctx.communicator.tasks if t[0] == "train"] == [2, 3]
    np.testing.assert_array_equal(load_numpy(tmp_path / "models" / "global-r0004.safetensors")["w"], [4.0])


def test_selector_and_validation_json_follow_the_key_metric(tmp_path):
    accuracy = {0: 0.1, 1: 0.6, 2: 0.4, 3: 0.7}
    persistor = FakePersistor({"w": np.zeros(1, np.float32)})
    components = {
        "persistor": persistor,
        "model_selector": IntimeModelSelector(key_metric="accuracy"),
        "json_generator": ValidationJsonGenerator(),
    }
    ctx = Context(tmp_path, {"a": plus_one(accuracy.get), "b": plus_one(accuracy.get)}, components)
    FedAvg(num_clients=2, num_rounds=3).run(ctx)
    # Metrics sent in round r evaluate the model the site received: version r; the final validation is version 3.
    assert persistor.best == [(0, 0.1), (1, 0.6), (3, 0.7)]
    doc = read_json(tmp_path / "validation.json")
    assert [m["model_version"] for m in doc["models"]] == [0, 1, 2, 3]
    assert doc["models"][2]["aggregate"]["accuracy"] == pytest.approx(0.4)
    assert read_json(tmp_path / "best_model.json")["model_version"] == 3


logging.getLogger("fl").setLevel(logging.WARNING)


def _fixed(value: float, meta: dict[str, Any]) -> Site:
    """A site that sends ``value`` everywhere with ``meta`` (and answers validate tasks with an accuracy)."""

    def site(task, model):
        if task.name == "validate":
            return None, {"accuracy": 0.5}, meta
        return {"w": np.full(2, value, np.float32)}, {"accuracy": 0.5}, meta

    return site


@pytest.mark.parametrize("claim", [1e30, -5, "NaN", "abc", True, None, 0])
def test_a_result_claiming_an_invalid_weight_is_refused_and_the_honest_average_is_exact(tmp_path, claim):
    sites = {
        "a": _fixed(1.0, {"NUM_STEPS_CURRENT_ROUND": 1}),
        "b": _fixed(5.0, {"NUM_STEPS_CURRENT_ROUND": 3}),
        "evil": _fixed(1e6, {"NUM_STEPS_CURRENT_ROUND": claim}),
    }
    ctx = Context(tmp_path, sites, {"persistor": FakePersistor({"w": np.zeros(2, np.float32)})})
    FedAvg(num_clients=3, num_rounds=1, min_clients=2).run(ctx)
    np.testing.assert_array_equal(load_numpy(tmp_path / "models" / "global-r0001.safetensors")["w"], [4.0, 4.0])
    with pytest.raises(RoundFailed, match=re.escape(f"evil claimed NUM_STEPS_CURRENT_ROUND={claim!r}:")):
        FedAvg(num_clients=3, num_rounds=2, min_clients=3).run(ctx)  # all three needed: the claim fails the round


def test_max_weight_bounds_claims_and_round_trips_through_the_exported_config(tmp_path):
    from fl.config import build_component

    sites = {"a": _fixed(1.0, {"NUM_STEPS_CURRENT_ROUND": 100}), "b": _fixed(3.0, {"NUM_STEPS_CURRENT_ROUND": 101})}
    ctx = Context(tmp_path, sites, {"persistor": FakePersistor({"w": np.zeros(2, np.float32)})})
    with pytest.raises(RoundFailed, match=r"b claimed NUM_STEPS_CURRENT_ROUND=101: .* at most 100 "):
        FedAvg(num_clients=2, num_rounds=1, max_weight=100).run(ctx)
    workflow = FedAvg(num_clients=2, max_weight=100)
    _, rebuilt = build_component(
        {"id": "fedavg", "path": "fl.workflows.fedavg.FedAvg", "args": workflow._init_args}, where="test"
    )
    assert rebuilt.max_weight == 100.0
    for bad in (0, -1, float("inf"), float("nan"), True, "10"):
        with pytest.raises(ValueError, match="max_weight must be a positive finite number"):
            FedAvg(max_weight=bad)


def test_a_validate_result_with_an_invalid_weight_is_refused_not_fatal(tmp_path):
    honest = _fixed(2.0, {"NUM_STEPS_CURRENT_ROUND": 2})

    def lies_when_validating(task, model):
        params, metrics, _ = honest(task, model)
        return params, metrics, ({"NUM_STEPS_CURRENT_ROUND": "abc"} if task.name == "validate" else {})

    ctx = Context(
        tmp_path, {"a": honest, "b": lies_when_validating}, {"persistor": FakePersistor({"w": np.zeros(2, np.float32)})}
    )
    FedAvg(num_clients=2, num_rounds=1, min_clients=1).run(ctx)
    assert [t[0] for t in ctx.communicator.tasks] == ["train", "validate"]


def test_a_non_finite_average_fails_the_round_and_keeps_the_previous_global_model(tmp_path):
    def nan_in_round_2(task, model):
        value = np.nan if task.round == 1 else 1.0  # the in-memory communicator does not check uploads
        return {"w": model["w"] + value}, {}, {}

    persistor = FakePersistor({"w": np.zeros(2, np.float32)})
    ctx = Context(tmp_path, {"a": plus_one(), "b": nan_in_round_2}, {"persistor": persistor})
    with pytest.raises(RoundFailed, match=r"round 2: the average of 2 updates is not finite: tensor 'w'.*"
                       r"global model stays global-r0001.safetensors"):  # fmt: skip
        FedAvg(num_clients=2, num_rounds=3).run(ctx)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["global-r0001.safetensors"]
    np.testing.assert_array_equal(load_numpy(tmp_path / "models" / "global-r0001.safetensors")["w"], [1.0, 1.0])
    assert ctx.state is not None and ctx.state["next_round"] == 1 and persistor.saved == [0]


def test_max_site_share_caps_the_heaviest_site_and_leaves_no_spooled_update(tmp_path):
    sites = {
        "big": _fixed(100.0, {"NUM_STEPS_CURRENT_ROUND": 1e6}),
        "b": _fixed(0.0, {"NUM_STEPS_CURRENT_ROUND": 1}),
        "c": _fixed(0.0, {"NUM_STEPS_CURRENT_ROUND": 1}),
    }
    ctx = Context(tmp_path, sites, {"persistor": FakePersistor({"w": np.zeros(2, np.float32)})})
    FedAvg(num_clients=3, num_rounds=2, min_clients=2, max_site_share=0.5).run(ctx)
    # big's weight is lowered to 2 (half of 2 + 1 + 1): (2 * 100 + 0 + 0) / 4.
    np.testing.assert_allclose(
        load_numpy(tmp_path / "models" / "global-r0002.safetensors")["w"], [50.0, 50.0], rtol=1e-6
    )
    assert not (tmp_path / "models" / "spool").exists()
    for bad in (0, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match=r"max_site_share must be a number in \(0, 1\]"):
            FedAvg(max_site_share=bad)
    with pytest.raises(ValueError, match=r"max_site_share 0\.4 cannot be met by a round of 2 results"):
        FedAvg(num_clients=3, min_clients=2, max_site_share=0.4)
