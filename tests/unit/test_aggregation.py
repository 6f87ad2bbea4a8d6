"""FedAvg's arithmetic, with fake results: weighted means, dtypes, DIFF updates, streaming from files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fl.tensors import Layout, LayoutError, describe, load_numpy, write_tensors
from fl.workflows.aggregation import (
    NonFiniteAverage,
    WeightedAverage,
    capped_weights,
    weighted_average,
    weighted_metrics,
)
from fl.workflows.fedavg import result_weight


def test_weighted_average_of_two_updates():
    a = {"w": np.array([1.0, 2.0], np.float32), "b": np.array([0.0], np.float32)}
    b = {"w": np.array([3.0, 6.0], np.float32), "b": np.array([4.0], np.float32)}
    out = weighted_average([(a, 1.0), (b, 3.0)])
    np.testing.assert_allclose(out["w"], [2.5, 5.0])
    np.testing.assert_allclose(out["b"], [3.0])
    assert out["w"].dtype == np.float32


def test_equal_weights_of_identical_updates_are_exact():
    x = np.random.default_rng(0).standard_normal(10_000).astype(np.float32)
    out = weighted_average([({"x": x + 1}, 1.0), ({"x": x + 1}, 1.0)])
    np.testing.assert_array_equal(out["x"], x + 1)


def test_dtypes_are_kept_and_integers_rounded():
    a = {"h": torch.tensor([1.0, 2.0]).half(), "bf": torch.tensor([1.0, 3.0]).bfloat16(), "n": torch.tensor(3)}
    b = {"h": torch.tensor([2.0, 4.0]).half(), "bf": torch.tensor([2.0, 5.0]).bfloat16(), "n": torch.tensor(6)}
    out = weighted_average([(a, 1.0), (b, 1.0)])
    np.testing.assert_array_equal(out["h"], np.array([1.5, 3.0], np.float16))
    bf = torch.from_numpy(out["bf"].astype(np.int16)).view(torch.bfloat16)
    assert torch.equal(bf, torch.tensor([1.5, 4.0]).bfloat16())
    assert out["n"].dtype == np.int64 and int(out["n"]) == 4  # 4.5 rounds to even


def test_mismatched_update_is_refused_before_it_touches_the_sums():
    avg = WeightedAverage(Layout.build([describe("w", np.zeros(2, np.float32))]))
    avg.add_arrays({"w": np.ones(2, np.float32)}, 1.0)
    with pytest.raises(LayoutError, match="shape"):
        avg.add_arrays({"w": np.ones(3, np.float32)}, 1.0)
    np.testing.assert_array_equal(avg.result_arrays()["w"], [1.0, 1.0])


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_weights_are_refused(weight):
    avg = WeightedAverage(Layout.build([describe("w", np.zeros(2, np.float32))]))
    with pytest.raises(ValueError, match="positive finite"):
        avg.add_arrays({"w": np.ones(2, np.float32)}, weight)


def test_streaming_from_files_matches_in_memory_and_reset_reuses_the_sums(tmp_path):
    rng = np.random.default_rng(1)
    updates = [({"w": rng.standard_normal((64, 33)).astype(np.float32)}, float(w)) for w in (1, 2, 5)]
    expected = weighted_average(updates)
    layout = Layout.build([describe("w", updates[0][0]["w"])])
    avg = WeightedAverage(layout)
    for round_ in range(2):
        avg.reset()
        for i, (params, weight) in enumerate(updates):
            path = tmp_path / f"u{round_}{i}.safetensors"
            write_tensors(path, params)
            avg.add_file(path, weight)
        avg.write_result(tmp_path / "out.safetensors")
        np.testing.assert_allclose(load_numpy(tmp_path / "out.safetensors")["w"], expected["w"], rtol=1e-6)


def test_diff_updates_are_added_to_the_base_model(tmp_path):
    base = {"w": np.array([10.0, 20.0], np.float32)}
    write_tensors(tmp_path / "base.safetensors", base)
    write_tensors(tmp_path / "d1.safetensors", {"w": np.array([1.0, -2.0], np.float32)})
    write_tensors(tmp_path / "full.safetensors", {"w": np.array([13.0, 20.0], np.float32)})
    avg = WeightedAverage(Layout.build([describe("w", base["w"])]))
    avg.add_file(tmp_path / "d1.safetensors", 1.0, params_type="DIFF", base_path=tmp_path / "base.safetensors")
    avg.add_file(tmp_path / "full.safetensors", 1.0)
    np.testing.assert_allclose(avg.result_arrays()["w"], [12.0, 19.0])


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_a_diff_update_that_overflows_once_added_to_the_base_is_refused_and_the_rest_average_exactly(tmp_path, dtype):
    top = np.finfo(dtype).max
    base = tmp_path / "base.safetensors"
    write_tensors(base, {"w": np.array([1.0, top, 2.0], dtype)})
    write_tensors(tmp_path / "honest.safetensors", {"w": np.array([3.0, 4.0, 5.0], dtype)})
    write_tensors(tmp_path / "diff.safetensors", {"w": np.array([1.0, top, 1.0], dtype)})  # finite as sent
    avg = WeightedAverage(Layout.build([describe("w", np.zeros(3, dtype))]))
    avg.add_file(tmp_path / "honest.safetensors", 3.0)
    with pytest.raises(LayoutError, match=r"tensor 'w': the DIFF update is not finite .* at flat index 1"):
        avg.add_file(tmp_path / "diff.safetensors", 1.0, params_type="DIFF", base_path=base)
    avg.add_file(tmp_path / "honest.safetensors", 1.0)  # the average goes on, untouched by the refused one
    assert avg.count == 2
    np.testing.assert_array_equal(avg.result_arrays()["w"], np.array([3.0, 4.0, 5.0], dtype))


def test_result_needs_at_least_one_update():
    avg = WeightedAverage(Layout.build([describe("w", np.zeros(1, np.float32))]))
    with pytest.raises(ValueError, match="no updates"):
        avg.result_arrays()


def test_metrics_are_weighted_and_ignore_non_numbers():
    out = weighted_metrics([({"acc": 0.5, "note": "x", "loss": float("nan")}, 1.0), ({"acc": 1.0, "loss": 2.0}, 3.0)])
    assert out == {"acc": pytest.approx(0.875), "loss": 2.0}


@pytest.mark.parametrize(
    ("meta", "weight"),
    [
        ({}, 1.0),
        ({"other": "x"}, 1.0),
        ({"NUM_STEPS_CURRENT_ROUND": 50}, 50.0),
        ({"NUM_STEPS_CURRENT_ROUND": 0.5}, 0.5),
    ],
)
def test_result_weight_is_the_claimed_steps_or_one_when_none_is_claimed(meta, weight):
    assert result_weight(meta) == weight


@pytest.mark.parametrize(
    ("claim", "shown"),
    [
        (0, "=0:"),
        (-5, "=-5:"),
        (1e30, "=1e+30:"),
        (1_000_000_001, "=1000000001:"),
        (10**400, "=1000000000000"),
        (float("nan"), "=nan:"),
        (float("inf"), "=inf:"),
        ("NaN", "='NaN':"),
        ("abc", "='abc':"),
        ("7", "='7':"),
        (True, "=True:"),
        (None, "=None:"),
        ([3], "=[3]:"),
    ],
)
def test_result_weight_refuses_an_invalid_claim_naming_the_site_value_and_bound(claim, shown):
    with pytest.raises(ValueError, match=r"at most 1e\+09") as info:
        result_weight({"NUM_STEPS_CURRENT_ROUND": claim}, site="site-3")
    assert str(info.value).startswith(f"site-3 claimed NUM_STEPS_CURRENT_ROUND{shown}")


def test_result_weight_bound_is_configurable_and_a_long_value_is_cut_short():
    assert result_weight({"n": 100}, "n", max_weight=100) == 100.0
    with pytest.raises(ValueError, match=r"site-1 claimed n=101: .* at most 100 "):
        result_weight({"n": 101}, "n", site="site-1", max_weight=100)
    with pytest.raises(ValueError) as info:
        result_weight({"n": "x" * 10_000}, "n", site="site-1")
    assert len(str(info.value)) < 200


def _numpy_average(updates):
    """The reference: float64 weighted mean of each tensor, in the first update's dtype."""
    total = sum(w for _, w in updates)
    first = updates[0][0]
    return {n: (sum(p[n].astype(np.float64) * w for p, w in updates) / total).astype(first[n].dtype) for n in first}


