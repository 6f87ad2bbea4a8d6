"""Failures leave a true state: a full disk fails a job once and for all (admin, status.json and a
restarted server agree; checkpoints stay loadable), a progress write that fails alone does not fail
the job, a full disk is the server's error for an upload or a submit (never the site's), and the
temp files a kill left are swept at start, never a live server's."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import safetensors.numpy
import torch

from tests.integration.federation import Federation, wait_for

pytestmark = pytest.mark.timeout(600)
TMPFS_SIZE = "48m"
NUMEL = 256 * 1024  # a 1 MiB model of float32


def _ended(fed: Federation, job_id: str, timeout: float = 180) -> dict[str, Any]:
    return wait_for(  # type: ignore[no-any-return]
        lambda: (j := fed.job(job_id))["status"] in ("finished", "failed", "aborted") and j, timeout, "the job to end"
    )


def _submit(fed: Federation, job: Any, tmp_path: Path) -> str:
    proc = fed.fl("submit", str(job.export_job(tmp_path / "export")), "--json")
    assert proc.returncode == 0, proc.stderr
    job_id: str = json.loads(proc.stdout)["job_id"]
    return job_id


class PrivateTmpfs:
    """A tmpfs over ``folder`` in a mount namespace of its own, held by a sleeping process.

    Processes run in it through :attr:`enter` (nsenter, which execs: same pid); this process sees
    its files through ``/proc/<holder>/root``. Nothing is mounted in the test's own namespace.
    """

    def __init__(self, folder: Path, size: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        script = f"mount -t tmpfs -o size={size} fl-test-tmpfs '{folder}' && echo mounted && exec sleep 3600"
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script], stdout=subprocess.PIPE, text=True
        )
        assert self.holder.stdout is not None
        if self.holder.stdout.readline().strip() != "mounted":
            self.close()
            pytest.skip("unshare --mount with a tmpfs is not available here (needs root and mount namespaces)")
        self.enter = ["nsenter", f"--mount=/proc/{self.holder.pid}/ns/mnt", "--"]
        self.view = Path(f"/proc/{self.holder.pid}/root") / folder.relative_to("/")

    def fill(self) -> int:
        """Fill the tmpfs to its last byte; returns how many bytes that took."""
        written = 0
        with open(self.view / "filler", "wb", buffering=0) as f:
            for chunk in (1 << 20, 4096, 1):
                with contextlib.suppress(OSError):
                    while True:
                        written += f.write(b"\0" * chunk)
        probe = self.view / "probe"
        with pytest.raises(OSError) as full:
            probe.write_bytes(b"x")
        assert full.value.errno == errno.ENOSPC
        probe.unlink(missing_ok=True)
        return written

    def free(self) -> None:
        (self.view / "filler").unlink()

    def close(self) -> None:
        self.holder.kill()
        self.holder.wait(10)


@pytest.fixture
def server_tmpfs(tmp_path: Path) -> Iterator[PrivateTmpfs]:
    if os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("nsenter")):
        pytest.skip("unshare and nsenter as root are needed to give the server a small tmpfs of its own")
    disk = PrivateTmpfs(tmp_path / "server", TMPFS_SIZE)
    yield disk
    disk.close()


def test_a_full_disk_fails_the_job_once_and_a_restarted_server_agrees(federation, server_tmpfs, tmp_path, make_job):
    fed, disk = federation, server_tmpfs
    server = fed.start_server(prefix=disk.enter)
    for name in ("site-1", "site-2"):
        fed.start_site(name)
    fed.wait_sites(["site-1", "site-2"])
    # The round after the disk fills waits for results the server cannot store: until its deadline.
    job = make_job(rounds=8, numel=NUMEL, script_args={s: "--sleep 1" for s in ("site-1", "site-2")}, round_timeout=40)
    job_id = _submit(fed, job, tmp_path)
    job_dir = disk.view / "jobs" / job_id
    state = job_dir / "state.json"
    wait_for(lambda: state.exists() and json.loads(state.read_text())["next_round"] >= 2, 180, "round 2 to complete")
    filled = disk.fill()
    print(f"filled the server's tmpfs with {filled / 2**20:.1f} MiB")

    failed = _ended(fed, job_id)
    assert failed["status"] == "failed", failed
    assert "No space left on device" in failed["message"], failed["message"]
    assert (job_dir / "ended.failed").exists()
    at_failure = json.loads(state.read_text())
    server.kill9()

    disk.free()  # the operator makes room, then restarts the server
    restarted = fed.start_server(prefix=disk.enter)
    after = fed.job(job_id)
    assert after["status"] == "failed", after
    assert json.loads((job_dir / "status.json").read_text())["status"] == "failed"
    assert "will resume" not in restarted.log() and "resuming at round" not in restarted.log()

    # The checkpoints written before the disk filled are intact and loadable.
    assert json.loads(state.read_text()) == at_failure
    rounds_done = at_failure["next_round"]
    latest = safetensors.numpy.load_file(str(job_dir / "models" / at_failure["model_file"]))
    assert (latest["weight"] == float(rounds_done)).all()
    pt = torch.load(job_dir / "FL_global_model.pt", weights_only=True)
    assert pt["round"] in (rounds_done - 1, rounds_done - 2)  # the .pt is written in the background
    assert torch.equal(pt["model"]["weight"], torch.full((NUMEL,), float(pt["round"] + 1)))
    assert list(job_dir.rglob(".*.tmp")) == []


def test_status_json_that_cannot_be_written_does_not_fail_the_job(federation, tmp_path, make_job):
    fed = federation
    fed.start_server()
    for name in ("site-1", "site-2"):
        fed.start_site(name)
    fed.wait_sites(["site-1", "site-2"])
    job_id = _submit(fed, make_job(rounds=4, script_args={s: "--sleep 1" for s in ("site-1", "site-2")}), tmp_path)
    job_dir = fed.root / "server" / "jobs" / job_id
    state = job_dir / "state.json"
    wait_for(lambda: state.exists(), 120, "round 1 to complete")
    status = job_dir / "status.json"
    while not status.is_dir():  # a folder in its place: every write of status.json fails (rename onto a folder)
        with contextlib.suppress(FileNotFoundError, FileExistsError):
            status.unlink()
            status.mkdir()
    assert fed.server is not None
    fed.server.wait_for_log("cannot write status.json", 60)
    wait_for(lambda: json.loads(state.read_text())["next_round"] >= 3, 120, "two more rounds")
    status.rmdir()  # writable again: the next progress write puts the record back
    final = _ended(fed, job_id)
    assert final["status"] == "finished", final["message"]
    assert json.loads(status.read_text())["status"] == "finished"
    assert fed.server.log().count("cannot write status.json") == 1  # logged once, not once a write
    assert torch.equal(
        torch.load(job_dir / "FL_global_model.pt", weights_only=True)["model"]["weight"], torch.full((16,), 4.0)
    )


def test_temp_files_a_kill_left_are_swept_at_start_and_a_live_servers_are_not(federation, tmp_path):
    fed = federation
    workspace = fed.root / "server"
    job_dir = workspace / "jobs" / "0f0e0d0c-job"
    (job_dir / "job").mkdir(parents=True)
    left = [
        job_dir / ".FL_global_model.pt.0123456789ab.tmp",
        job_dir / "models" / ".global-r0003.safetensors.a1b2c3d4e5f6.tmp",
    ]
    kept = [job_dir / "job" / ".data.0123456789ab.tmp", job_dir / "notes.tmp", job_dir / ".cache.tmp"]
    for path in left + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
    server = fed.start_server()
    assert [p for p in left if p.exists()] == [], server.log()
    assert [p for p in kept if not p.exists()] == []
    assert "removed 2 temp file(s)" in server.log()

    # While a server runs, another on its workspace is refused before it touches anything.
    live = job_dir / ".status.json.fedcba987654.tmp"
    live.write_bytes(b"being written")
    second = subprocess.run(
        [sys.executable, "-m", "fl", "server", "--workspace", str(workspace), "--insecure", "--host", "127.0.0.1",
         "--port", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert second.returncode != 0 and "another fl server uses the workspace" in second.stderr, second.stderr
    assert server.proc is not None and f"(pid {server.proc.pid})" in second.stderr
    assert live.exists()


def test_a_full_disk_is_the_servers_error_for_an_upload_and_a_submit_and_the_upload_resumes(
    server_tmpfs, tmp_path, make_job
):
    import grpc

    from fl.tensors import load_numpy, write_tensors
    from tests.integration.adversary import Adversary, status_code

    disk = server_tmpfs
    fed = Federation(tmp_path, ["site-1"], heartbeat_timeout=300)  # the adversary heartbeats only when it acts
    server = fed.start_server(prefix=disk.enter)
    with contextlib.ExitStack() as cleanup, Adversary(fed, "site-1") as site:
        cleanup.callback(fed.stop)
        site.register()
        job_id = _submit(fed, make_job(sites=1, rounds=1, numel=NUMEL), tmp_path)
        task = site.poll_for("task")
        (tmp_path / "received.safetensors").write_bytes(site.download(task.model))
        write_tensors(
            tmp_path / "update.safetensors", {"weight": load_numpy(tmp_path / "received.safetensors")["weight"] + 1}
        )
        update = (tmp_path / "update.safetensors").read_bytes()
        disk.fill()

        with pytest.raises(grpc.RpcError) as full:
            site.upload(task, update, upload_id="full-disk")
        assert status_code(full.value) == grpc.StatusCode.RESOURCE_EXHAUSTED, full.value
        assert full.value.details() == "the server cannot store the upload: No space left on device"
        server.wait_for_log(r"site-1: the server cannot store the upload: No space left on device", 30)
        held = site.upload_status("full-disk").received

        refused = fed.fl("submit", str(make_job(name="late", sites=1).export_job(tmp_path / "late")))
        assert refused.returncode != 0 and "the server cannot store the job: No space left on device" in refused.stderr
        assert list((disk.view / "staging").iterdir()) == []

        disk.free()  # room again: the site's retry resumes from what the server holds, and counts
        _, reply = site.upload(task, update, upload_id="full-disk", offset=held)
        assert reply.complete
        assert site.submit(task, upload_id="full-disk").accepted
        final = _ended(fed, job_id)
        assert final["status"] == "finished", final["message"]
