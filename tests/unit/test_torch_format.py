"""Checkpoints written without torch load in torch exactly like torch.save's."""

from __future__ import annotations

import collections

import pytest
import torch

from fl.components.torch_format import write_pt
from fl.tensors import iter_blocks, open_tensors, write_tensors


@pytest.mark.parametrize("mmap", [False, True])
def test_checkpoint_loads_with_weights_only_and_matches_bit_for_bit(tmp_path, mmap):
    state = {
        "conv.weight": torch.randn(6, 3, 5, 5),
        "half": torch.randn(5).half(),
        "bf": torch.randn(2, 2).bfloat16(),
        "steps": torch.tensor(7),
        "mask": torch.tensor([True, False]),
        "empty": torch.zeros(0, 3),
        "double": torch.randn(2).double(),
        "int8": torch.tensor([1, -2], dtype=torch.int8),
        "big_ids": torch.tensor([2**40], dtype=torch.int64),
    }
    write_tensors(tmp_path / "m.safetensors", state)
    f, layout, offset = open_tensors(tmp_path / "m.safetensors")
    with f:
        write_pt(
            tmp_path / "m.pt",
            layout,
            lambda spec: (block.tobytes() for _, block in iter_blocks(f, spec, offset, block_bytes=64)),
            {"round": 3, "model_version": 4, "job_id": "abc", "metric": 0.5, "note": None, "final": True},
        )
    obj = torch.load(tmp_path / "m.pt", weights_only=True, mmap=mmap)
    assert {k: obj[k] for k in ("round", "model_version", "job_id", "metric", "note", "final")} == {
        "round": 3,
        "model_version": 4,
        "job_id": "abc",
        "metric": 0.5,
        "note": None,
        "final": True,
    }
    assert type(obj["model"]) is collections.OrderedDict and list(obj["model"]) == list(state)
    for name, value in state.items():
        loaded = obj["model"][name]
        assert loaded.dtype == value.dtype and loaded.shape == value.shape and torch.equal(loaded, value), name
        assert loaded.is_contiguous()


def test_unsupported_metadata_is_refused_before_anything_is_written(tmp_path):
    layout = write_tensors(tmp_path / "m.safetensors", {"w": torch.zeros(2)})
    with pytest.raises(TypeError, match="checkpoint metadata"):
        write_pt(tmp_path / "m.pt", layout, lambda spec: [b"\0" * 8], {"bad": [1, 2]})
    assert not (tmp_path / "m.pt").exists()