@pytest.mark.parametrize("sites", [2, 3, 7, 50])
def test_streaming_mean_matches_the_numpy_weighted_average(sites):
    rng = np.random.default_rng(sites)
    updates = [
        (
            {"w": rng.standard_normal((33, 17)).astype(np.float32) * 100, "d": rng.standard_normal(5)},
            float(rng.integers(1, 1000)),
        )
        for _ in range(sites)
    ]
    out, expected = weighted_average(updates), _numpy_average(updates)
    np.testing.assert_allclose(out["w"], expected["w"], rtol=2e-6, atol=2e-5)
    np.testing.assert_allclose(out["d"], expected["d"], rtol=1e-13, atol=1e-13)
    assert out["w"].dtype == np.float32 and out["d"].dtype == np.float64


def test_updates_near_the_float32_maximum_average_without_overflow():
    top = np.finfo(np.float32).max
    columns = [[top, top, top], [top, top, -top], [-top, -top, -top], [top, -top, 0.0]]
    sent = np.array(columns, np.float32).T  # one row per site
    for weights in ([1.0, 1.0, 1.0], [1e9, 1.0, 1.0], [1.0, 3.0, 1e9]):
        updates = [({"w": row}, w) for row, w in zip(sent, weights, strict=True)]
        out = weighted_average(updates)["w"]
        assert np.isfinite(out).all(), (weights, out)
        np.testing.assert_allclose(out, _numpy_average(updates)["w"], rtol=1e-6)


