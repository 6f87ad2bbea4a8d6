"""Robust aggregation over update files against plain numpy references, streamed in small blocks."""

from __future__ import annotations

import numpy as np
import pytest

import fl.workflows.robust as robust
from fl.tensors import Layout, LayoutError, describe, load_numpy, write_tensors
from fl.workflows.robust import (
    coordinate_median,
    krum_scores,
    multikrum,
    pairwise_sq_distances,
    select_multikrum,
    trimmed_mean,
)

# float32 results of float64/float32 arithmetic: equal to the numpy reference within one rounding.
RTOL = 1e-6


@pytest.fixture(autouse=True)
def tiny_blocks(monkeypatch):
    """Blocks of a few elements, so that every tensor spans many blocks per file."""
    monkeypatch.setattr(robust, "BLOCK_BYTES", 96)


def fake_updates(tmp_path, count, seed=0, outlier=None):
    """``count`` update files near a common model (one may be far off); returns (paths, arrays, layout)."""
    rng = np.random.default_rng(seed)
    center = {"w": rng.standard_normal((7, 5)).astype(np.float32), "b": rng.standard_normal(9).astype(np.float32)}
    updates = []
    for i in range(count):
        update = {k: (v + 0.01 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in center.items()}
        if i == outlier:
            update = {k: np.full_like(v, 1e4) for k, v in update.items()}
        update["steps"] = np.array(10 + i, np.int64)
        updates.append(update)
    paths = []
    for i, update in enumerate(updates):
        paths.append(tmp_path / f"u{i}.safetensors")
        write_tensors(paths[-1], update)
    layout = Layout.build(describe(k, v) for k, v in updates[0].items())
    return paths, updates, layout


def reference(updates, reduce):
    return {k: reduce(np.stack([u[k].astype(np.float64) for u in updates])) for k in updates[0]}


def test_median_matches_numpy_median(tmp_path):
    paths, updates, layout = fake_updates(tmp_path, 5)
    coordinate_median(paths, layout, tmp_path / "out.safetensors", metadata={"round": "1"})
    out = load_numpy(tmp_path / "out.safetensors")
    expected = reference(updates, lambda x: np.median(x, axis=0))
    for name in ("w", "b"):
        assert out[name].dtype == np.float32
        np.testing.assert_allclose(out[name], expected[name], rtol=RTOL)
    assert out["steps"].dtype == np.int64 and int(out["steps"]) == 12


def test_median_of_even_count_is_the_mean_of_the_middle_two(tmp_path):
    paths, updates, layout = fake_updates(tmp_path, 4)
    coordinate_median(paths, layout, tmp_path / "out.safetensors")
    out = load_numpy(tmp_path / "out.safetensors")
    np.testing.assert_allclose(out["w"], reference(updates, lambda x: np.median(x, axis=0))["w"], rtol=RTOL)


@pytest.mark.parametrize(("count", "beta"), [(5, 0.2), (10, 0.2), (7, 0.3), (4, 0.0)])
def test_trimmed_mean_matches_sorted_slice_reference(tmp_path, count, beta):
    paths, updates, layout = fake_updates(tmp_path, count)
    trimmed_mean(paths, layout, tmp_path / "out.safetensors", beta=beta)
    out = load_numpy(tmp_path / "out.safetensors")
    cut = int(beta * count)
    expected = reference(updates, lambda x: np.sort(x, axis=0)[cut : count - cut].mean(axis=0))
    np.testing.assert_allclose(out["w"], expected["w"], rtol=RTOL)
    np.testing.assert_allclose(out["b"], expected["b"], rtol=RTOL)


@pytest.mark.parametrize("beta", [0.5, -0.1, 1.0])
def test_trimmed_mean_refuses_a_beta_that_trims_everything(tmp_path, beta):
    paths, _, layout = fake_updates(tmp_path, 4)
    with pytest.raises(ValueError, match="beta"):
        trimmed_mean(paths, layout, tmp_path / "out.safetensors", beta=beta)
    assert not (tmp_path / "out.safetensors").exists()


def test_pairwise_distances_match_flattened_numpy(tmp_path):
    paths, updates, layout = fake_updates(tmp_path, 4)
    flat = np.stack([np.concatenate([u[k].astype(np.float64).ravel() for k in ("w", "b", "steps")]) for u in updates])
    expected = ((flat[:, None, :] - flat[None, :, :]) ** 2).sum(axis=2)
    np.testing.assert_allclose(pairwise_sq_distances(paths, layout), expected, rtol=1e-12)


def test_krum_scores_sum_the_nearest_n_minus_f_minus_2_others():
    distances = np.array(
        [[0, 1, 4, 9, 16], [1, 0, 2, 3, 5], [4, 2, 0, 6, 7], [9, 3, 6, 0, 8], [16, 5, 7, 8, 0]], np.float64
    )
    # n=5, f=1: each score sums the 2 smallest distances to others.
    np.testing.assert_array_equal(krum_scores(distances, 1), [1 + 4, 1 + 2, 2 + 4, 3 + 6, 5 + 7])
    # f=3: max(1, 5-3-2) = 1 nearest other.
    np.testing.assert_array_equal(krum_scores(distances, 3), [1, 1, 2, 3, 5])


@pytest.mark.parametrize("aggregate", ["median", "trimmed", "krum", "multikrum"])
def test_robust_aggregators_ignore_one_site_sending_an_outlier(tmp_path, aggregate):
    paths, updates, layout = fake_updates(tmp_path, 5, outlier=2)
    honest = [u for i, u in enumerate(updates) if i != 2]
    out_path = tmp_path / "out.safetensors"
    if aggregate == "median":
        coordinate_median(paths, layout, out_path)
    elif aggregate == "trimmed":
        trimmed_mean(paths, layout, out_path, beta=0.2)
    else:
        chosen = multikrum(
            paths,
            [1.0] * 5,
            layout,
            out_path,
            num_malicious_nodes=1,
            num_nodes_to_select=1 if aggregate == "krum" else 3,
        )
        assert 2 not in chosen
    out = load_numpy(out_path)
    lowest = np.min([u["w"] for u in honest], axis=0)
    highest = np.max([u["w"] for u in honest], axis=0)
    assert np.all(out["w"] >= lowest - 1e-6) and np.all(out["w"] <= highest + 1e-6)


def test_multikrum_averages_the_selection_by_weight(tmp_path):
    paths, updates, layout = fake_updates(tmp_path, 6, outlier=0)
    weights = [1.0, 2.0, 3.0, 1.0, 5.0, 4.0]
    chosen = multikrum(paths, weights, layout, tmp_path / "out.safetensors", num_nodes_to_select=4)
    flat = np.stack([np.concatenate([u[k].astype(np.float64).ravel() for k in ("w", "b", "steps")]) for u in updates])
    distances = ((flat[:, None, :] - flat[None, :, :]) ** 2).sum(axis=2)
    nearest = 6 - 0 - 2
    scores = [np.sort(np.delete(distances[i], i))[:nearest].sum() for i in range(6)]
    assert chosen == [int(i) for i in np.argsort(scores, kind="stable")[:4]]
    w = np.array([weights[i] for i in chosen])
    expected = sum(wi * updates[i]["w"].astype(np.float64) for wi, i in zip(w, chosen, strict=True)) / w.sum()
    np.testing.assert_allclose(load_numpy(tmp_path / "out.safetensors")["w"], expected, rtol=1e-5)


def test_select_multikrum_refuses_more_than_there_are(tmp_path):
    paths, _, layout = fake_updates(tmp_path, 3)
    with pytest.raises(ValueError, match="num_nodes_to_select"):
        select_multikrum(paths, layout, num_nodes_to_select=4)
    with pytest.raises(ValueError, match="num_malicious_nodes"):
        select_multikrum(paths, layout, num_malicious_nodes=3)


def test_an_update_of_another_layout_is_refused_and_nothing_is_written(tmp_path):
    paths, _, layout = fake_updates(tmp_path, 3)
    write_tensors(paths[1], {"w": np.zeros((7, 4), np.float32), "b": np.zeros(9, np.float32)})
    with pytest.raises(LayoutError, match=r"u1\.safetensors"):
        coordinate_median(paths, layout, tmp_path / "out.safetensors")
    assert list(tmp_path.glob("out*")) == [] and list(tmp_path.glob(".out*")) == []


def test_no_updates_is_an_error(tmp_path):
    layout = Layout.build([describe("w", np.zeros(2, np.float32))])
    with pytest.raises(ValueError, match="no updates"):
        coordinate_median([], layout, tmp_path / "out.safetensors")
