"""The round engine: a server stopped mid-job resumes every algorithm to the same result as an uninterrupted run.

A stop is a site failing round 2/3 (RoundFailed ends the run, the state of round 1 stays saved);
the restart is a new workflow object run on the same run_dir with that saved state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from fl.tensors import load_numpy
from fl.workflows.base import RoundFailed
from fl.workflows.cyclic import Cyclic
from fl.workflows.dp_strategies import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
)
from fl.workflows.engine import RoundEngine
from fl.workflows.fedavg import FedAvg
from fl.workflows.fedopt import FedAdagrad, FedAdam, FedAvgM, FedOpt, FedYogi
from fl.workflows.robust_strategies import FedMedian, MultiKrum
from fl.workflows.scaffold import Scaffold
from tests.unit.test_fedavg import Context, FakePersistor
from tests.unit.test_fedopt import SITES, initial, make_site, site_update

ALGORITHMS: dict[str, Callable[[], RoundEngine]] = {
    "FedAvg": lambda: FedAvg(num_clients=3, num_rounds=3),
    "FedAvgM": lambda: FedAvgM(num_clients=3, num_rounds=3, server_momentum=0.9, server_learning_rate=0.7),
    "FedAdam": lambda: FedAdam(num_clients=3, num_rounds=3),
    "FedYogi": lambda: FedYogi(num_clients=3, num_rounds=3),
    "FedAdagrad": lambda: FedAdagrad(num_clients=3, num_rounds=3),
    "FedOpt": lambda: FedOpt(num_clients=3, num_rounds=3),
    "Cyclic": lambda: Cyclic(num_clients=3, num_rounds=3),
    "FedMedian": lambda: FedMedian(num_clients=3, num_rounds=3),
    "MultiKrum": lambda: MultiKrum(num_clients=3, num_rounds=3, num_nodes_to_select=2),
    # noise 0: the resumed result is then deterministic; the adaptive norm is the state resumed
    "DPFixedClipping": lambda: DifferentialPrivacyServerSideFixedClipping(
        noise_multiplier=0.0, clipping_norm=0.05, num_sampled_clients=3, num_clients=3, num_rounds=3
    ),
    "Scaffold": lambda: Scaffold(num_clients=3, num_rounds=3),
    "DPAdaptiveClipping": lambda: DifferentialPrivacyServerSideAdaptiveClipping(
        noise_multiplier=0.0, num_sampled_clients=3, initial_clipping_norm=0.05, num_clients=3, num_rounds=3
    ),
}


def with_control_diffs(site: Any) -> Any:
    """A fake site that also answers SCAFFOLD's global controls: it returns them, transformed, as its control change."""

    def answer(task: Any, model: Any) -> Any:
        params, metrics, meta = site(task, model)
        renamed = {k.replace("scaffold_c_global.", "scaffold_c_diff."): v for k, v in params.items()}
        return renamed, metrics, meta

    return answer


def sites(fail_in_round: int | None = None) -> dict[str, Any]:
    out = {name: with_control_diffs(make_site(name)) for name in SITES}
    healthy = out["b"]

    def flaky(task: Any, model: Any) -> Any:
        if task.round == fail_in_round:
            raise RuntimeError("server stopping")
        return healthy(task, model)

    out["b"] = flaky
    return out


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_a_job_stopped_mid_way_resumes_to_the_uninterrupted_result(name, tmp_path):
    make = ALGORITHMS[name]
    whole = Context(tmp_path / "whole", sites(), {"persistor": FakePersistor(initial())})
    make().run(whole)

    stopped = Context(tmp_path / "stopped", sites(fail_in_round=1), {"persistor": FakePersistor(initial())})
    with pytest.raises(RoundFailed, match="server stopping"):
        make().run(stopped)
    assert stopped.state is not None and stopped.state["next_round"] == 1
    stopped.communicator.sites.update(sites())  # the restarted server's sites all answer
    make().run(stopped)

    assert whole.state is not None and stopped.state["model_file"] == whole.state["model_file"]
    got = load_numpy(tmp_path / "stopped" / "models" / stopped.state["model_file"])
    want = load_numpy(tmp_path / "whole" / "models" / whole.state["model_file"])
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])  # bit for bit: the moments were resumed exactly


