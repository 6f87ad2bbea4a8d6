"""safetensors on the wire: round trips, compatibility with the library, and refusal of bad data."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as st_load_numpy
from safetensors.numpy import save_file as st_save_numpy

from fl.tensors import Layout, LayoutError, StreamChecker, load_numpy, load_torch, open_tensors, write_tensors
from fl.tensors.io import iter_blocks


def sample_params() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "conv.weight": torch.randn(6, 3, 5, 5),
        "conv.bias": torch.randn(6),
        "half": torch.randn(7).half(),
        "bf": torch.randn(9).to(torch.bfloat16),
        "steps": torch.tensor(12, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3),
    }


def test_torch_round_trip_is_bit_exact(tmp_path):
    params = sample_params()
    write_tensors(tmp_path / "m.safetensors", params)
    back = load_torch(tmp_path / "m.safetensors")
    assert set(back) == set(params)
    for name, value in params.items():
        assert back[name].dtype == value.dtype and back[name].shape == value.shape
        assert torch.equal(back[name], value), name


def test_files_written_by_us_load_in_the_safetensors_library_and_back(tmp_path):
    arrays = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([1, 2, 3], dtype=np.int64)}
    write_tensors(tmp_path / "ours.safetensors", arrays, {"round": "3"})
    theirs = st_load_numpy(str(tmp_path / "ours.safetensors"))
    np.testing.assert_array_equal(theirs["a"], arrays["a"])
    st_save_numpy(arrays, str(tmp_path / "lib.safetensors"))
    ours = load_numpy(tmp_path / "lib.safetensors")
    np.testing.assert_array_equal(ours["b"], arrays["b"])


def test_blocks_cover_a_tensor_exactly_with_bounded_size(tmp_path):
    values = np.arange(1000, dtype=np.float32)
    write_tensors(tmp_path / "m.safetensors", {"x": values})
    f, layout, offset = open_tensors(tmp_path / "m.safetensors")
    with f:
        pieces = [(start, block.copy()) for start, block in iter_blocks(f, layout.tensors[0], offset, block_bytes=256)]
    assert all(block.nbytes <= 256 for _, block in pieces)
    np.testing.assert_array_equal(np.concatenate([b for _, b in pieces]), values)
    assert [s for s, _ in pieces] == list(range(0, 1000, 64))


def test_write_is_atomic_when_a_param_is_bad(tmp_path):
    target = tmp_path / "m.safetensors"
    write_tensors(target, {"x": np.ones(3, np.float32)})
    with pytest.raises(LayoutError, match="params must be numpy arrays or torch tensors"):
        write_tensors(target, {"x": np.ones(3, np.float32), "y": [1, 2, 3]})
    np.testing.assert_array_equal(load_numpy(target)["x"], np.ones(3, np.float32))
    assert list(tmp_path.iterdir()) == [target]


def _stream(params) -> tuple[bytes, Layout]:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        layout = write_tensors(Path(d) / "x.safetensors", params)
        return (Path(d) / "x.safetensors").read_bytes(), layout


def _feed(data: bytes, expected: Layout | None, piece: int) -> Layout:
    checker = StreamChecker(expected)
    for i in range(0, len(data), piece):
        checker.feed(data[i : i + piece])
    return checker.finish()


@pytest.mark.parametrize("piece", [1, 3, 7, 64, 1 << 20])
def test_stream_checker_accepts_a_good_update_in_any_piece_size(piece):
    data, layout = _stream(sample_params())
    assert _feed(data, layout, piece).names == layout.names


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: p.update({"conv.bias": torch.randn(7)}), "conv.bias: shape \\[7\\], expected \\[6\\]"),
        (lambda p: p.update({"conv.bias": torch.randn(6).double()}), "conv.bias: dtype F64, expected F32"),
        (lambda p: p.pop("conv.bias"), "missing tensors 'conv.bias'"),
        (lambda p: p.update({"extra": torch.zeros(1)}), "unexpected tensors 'extra'"),
    ],
)
def test_stream_checker_refuses_wrong_names_shapes_and_dtypes(change, message):
    expected = _stream(sample_params())[1]
    params = sample_params()
    change(params)
    data, _ = _stream(params)
    with pytest.raises(LayoutError, match=message):
        _feed(data, expected, 4096)


@pytest.mark.parametrize("name", ["conv.weight", "half", "bf"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_stream_checker_refuses_non_finite_values(name, bad):
    params = sample_params()
    expected = _stream(params)[1]
    params[name] = params[name].clone()
    params[name].view(-1)[2] = bad
    data, _ = _stream(params)
    with pytest.raises(LayoutError, match=f"tensor '{name}' holds a non-finite value"):
        _feed(data, expected, 5)


def test_stream_checker_accepts_large_finite_values_whose_sum_overflows():
    params = {"x": torch.full((4,), 3e38)}
    data, layout = _stream(params)
    _feed(data, layout, 1024)


def test_stream_checker_refuses_truncated_and_oversized_streams():
    data, layout = _stream(sample_params())
    with pytest.raises(LayoutError, match="stream ended after"):
        _feed(data[:-3], layout, 100)
    with pytest.raises(LayoutError, match="more bytes than its header describes"):
        _feed(data + b"\0" * 8, layout, 100)


@pytest.mark.parametrize(
    "header",
    [
        b"not json",
        json.dumps({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}).encode(),  # wrong size
        json.dumps({"x": {"dtype": "Q8", "shape": [1], "data_offsets": [0, 1]}}).encode(),  # unknown dtype
        json.dumps({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}).encode(),  # hole
        json.dumps({"": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode(),  # empty name
        json.dumps([1, 2]).encode(),
    ],
)
def test_malformed_headers_are_refused(header):
    data = struct.pack("<Q", len(header)) + header + b"\0" * 8
    with pytest.raises(LayoutError):
        _feed(data, None, 16)


def test_header_length_is_bounded():
    with pytest.raises(LayoutError, match="out of bounds"):
        StreamChecker(None).feed(struct.pack("<Q", 1 << 40))