def test_identical_updates_with_any_weights_stay_close_to_themselves():
    x = np.random.default_rng(2).standard_normal(1000).astype(np.float32)
    out = weighted_average([({"x": x}, w) for w in (1.0, 2.0, 3.0, 1e9, 0.001)])["x"]
    np.testing.assert_allclose(out, x, rtol=3e-7)


def test_a_non_finite_average_is_refused_and_nothing_is_written(tmp_path):
    avg = WeightedAverage(Layout.build([describe("w", np.zeros(3, np.float32))]))
    target = tmp_path / "global.safetensors"
    write_tensors(target, {"w": np.full(3, 7.0, np.float32)})
    before = target.read_bytes()
    avg.add_arrays({"w": np.ones(3, np.float32)}, 1.0)
    avg.add_arrays({"w": np.array([1.0, np.nan, 1.0], np.float32)}, 1.0)  # files are checked at upload; arrays not
    with pytest.raises(NonFiniteAverage, match=r"average of 2 updates is not finite: tensor 'w' .* index 1"):
        avg.write_result(target)
    with pytest.raises(RuntimeError, match="not finite"):
        avg.result_arrays()  # still refused: nothing half-trusted comes out later
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global.safetensors"]  # no temp file left
    avg.reset()
    avg.add_arrays({"w": np.ones(3, np.float32)}, 1.0)
    np.testing.assert_array_equal(avg.result_arrays()["w"], [1.0, 1.0, 1.0])


def test_a_bool_is_not_an_aggregation_weight():
    avg = WeightedAverage(Layout.build([describe("w", np.zeros(2, np.float32))]))
    with pytest.raises(ValueError, match="positive finite"):
        avg.add_arrays({"w": np.ones(2, np.float32)}, True)


@pytest.mark.parametrize("seed", range(20))
def test_capped_weights_hold_every_share_at_the_cap_and_change_only_the_largest(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 12))
    weights = list(rng.choice([1.0, 10.0, 1e3, 1e9], n) * rng.uniform(0.5, 1.5, n))
    share = float(rng.uniform(1 / n, 1.0))
    out = np.array(capped_weights(weights, share))
    shares = out / out.sum()
    assert shares.max() <= share * (1 + 1e-12)
    changed = out != np.array(weights)
    assert (out[changed] < np.array(weights)[changed]).all()  # only lowered, never raised
    if changed.any():
        np.testing.assert_allclose(out[changed], out[changed][0], rtol=1e-12)  # one common cap ...
        assert out[changed][0] >= out[~changed].max(initial=0)  # ... above everyone left alone
        assert shares.max() == pytest.approx(share, rel=1e-12)  # and no lower than needed


def test_capped_weights_examples_and_an_impossible_cap():
    assert capped_weights([10.0, 1.0, 1.0], 0.5) == [2.0, 1.0, 1.0]
    assert capped_weights([5.0, 4.0, 3.0], 1.0) == [5.0, 4.0, 3.0]
    assert capped_weights([1.0, 1.0], 0.5) == [1.0, 1.0]
    with pytest.raises(ValueError, match=r"2 results cannot each hold at most 0\.4 of the average"):
        capped_weights([1.0, 1.0], 0.4)
