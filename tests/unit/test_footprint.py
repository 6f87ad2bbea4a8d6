"""fl.footprint.tmpfs_bytes: the bytes a run's files hold in /dev/shm, counted once, per run."""

from __future__ import annotations

import mmap
import os
import shutil
from pathlib import Path

from fl import simulator
from fl.footprint import tmpfs_bytes
from fl.tensors import load_torch, write_tensors

MiB = 1024 * 1024


def _file(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\1" * size)
    return path


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_counts_the_files_of_the_simulator_folder_a_process_made(tmp_path):
    memory = simulator._memory_folder(tmp_path)  # the simulator's own folder, with its owner file
    assert memory is not None
    folder, fd = memory
    try:
        model = _file(folder / "site-1" / "job" / "task-1.safetensors", 3 * MiB)
        expected = _allocated(model) + _allocated(folder / ".owner")
        assert tmpfs_bytes([os.getpid()], shm=tmp_path) == expected
        assert tmpfs_bytes(None, shm=tmp_path) == expected
        assert tmpfs_bytes([os.getpid() + 1_000_000], shm=tmp_path) == 0  # another run's pids: not this folder
    finally:
        os.close(fd)
        shutil.rmtree(folder)


def test_counts_a_removed_file_once_while_it_is_open_or_mapped(tmp_path):
    path = _file(tmp_path / "held.bin", 2 * MiB)
    size = _allocated(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        assert tmpfs_bytes([os.getpid()], shm=tmp_path) == 0  # not removed, not in a simulator folder
        path.unlink()
        assert tmpfs_bytes([os.getpid()], shm=tmp_path) == size  # open and mapped: counted once
        f.close()
        assert tmpfs_bytes([os.getpid()], shm=tmp_path) == 2 * MiB  # mapped only: the extent mapped
        assert mapped[0] == 1
    assert tmpfs_bytes([os.getpid()], shm=tmp_path) == 0


def test_a_loaded_torch_model_holds_no_pages_of_its_removed_file(tmp_path):
    import torch

    path = tmp_path / "task-1.safetensors"
    write_tensors(path, {"w": torch.ones(MiB), "b": torch.zeros(3, dtype=torch.bfloat16)})
    params = load_torch(path)
    path.unlink()
    assert tmpfs_bytes([os.getpid()], shm=tmp_path) == 0  # read into memory, not mapped
    params["w"] += 1  # its own, writable memory
    assert torch.equal(params["w"], torch.full((MiB,), 2.0))
    assert params["b"].dtype == torch.bfloat16 and params["b"].shape == (3,)
