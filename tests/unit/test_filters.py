"""Filters: ExcludeVars and PercentilePrivacy against numpy references, and the FLARE-shaped filter chain."""

from __future__ import annotations

import numpy as np
import pytest

from fl.config import ConfigError
from fl.filters import ExcludeVars, Filter, FilterChain, FilterContext, FilterError, PercentilePrivacy
from fl.filters.base import _Rule
from fl.tensors import load_numpy, write_tensors


def params(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": (scale * rng.standard_normal((4, 3))).astype(np.float32),
        "bn.running_mean": (scale * rng.standard_normal(3)).astype(np.float32),
        "fc.bias": (scale * rng.standard_normal(5)).astype(np.float64),
        "scale": np.array(scale * 0.5, np.float32),
        "bn.num_batches_tracked": np.array(7 + seed, np.int64),
    }


@pytest.fixture
def files(tmp_path):
    base, result = params(0), params(1)
    write_tensors(tmp_path / "base.safetensors", base)
    write_tensors(tmp_path / "result.safetensors", result)
    return tmp_path, base, result


def ctx(tmp_path, params_type="FULL", meta=None, base=True):
    return FilterContext(
        site="site-1",
        task_name="train",
        kind="task_result",
        params_type=params_type,
        base_path=tmp_path / "base.safetensors" if base else None,
        meta=meta or {},
    )


@pytest.mark.parametrize("exclude", [["bn.running_mean", "bn.num_batches_tracked"], "^bn\\."])
def test_exclude_vars_sends_the_tasks_values_for_excluded_tensors(files, exclude):
    tmp_path, base, result = files
    out = tmp_path / "out.safetensors"
    assert ExcludeVars(exclude).process(tmp_path / "result.safetensors", out, ctx(tmp_path))
    got = load_numpy(out)
    for name in base:
        expected = base[name] if name.startswith("bn.") else result[name]
        np.testing.assert_array_equal(got[name], expected, err_msg=name)
        assert got[name].dtype == expected.dtype


def test_exclude_vars_zeroes_excluded_tensors_of_a_diff(files):
    tmp_path, _, result = files
    out = tmp_path / "out.safetensors"
    ExcludeVars("running").process(tmp_path / "result.safetensors", out, ctx(tmp_path, "DIFF", base=False))
    got = load_numpy(out)
    np.testing.assert_array_equal(got["bn.running_mean"], np.zeros(3, np.float32))
    np.testing.assert_array_equal(got["conv.weight"], result["conv.weight"])


def test_exclude_vars_matching_nothing_changes_nothing(files):
    tmp_path, _, _ = files
    assert not ExcludeVars("nomatch").process(tmp_path / "result.safetensors", tmp_path / "o", ctx(tmp_path))
    assert not ExcludeVars().process(tmp_path / "result.safetensors", tmp_path / "o", ctx(tmp_path))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("bad", [3, ["ok", 4], "("])
def test_exclude_vars_refuses_bad_arguments(bad):
    with pytest.raises(ValueError, match="exclude_vars"):
        ExcludeVars(bad)


def flare_percentile_reference(diff, percentile, gamma, steps):
    """FLARE's PercentilePrivacy.process_dxo over a dict of float64 arrays."""
    delta = {k: v / steps for k, v in diff.items()}
    cutoff = np.percentile(np.concatenate([np.abs(v.ravel()) for v in delta.values()]), percentile)
    out = {}
    for k, d in delta.items():
        if np.ndim(d) == 0:
            out[k] = d * steps
            continue
        d = d.copy()
        d[(d > -cutoff) & (d < cutoff)] = 0.0
        out[k] = np.clip(d, -gamma, gamma) * steps
    return out


@pytest.mark.parametrize(("percentile", "gamma", "steps"), [(10, 0.01, 1), (50, 0.5, 4), (90, 10.0, 2)])
def test_percentile_privacy_matches_flares_arithmetic_on_a_diff(tmp_path, percentile, gamma, steps):
    diff = params(2, scale=0.3)
    write_tensors(tmp_path / "diff.safetensors", diff)
    out = tmp_path / "out.safetensors"
    flt = PercentilePrivacy(percentile=percentile, gamma=gamma)
    context = ctx(tmp_path, "DIFF", meta={"NUM_STEPS_CURRENT_ROUND": steps}, base=False)
    assert flt.process(tmp_path / "diff.safetensors", out, context)
    floats = [k for k, v in diff.items() if v.dtype.kind == "f"]
    expected = flare_percentile_reference({k: diff[k].astype(np.float64) for k in floats}, percentile, gamma, steps)
    got = load_numpy(out)
    for k in floats:
        np.testing.assert_allclose(got[k], expected[k].astype(diff[k].dtype), rtol=1e-6, err_msg=k)
    assert int(got["bn.num_batches_tracked"]) == int(diff["bn.num_batches_tracked"])


