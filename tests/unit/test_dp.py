"""Server-side DP against numpy references: norms, clipping by fold weights, noise, adaptive norm, epsilon."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from fl.tensors import Layout, describe, load_numpy, write_tensors
from fl.workflows.aggregation import ParamsType, WeightedAverage
from fl.workflows.dp import (
    RDP_ORDERS,
    AdaptiveClipping,
    FixedClipping,
    add_gaussian_noise,
    delta_norm,
    job_epsilon,
    rdp_gaussian_epsilon,
)


def model(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return {
        "w": (scale * rng.standard_normal((6, 4))).astype(np.float32),
        "b": (scale * rng.standard_normal(3)).astype(np.float64),
        "num_batches_tracked": np.array(100 * seed, np.int64),
    }


def flat_floats(params):
    return np.concatenate([params[k].astype(np.float64).ravel() for k in ("w", "b")])


@pytest.fixture
def round_files(tmp_path):
    base = model(0)
    updates = [
        {k: (base[k] + model(i, scale)[k]).astype(base[k].dtype) for k in base}
        for i, scale in [(1, 0.01), (2, 0.5), (3, 3.0)]
    ]
    write_tensors(tmp_path / "base.safetensors", base)
    paths = []
    for i, u in enumerate(updates):
        paths.append(tmp_path / f"u{i}.safetensors")
        write_tensors(paths[-1], u)
    return base, updates, paths, tmp_path / "base.safetensors", Layout.build(describe(k, v) for k, v in base.items())


def test_delta_norm_is_the_l2_norm_of_the_float_difference(round_files):
    base, updates, paths, base_path, layout = round_files
    for update, path in zip(updates, paths, strict=True):
        expected = np.linalg.norm(flat_floats(update) - flat_floats(base))
        assert delta_norm(path, layout, base_path) == pytest.approx(expected, rel=1e-9)


def test_delta_norm_of_a_diff_update_is_its_own_norm(tmp_path):
    diff = model(4)
    write_tensors(tmp_path / "d.safetensors", diff)
    layout = Layout.build(describe(k, v) for k, v in diff.items())
    assert delta_norm(tmp_path / "d.safetensors", layout) == pytest.approx(np.linalg.norm(flat_floats(diff)), rel=1e-9)


@pytest.mark.parametrize("params_type", [ParamsType.FULL, ParamsType.DIFF])
def test_fold_weights_give_the_uniform_average_of_clipped_updates(round_files, tmp_path, params_type):
    base, updates, paths, base_path, layout = round_files
    clipping = FixedClipping(noise_multiplier=1.0, clipping_norm=1.0)
    norms = [delta_norm(p, layout, base_path) for p in paths]
    clipped = clipping.clip(norms)
    assert clipped.unclipped == 1 and clipped.factors[0] == 1.0

    if params_type == ParamsType.DIFF:
        diffs = []
        for i, u in enumerate(updates):
            diffs.append(tmp_path / f"d{i}.safetensors")
            write_tensors(diffs[-1], {k: (u[k] - base[k]).astype(base[k].dtype) for k in base})
        paths = diffs
    average = WeightedAverage(layout)
    for path, weight in zip(paths, clipped.update_weights, strict=True):
        average.add_file(path, weight, params_type=params_type, base_path=base_path)
    if clipped.base_weight > 0:  # the base model itself, as a FULL model, for DIFF updates too
        average.add_file(base_path, clipped.base_weight)
    result = average.result_arrays()

    # numpy reference: base + mean_i(delta_i * min(1, C / ||delta_i||))
    reference_deltas = []
    for u in updates:
        delta = {k: u[k].astype(np.float64) - base[k] for k in ("w", "b")}
        norm = np.linalg.norm(np.concatenate([d.ravel() for d in delta.values()]))
        reference_deltas.append({k: d * min(1.0, 1.0 / norm) for k, d in delta.items()})
    for k in ("w", "b"):
        expected = base[k] + np.mean([d[k] for d in reference_deltas], axis=0)
        np.testing.assert_allclose(result[k], expected, rtol=1e-5, atol=1e-6)  # float32 folds


def test_noise_has_the_stated_std_on_floats_only(tmp_path):
    big = {"w": np.zeros(200_000, np.float32), "n": np.array([7], np.int64)}
    write_tensors(tmp_path / "avg.safetensors", big)
    clipping = FixedClipping(noise_multiplier=2.0, clipping_norm=0.5)
    clipped = clipping.clip([0.1, 0.2, 0.3, 0.4])
    std = clipping.noise_std(clipped)
    assert std == pytest.approx(2.0 * 0.5 / 4)
    add_gaussian_noise(tmp_path / "avg.safetensors", tmp_path / "noised.safetensors", std, rng=np.random.default_rng(1))
    out = load_numpy(tmp_path / "noised.safetensors")
    # 200k samples: the sample std is within 1% of the true one with overwhelming probability.
    assert float(out["w"].std()) == pytest.approx(std, rel=0.01)
    assert abs(float(out["w"].mean())) < 5 * std / math.sqrt(200_000)
    assert out["n"].tolist() == [7]


def test_adaptive_clipping_moves_the_norm_as_andrew_et_al():
    clipping = AdaptiveClipping(
        noise_multiplier=1.0, num_sampled_clients=4, initial_clipping_norm=1.0, clipped_count_stddev=0.0
    )
    clipped = clipping.clip([0.5, 2.0, 3.0, 4.0])  # 1 of 4 unclipped, target 0.5
    clipping.end_round(clipped)
    assert clipping.clipping_norm == pytest.approx(math.exp(-0.2 * (0.25 - 0.5)))
    clipped = clipping.clip([0.1, 0.1, 0.1, 0.1])  # all unclipped: the norm shrinks
    clipping.end_round(clipped)
    assert clipping.clipping_norm == pytest.approx(math.exp(-0.2 * (0.25 - 0.5)) * math.exp(-0.2 * 0.5))


def test_adaptive_clipping_spends_part_of_the_noise_on_the_count():
    clipping = AdaptiveClipping(noise_multiplier=1.0, num_sampled_clients=20)  # sigma_b = 20 / 20 = 1
    assert clipping.clipped_count_stddev == 1.0
    assert clipping.model_noise_multiplier == pytest.approx((1.0 - 0.25) ** -0.5)
    with pytest.raises(ValueError, match="clipped_count_stddev"):
        AdaptiveClipping(noise_multiplier=1.0, num_sampled_clients=20, clipped_count_stddev=0.5)


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"noise_multiplier": -1.0, "clipping_norm": 1.0}, "noise_multiplier"),
        ({"noise_multiplier": 1.0, "clipping_norm": 0.0}, "clipping_norm"),
        ({"noise_multiplier": float("nan"), "clipping_norm": 1.0}, "noise_multiplier"),
    ],
)
def test_bad_parameters_are_refused_by_name(kwargs, word):
    with pytest.raises(ValueError, match=word):
        FixedClipping(**kwargs)


def test_rdp_epsilon_matches_the_closed_form_minimum():
    z, rounds, delta = 1.1, 50, 1e-5
    expected = min(
        rounds * a / (2 * z * z) + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1) for a in RDP_ORDERS
    )
    assert rdp_gaussian_epsilon(z, rounds, delta) == pytest.approx(expected, rel=1e-12)
    # more rounds or less noise never buys privacy
    assert rdp_gaussian_epsilon(z, 100, delta) > rdp_gaussian_epsilon(z, 50, delta)
    assert rdp_gaussian_epsilon(0.8, 50, delta) > rdp_gaussian_epsilon(z, 50, delta)


def test_job_epsilon_without_the_library_is_the_rdp_bound(monkeypatch):
    monkeypatch.setitem(sys.modules, "dp_accounting", None)  # import fails
    eps, how = job_epsilon(1.1, 50, 1e-5, sample_rate=0.5)
    assert eps == rdp_gaussian_epsilon(1.1, 50, 1e-5) and "no sampling" in how
    assert job_epsilon(0.0, 5, 1e-5)[0] == math.inf


def test_job_epsilon_with_the_library_agrees_at_full_sampling():
    pytest.importorskip("dp_accounting")
    eps, how = job_epsilon(1.1, 50, 1e-5)
    assert "dp-accounting" in how
    assert eps == pytest.approx(rdp_gaussian_epsilon(1.1, 50, 1e-5), rel=1e-6)
    assert job_epsilon(1.1, 50, 1e-5, sample_rate=0.1)[0] < eps  # sampling amplifies privacy
