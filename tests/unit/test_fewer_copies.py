"""The copies a round no longer makes keep their results: mapped block reads, cache-sized folds, linked best model."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest

from fl.tensors import Layout, LayoutError, iter_blocks, open_tensors, write_tensors
from fl.workflows.aggregation import CACHE_BLOCK_BYTES, WeightedAverage, _fold_shares


def _blocks(f: object, spec: object, offset: int, block_bytes: int) -> np.ndarray:
    return np.concatenate([b.copy() for _, b in iter_blocks(f, spec, offset, block_bytes=block_bytes)])  # type: ignore[arg-type]


def test_mapped_blocks_equal_read_blocks_at_unaligned_offsets(tmp_path):
    path = tmp_path / "m.safetensors"
    arrays = {"a": np.arange(3, dtype=np.int8), "w": np.arange(300_001, dtype=np.float32), "z": np.ones(7, np.float64)}
    write_tensors(path, arrays)
    f, layout, offset = open_tensors(path)
    with f:
        data = io.BytesIO(path.read_bytes())  # no file descriptor: read into a buffer
        for spec in layout.tensors:
            for block_bytes in (4096 * 3 + 8, 1 << 20):
                mapped = _blocks(f, spec, offset, block_bytes)
                read = _blocks(data, spec, offset, block_bytes)
                assert mapped.tobytes() == read.tobytes() == arrays[spec.name].tobytes()


def test_a_mapped_block_is_writable_without_changing_the_file(tmp_path):
    path = tmp_path / "m.safetensors"
    write_tensors(path, {"w": np.zeros(1000, np.float32)})
    f, layout, offset = open_tensors(path)
    with f:
        for _, block in iter_blocks(f, layout.tensors[0], offset):
            block += 1  # copy-on-write: the caller's own pages
    f, layout, offset = open_tensors(path)
    with f:
        assert not any(block.any() for _, block in iter_blocks(f, layout.tensors[0], offset))


def test_a_file_cut_short_after_opening_is_refused_not_a_crash(tmp_path):
    path = tmp_path / "m.safetensors"
    write_tensors(path, {"w": np.zeros(1 << 20, np.float32)})
    f, layout, offset = open_tensors(path)
    with f:
        os.truncate(path, offset + 1000)
        with pytest.raises(LayoutError, match="file ends inside its data"):
            for _ in iter_blocks(f, layout.tensors[0], offset):
                pass


def test_a_fold_in_cache_sized_slices_is_bit_for_bit_the_whole_array_formula():
    rng = np.random.default_rng(7)
    numel = 3 * CACHE_BLOCK_BYTES // 4 + 123  # several slices and an uneven tail
    first, second = (rng.standard_normal(numel).astype(np.float32) for _ in range(2))
    average = WeightedAverage(Layout.build([("w", "F32", (numel,))]))
    average.add_arrays({"w": first}, 3.0)
    average.add_arrays({"w": second}, 5.0)
    keep, share = _fold_shares(5.0, 3.0, np.dtype(np.float32))
    expected = first * keep + second * share  # numpy, elementwise, the same float32 operations
    assert average.finalize()["w"].tobytes() == expected.tobytes()


def test_the_best_model_shares_the_global_checkpoint_file_and_keeps_it_when_the_next_round_writes(tmp_path):
    from types import SimpleNamespace

    import torch

    from fl.components.persistor import PTFileModelPersistor
    from fl.log import adapter

    ctx = SimpleNamespace(run_dir=tmp_path, job_id="job-1", log=adapter("fl.test"))
    persistor = PTFileModelPersistor(model="src.net.Net")
    persistor.handle_event("round_started", {"round": 0, "num_rounds": 2}, ctx)
    round_1, round_2 = tmp_path / "r1.safetensors", tmp_path / "r2.safetensors"
    write_tensors(round_1, {"w": np.full(3, 1.0, np.float32)})
    write_tensors(round_2, {"w": np.full(3, 2.0, np.float32)})
    persistor.save_global(ctx, round_1, round=0)
    persistor.save_best(ctx, round_1, model_version=1, metric=0.9)
    best, current = tmp_path / "best_FL_global_model.pt", tmp_path / "FL_global_model.pt"
    assert os.stat(best).st_ino == os.stat(current).st_ino  # one file, no copy
    persistor.save_global(ctx, round_2, round=1)
    assert torch.equal(torch.load(best, weights_only=True)["model"]["w"], torch.full((3,), 1.0))
    assert torch.equal(torch.load(current, weights_only=True)["model"]["w"], torch.full((3,), 2.0))
