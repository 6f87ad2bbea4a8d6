"""bench/measure.py's tmpfs counter: the bytes of fl's /dev/shm folders that belong to the measured tree."""

from __future__ import annotations

from pathlib import Path

from bench import measure


def sim_folder(shm: Path, name: str, owner: int | str, files: dict[str, int]) -> Path:
    folder = shm / name
    (folder / "site-1").mkdir(parents=True)
    (folder / measure.FL_SIM_OWNER).write_text(f"{owner}\n")
    for rel, size in files.items():
        (folder / "site-1" / rel).write_bytes(b"\x01" * size)
    return folder


def test_only_folders_owned_by_the_tree_count(tmp_path: Path) -> None:
    sim_folder(tmp_path, "fl-sim-mine", 4242, {"model.safetensors": 1 << 20, "result.safetensors": 1 << 19})
    sim_folder(tmp_path, "fl-sim-other", 999_999, {"model.safetensors": 1 << 20})  # another run's
    sim_folder(tmp_path, "not-fl", 4242, {"model.safetensors": 1 << 20})  # not fl's
    sim_folder(tmp_path, "fl-sim-garbled", "not a pid", {"model.safetensors": 1 << 20})
    counted = measure.fl_sim_tmpfs_bytes({1, 4242}, shm=str(tmp_path))
    assert (1 << 20) + (1 << 19) <= counted < (1 << 20) + (1 << 19) + (1 << 16)  # allocated blocks, a few extra
    assert measure.fl_sim_tmpfs_bytes({1}, shm=str(tmp_path)) == 0


def test_sparse_files_count_what_they_hold_not_their_length(tmp_path: Path) -> None:
    folder = sim_folder(tmp_path, "fl-sim-sparse", 7, {})
    with open(folder / "site-1" / "hole.bin", "wb") as f:
        f.truncate(1 << 30)  # 1 GiB long, nothing written
    assert measure.fl_sim_tmpfs_bytes({7}, shm=str(tmp_path)) < 1 << 20


def test_a_failing_counter_is_reported_and_skipped(monkeypatch, capsys) -> None:
    def broken(pids: set[int]) -> int:
        raise OSError("gone")

    monkeypatch.setattr(measure, "TMPFS_COUNTERS", [broken, lambda pids: 5])
    assert measure.tmpfs_bytes({1}) == 5
    assert "gone" in capsys.readouterr().err
