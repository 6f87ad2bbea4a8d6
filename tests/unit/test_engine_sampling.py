"""FedAvg(num_clients=K) with more sites connected samples K a round: anew each round, reproducibly with a
seed (also across a resume), logged, and within min_clients."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fl.workflows.fedavg import FedAvg
from tests.unit.test_fedavg import Context, FakePersistor, plus_one

EIGHT = [f"site-{i}" for i in range(1, 9)]


class RecordingContext(Context):
    """The fake job context, keeping what the engine publishes as progress."""

    def __init__(self, run_dir: Path, sites: list[str]) -> None:
        super().__init__(run_dir, {s: plus_one() for s in sites}, {"persistor": FakePersistor({"w": np.zeros(2)})})
        self.progress: list[dict[str, Any]] = []

    def set_progress(self, **kwargs: Any) -> None:
        self.progress.append(kwargs)


def train_rounds(ctx: Context) -> list[list[str]]:
    return [targets for name, _, targets in ctx.communicator.tasks if name == "train"]


def run(tmp_path: Path, **args: Any) -> RecordingContext:
    ctx = RecordingContext(tmp_path, EIGHT)
    FedAvg(num_rounds=args.pop("num_rounds", 6), **args).run(ctx)
    return ctx


def test_each_round_samples_num_clients_of_the_connected_sites_anew(tmp_path):
    rounds = train_rounds(run(tmp_path, num_clients=2, seed=1))
    assert all(len(r) == 2 and set(r) <= set(EIGHT) and len(set(r)) == 2 for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1, f"every round sampled the same sites: {rounds}"


def test_the_same_seed_samples_the_same_sites_and_another_seed_others(tmp_path):
    first = train_rounds(run(tmp_path / "a", num_clients=3, seed=42))
    again = train_rounds(run(tmp_path / "b", num_clients=3, seed=42))
    other = train_rounds(run(tmp_path / "c", num_clients=3, seed=43))
    assert first == again
    assert first != other


def test_the_sample_does_not_depend_on_the_order_sites_connected_in():
    engine = FedAvg(num_clients=3, num_rounds=2, seed=5)
    assert engine.sample_sites(EIGHT, 1) == engine.sample_sites(list(reversed(EIGHT)), 1)


def test_a_resumed_job_samples_what_the_uninterrupted_one_did(tmp_path):
    whole = train_rounds(run(tmp_path / "whole", num_clients=2, seed=9, num_rounds=4))
    ctx = RecordingContext(tmp_path / "resumed", EIGHT)
    FedAvg(num_clients=2, num_rounds=2, seed=9, final_validation=False).run(ctx)  # rounds 1-2, then "stopped"
    assert ctx.state is not None and ctx.state["next_round"] == 2
    FedAvg(num_clients=2, num_rounds=4, seed=9).run(ctx)  # a new engine on the saved state: rounds 3-4
    assert train_rounds(ctx) == whole


def test_each_round_s_sample_is_logged_and_published_in_the_job_status(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="fl.test"):
        ctx = run(tmp_path, num_clients=2, seed=3, num_rounds=3)
    rounds = train_rounds(ctx)
    published = [p["round_sites"] for p in ctx.progress if "round_sites" in p]
    assert published[:3] == rounds
    for rnd, sites in enumerate(rounds):
        assert f"round {rnd + 1}/3: sampled 2 of 8 sites: {', '.join(sites)}" in caplog.text


def test_with_no_more_sites_than_num_clients_every_site_trains_and_nothing_is_sampled(tmp_path):
    ctx = RecordingContext(tmp_path, EIGHT[:2])
    FedAvg(num_clients=2, num_rounds=2, seed=1).run(ctx)
    assert train_rounds(ctx) == [EIGHT[:2], EIGHT[:2]]
    assert not [p for p in ctx.progress if "round_sites" in p]


def test_a_round_of_a_sample_still_needs_min_clients_results(tmp_path):
    ctx = RecordingContext(tmp_path, EIGHT)
    FedAvg(num_clients=4, min_clients=3, num_rounds=1, final_validation=False).run(ctx)
    assert [len(r) for r in train_rounds(ctx)] == [4]


@pytest.mark.parametrize("seed", ["7", 1.5, True])
def test_a_seed_that_is_not_an_integer_is_refused(seed):
    with pytest.raises(ValueError, match="seed must be an integer"):
        FedAvg(num_clients=2, seed=seed)