def test_a_fresh_run_does_not_inherit_moments_from_an_earlier_run_of_the_same_object(tmp_path):
    algo = FedAdam(num_clients=3, num_rounds=2)
    first = Context(tmp_path / "one", sites(), {"persistor": FakePersistor(initial())})
    algo.run(first)
    second = Context(tmp_path / "two", sites(), {"persistor": FakePersistor(initial())})
    algo.run(second)
    assert first.state is not None and second.state is not None
    a = load_numpy(tmp_path / "one" / "models" / first.state["model_file"])
    b = load_numpy(tmp_path / "two" / "models" / second.state["model_file"])
    np.testing.assert_array_equal(a["w"], b["w"])


def test_a_saved_state_that_does_not_fit_the_model_is_refused_naming_the_tensor(tmp_path):
    ctx = Context(tmp_path, sites(fail_in_round=1), {"persistor": FakePersistor(initial())})
    with pytest.raises(RoundFailed):
        FedAdam(num_clients=3, num_rounds=3).run(ctx)
    assert ctx.state is not None
    ctx.state["strategy_file"] = "other.safetensors"
    from fl.tensors import write_tensors

    write_tensors(tmp_path / "models" / "other.safetensors", {"m:w": np.zeros(5, np.float32)})
    ctx.communicator.sites.update(sites())
    with pytest.raises(ValueError, match="saved moment 'm' of tensor 'w' has 5 float32 values, the model's tensor 12"):
        FedAdam(num_clients=3, num_rounds=3).run(ctx)


def test_fedavg_keeps_no_strategy_state(tmp_path):
    ctx = Context(tmp_path, sites(), {"persistor": FakePersistor(initial())})
    FedAvg(num_clients=3, num_rounds=2).run(ctx)
    assert ctx.state == {"next_round": 2, "model_file": "global-r0002.safetensors", "sites_report_metrics": False}
    assert not list((tmp_path / "models").glob("strategy-*"))


def cyclic_reference(order: list[str], rounds: int) -> dict[str, np.ndarray]:
    """The model handed from site to site in ``order``, ``rounds`` times (float32 between sites, as on the wire)."""
    out = {}
    for key, value in initial().items():
        x = value
        for rnd in range(rounds):
            for site in order:
                x = site_update(site, rnd, x.astype(np.float64)).astype(np.float32)
        out[key] = x
    return out


def test_cyclic_passes_the_model_from_site_to_site_in_a_fixed_order(tmp_path):
    ctx = Context(tmp_path, sites(), {"persistor": FakePersistor(initial())})
    Cyclic(num_clients=3, num_rounds=2).run(ctx)
    assert [t[2] for t in ctx.communicator.tasks if t[0] == "train"] == [["a"], ["b"], ["c"]] * 2
    assert ctx.state is not None
    got = load_numpy(tmp_path / "models" / ctx.state["model_file"])
    for key, want in cyclic_reference(["a", "b", "c"], 2).items():
        np.testing.assert_array_equal(got[key], want)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["global-r0002.safetensors"]  # legs dropped


def test_cyclic_random_order_visits_every_site_once_a_round(tmp_path):
    ctx = Context(tmp_path, sites(), {"persistor": FakePersistor(initial())})
    Cyclic(num_clients=3, num_rounds=4, order="random").run(ctx)
    trains = [t[2][0] for t in ctx.communicator.tasks if t[0] == "train"]
    assert [sorted(trains[i : i + 3]) for i in range(0, 12, 3)] == [["a", "b", "c"]] * 4


def test_cyclic_refuses_what_does_not_apply():
    with pytest.raises(ValueError, match="Cyclic: order must be one of fixed, random, got 'backwards'"):
        Cyclic(order="backwards")
    with pytest.raises(ValueError, match="Cyclic: max_site_share does not apply"):
        Cyclic(max_site_share=0.5)
