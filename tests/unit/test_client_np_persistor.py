"""The NumPy persistor: ndarray initial models, .npy checkpoints, and no pickles either way."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fl.client.constants import NPConstants
from fl.components.np_persistor import NPModelPersistor
from fl.config import HostPolicy
from fl.tensors import load_numpy, write_tensors


def _ctx(tmp_path: Path) -> SimpleNamespace:
    app = tmp_path / "job" / "app_server"
    app.mkdir(parents=True)
    run = tmp_path / "run"
    run.mkdir()
    return SimpleNamespace(run_dir=run, app_dir=app, policy=HostPolicy(), log=logging.getLogger("test"), job_id="j")


def test_initial_model_from_lists_is_float32_under_flares_key(tmp_path):
    path = NPModelPersistor(model=[[1, 2], [3, 4]]).load_initial(_ctx(tmp_path))
    params = load_numpy(path)
    assert list(params) == [NPConstants.NUMPY_KEY]
    assert params[NPConstants.NUMPY_KEY].dtype == np.float32
    np.testing.assert_array_equal(params[NPConstants.NUMPY_KEY], [[1, 2], [3, 4]])


def test_default_initial_model_is_flares_3x3(tmp_path):
    params = load_numpy(NPModelPersistor().load_initial(_ctx(tmp_path)))
    np.testing.assert_array_equal(params[NPConstants.NUMPY_KEY], np.arange(1, 10).reshape(3, 3))


def test_checkpoint_from_the_job_folder_and_global_model_written_as_npy(tmp_path):
    ctx = _ctx(tmp_path)
    np.save(ctx.app_dir.parent / "start.npy", np.full((2, 2), 7.0), allow_pickle=False)
    persistor = NPModelPersistor(source_ckpt_file_full_name="start.npy")
    path = persistor.load_initial(ctx)
    persistor.save_global(ctx, path, round=0)
    saved = np.load(persistor.global_model_path(ctx), allow_pickle=False)
    np.testing.assert_array_equal(saved, np.full((2, 2), 7.0, dtype=np.float32))
    assert persistor.global_model_path(ctx) == ctx.run_dir / "models" / "server.npy"


def test_a_pickled_checkpoint_is_refused_not_unpickled(tmp_path):
    ctx = _ctx(tmp_path)
    np.save(ctx.app_dir.parent / "evil.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"not a numeric \.npy file"):
        NPModelPersistor(source_ckpt_file_full_name="evil.npy").load_initial(ctx)


def test_a_checkpoint_outside_the_job_folder_is_refused(tmp_path):
    ctx = _ctx(tmp_path)
    np.save(tmp_path / "outside.npy", np.zeros(2), allow_pickle=False)
    with pytest.raises(ValueError, match="source_ckpt_file_full_name"):
        NPModelPersistor(source_ckpt_file_full_name=str(tmp_path / "outside.npy")).load_initial(ctx)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": [[1, 2], [3]]}, "not a rectangular array"),
        ({"model": [["a", "b"]]}, "holds"),
        ({"model_name": "../x.npy"}, "plain '.npy' file name"),
        ({"model_dir": "/abs"}, "relative folder"),
        ({"dtype": "object"}, "numeric numpy dtype"),
    ],
)
def test_bad_arguments_are_refused_when_the_job_is_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NPModelPersistor(**kwargs)


def test_a_model_with_other_tensors_is_not_saved_as_npy(tmp_path):
    ctx = _ctx(tmp_path)
    write_tensors(ctx.run_dir / "m.safetensors", {"w": np.zeros(2, dtype=np.float32)})
    with pytest.raises(ValueError, match="a NumPy model has one"):
        NPModelPersistor().save_global(ctx, ctx.run_dir / "m.safetensors", round=0)