def test_percentile_privacy_on_full_params_filters_the_change_to_the_tasks_model(files):
    tmp_path, base, result = files
    out = tmp_path / "out.safetensors"
    PercentilePrivacy(percentile=30, gamma=0.2).process(tmp_path / "result.safetensors", out, ctx(tmp_path))
    floats = [k for k, v in base.items() if v.dtype.kind == "f"]
    diff = {k: result[k].astype(np.float64) - base[k] for k in floats}
    expected = flare_percentile_reference(diff, 30, 0.2, 1)
    got = load_numpy(out)
    for k in floats:
        np.testing.assert_allclose(got[k], (base[k] + expected[k]).astype(base[k].dtype), rtol=1e-6, atol=1e-7)


def test_percentile_privacy_on_full_params_without_a_reference_is_refused(files):
    tmp_path, _, _ = files
    with pytest.raises(ValueError, match="reference"):
        PercentilePrivacy().process(tmp_path / "result.safetensors", tmp_path / "o", ctx(tmp_path, base=False))


@pytest.mark.parametrize(("kwargs", "word"), [({"percentile": 101}, "percentile"), ({"gamma": 0}, "gamma")])
def test_percentile_privacy_refuses_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        PercentilePrivacy(**kwargs)


def chain_config(*filters, tasks=("train",)):
    return {"task_result_filters": [{"tasks": list(tasks), "filters": list(filters)}]}


def test_chain_runs_flare_spelled_filters_for_their_tasks_only(files):
    tmp_path, base, _ = files
    chain = FilterChain.from_config(
        chain_config(
            {"path": "nvflare.app_common.filters.exclude_vars.ExcludeVars", "args": {"exclude_vars": "conv"}},
            {"path": "fl.filters.ExcludeVars", "args": {"exclude_vars": ["fc.bias"]}},
        ),
        "task_result_filters",
        where="config_fed_client.json",
    )
    src = tmp_path / "result.safetensors"
    final = chain.apply(src, ctx(tmp_path))
    got = load_numpy(final)
    np.testing.assert_array_equal(got["conv.weight"], base["conv.weight"])
    np.testing.assert_array_equal(got["fc.bias"], base["fc.bias"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["base.safetensors", "result.safetensors", final.name])
    evaluate = FilterContext("site-1", "validate", "task_result", base_path=tmp_path / "base.safetensors")
    assert chain.apply(src, evaluate) == src  # no filter for that task


class Exploding(Filter):
    def process(self, src, dst, ctx):
        dst.write_bytes(b"half")
        raise RuntimeError("boom")


def test_a_failing_filter_names_itself_the_task_and_the_site_and_leaves_nothing(files):
    tmp_path, _, _ = files
    chain = FilterChain.from_config(
        chain_config({"path": "fl.filters.ExcludeVars", "args": {"exclude_vars": "conv"}}, tasks=["*"]),
        "task_result_filters",
        where="x",
    )
    bad = FilterChain(
        "task_result_filters", [chain.rules[0], _Rule(frozenset({"*"}), (("f[1] (Exploding)", Exploding()),))]
    )
    with pytest.raises(FilterError, match=r"f\[1\] \(Exploding\) failed on task 'train' of site 'site-1'.*boom"):
        bad.apply(tmp_path / "result.safetensors", ctx(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "result.safetensors"]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"task_result_filters": {"tasks": ["train"]}}, "must be a list"),
        ({"task_result_filters": [{"tasks": [], "filters": []}]}, "tasks must be a non-empty list"),
        (chain_config({"path": "fl.filters.ExcludeVars", "args": {"exclude_vars": 3}}), "exclude_vars"),
        (chain_config({"path": "fl.components.persistor.PTFileModelPersistor", "args": {}}), "not a filter|model"),
        (chain_config({"path": "os.system", "args": {}}), "os.system"),
    ],
)
def test_bad_filter_configs_are_refused_with_where_they_are(config, message):
    with pytest.raises(ConfigError, match=message):
        FilterChain.from_config(config, "task_result_filters", where="config_fed_client.json")


def test_no_filters_is_an_empty_chain():
    chain = FilterChain.from_config({"task_result_filters": []}, "task_result_filters", where="x")
    assert not chain and chain.for_task("train") == []
