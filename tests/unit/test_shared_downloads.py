"""SharedDownloads: the simulated sites of one machine download a model once and link it."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from fl.site.shared_downloads import SharedDownloads

BLOB = b"model bytes " * 1000
CHECKSUM = "xxh3-128:0123456789abcdef"


def _downloader(dest: Path, calls: list[Path], data: bytes = BLOB, delay: float = 0.0):  # type: ignore[no-untyped-def]
    def download() -> None:
        calls.append(dest)
        time.sleep(delay)
        dest.write_bytes(data)

    return download


def test_second_site_links_the_first_sites_file_instead_of_downloading(tmp_path: Path) -> None:
    shared = SharedDownloads(tmp_path / "index")
    calls: list[Path] = []
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert shared.fetch("xxh3-128:616263313233", len(BLOB), a, _downloader(a, calls)) is False
    assert shared.fetch("xxh3-128:616263313233", len(BLOB), b, _downloader(b, calls)) is True
    assert calls == [a]
    assert b.read_bytes() == BLOB
    assert os.stat(a).st_ino == os.stat(b).st_ino  # one copy in memory
    a.unlink()  # each site removes its own link; the other's file stays whole
    assert b.read_bytes() == BLOB


def test_sites_downloading_at_once_make_one_download(tmp_path: Path) -> None:
    shared = SharedDownloads(tmp_path / "index")
    calls: list[Path] = []
    results: dict[int, bool] = {}
    dests = [tmp_path / f"site-{i}.safetensors" for i in range(4)]

    def site(i: int) -> None:
        results[i] = shared.fetch("xxh3-128:633066666565", len(BLOB), dests[i], _downloader(dests[i], calls, delay=0.2))

    threads = [threading.Thread(target=site, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(calls) == 1
    assert sorted(results.values()) == [False, True, True, True]
    assert all(d.read_bytes() == BLOB for d in dests)


def test_a_file_already_removed_is_downloaded_again(tmp_path: Path) -> None:
    shared = SharedDownloads(tmp_path / "index")
    calls: list[Path] = []
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    shared.fetch("xxh3-128:616263313233", len(BLOB), a, _downloader(a, calls))
    a.unlink()  # the first site's script loaded and removed it
    assert shared.fetch("xxh3-128:616263313233", len(BLOB), b, _downloader(b, calls)) is False
    assert calls == [a, b]
    assert b.read_bytes() == BLOB


def test_a_failed_first_download_lets_the_next_site_download_itself(tmp_path: Path) -> None:
    shared = SharedDownloads(tmp_path / "index")
    calls: list[Path] = []
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"

    def broken() -> None:
        raise RuntimeError("connection lost")

    with pytest.raises(RuntimeError, match="connection lost"):
        shared.fetch("xxh3-128:616263313233", len(BLOB), a, broken)
    assert shared.fetch("xxh3-128:616263313233", len(BLOB), b, _downloader(b, calls)) is False
    assert calls == [b]


def test_a_file_of_another_size_is_not_taken(tmp_path: Path) -> None:
    shared = SharedDownloads(tmp_path / "index")
    calls: list[Path] = []
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    shared.fetch("xxh3-128:616263313233", len(BLOB), a, _downloader(a, calls, data=b"short"))
    assert shared.fetch("xxh3-128:616263313233", len(BLOB), b, _downloader(b, calls)) is False
    assert b.read_bytes() == BLOB
    assert os.stat(a).st_ino != os.stat(b).st_ino


def test_a_new_model_forgets_the_previous_ones_copy(tmp_path: Path) -> None:
    shared = SharedDownloads(tmp_path / "index")
    calls: list[Path] = []
    paths = [tmp_path / f"{i}.safetensors" for i in range(3)]
    shared.fetch("xxh3-128:726f756e6431", len(BLOB), paths[0], _downloader(paths[0], calls))
    shared.fetch("xxh3-128:726f756e6432", len(BLOB), paths[1], _downloader(paths[1], calls))
    assert not (tmp_path / "index" / f"xxh3-128-{b'round1'.hex()}.src").exists()
    assert shared.fetch("xxh3-128:726f756e6431", len(BLOB), paths[2], _downloader(paths[2], calls)) is False
    assert calls == paths


def test_a_checksum_that_is_no_plain_name_is_downloaded_without_sharing(tmp_path: Path) -> None:
    shared = SharedDownloads(tmp_path / "index")
    calls: list[Path] = []
    a = tmp_path / "a.safetensors"
    assert shared.fetch("../../etc/x", len(BLOB), a, _downloader(a, calls)) is False
    assert calls == [a]
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == []


def test_an_app_is_unpacked_once_for_the_sites_that_get_the_same_archive(tmp_path: Path) -> None:
    shared = SharedDownloads(tmp_path / "index")
    calls: list[Path] = []

    def unpack(folder: Path) -> None:
        calls.append(folder)
        time.sleep(0.05)  # the other sites arrive meanwhile and wait
        (folder / "custom").mkdir(parents=True)
        (folder / "custom" / "client.py").write_text("print('hi')\n")

    got: list[Path | None] = []
    threads = [threading.Thread(target=lambda: got.append(shared.unpacked(CHECKSUM, unpack))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(got)) == 1 and got[0] is not None
    assert (got[0] / "custom" / "client.py").read_text() == "print('hi')\n"
    assert [p.name for p in got[0].parent.iterdir()] == [got[0].name], "a partial folder was left"
    assert shared.unpacked("../etc", unpack) is None  # no folder named by such a checksum


def test_an_unpack_that_fails_leaves_nothing_and_the_next_site_unpacks_again(tmp_path: Path) -> None:
    shared = SharedDownloads(tmp_path / "index")

    def broken(folder: Path) -> None:
        folder.mkdir(parents=True)
        (folder / "half").write_text("x")
        raise OSError("connection cut")

    with pytest.raises(OSError, match="connection cut"):
        shared.unpacked(CHECKSUM, broken)
    assert list((tmp_path / "index" / "apps").iterdir()) == []
    folder = shared.unpacked(CHECKSUM, lambda f: f.mkdir(parents=True))
    assert folder is not None and folder.is_dir()
