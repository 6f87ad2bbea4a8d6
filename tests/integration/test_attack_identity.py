"""Identity before state: a site calling with another site's session id changes nothing.

Every RPC that names a session checks that the calling certificate is that session's site before
it touches the registry (last_seen, running_jobs, connected) or anything else (queued directives,
uploads, results, job state).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from fl.tensors import write_tensors
from tests.integration.adversary import Adversary, status_code
from tests.integration.federation import Federation, wait_for

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    # Adversaries heartbeat only when told to: a long timeout keeps them from being declared lost.
    fed = Federation(tmp_path, ["site-1", "site-2"], heartbeat_timeout=300)
    yield fed
    fed.stop()


def _site_view(fed: Federation, name: str) -> dict[str, Any]:
    """What ``fl sites --json`` says of ``name``."""
    sites: dict[str, dict[str, Any]] = {s["name"]: s for s in fed.fl_json("sites")}
    return sites[name]


def _refused(call: Callable[[], Any]) -> str:
    """Run ``call``, which must fail with PERMISSION_DENIED; returns the server's message."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert status_code(info.value) == grpc.StatusCode.PERMISSION_DENIED, info.value
    return str(info.value.details())  # type: ignore[attr-defined]


def test_calls_with_another_sites_session_are_refused_and_change_nothing(federation, tmp_path, make_job):
    fed = federation
    fed.start_server()
    victim, attacker = Adversary(fed, "site-1"), Adversary(fed, "site-2")
    victim.register(running_jobs=["job-of-site-1"])
    attacker.register()
    job = make_job(sites=2, rounds=1)
    job_id = json.loads(fed.fl("submit", str(job.export_job(tmp_path / "export")), "--json").stdout)["job_id"]
    task = attacker.poll_for("task")  # the attacker's own task, and its model blob
    update = tmp_path / "update.safetensors"
    write_tensors(update, {"weight": np.full(16, 1e6, np.float32)})
    before = _site_view(fed, "site-1")
    time.sleep(1.5)  # any touch of site-1's session would now show in last_seen

    thief = Adversary(fed, "site-2")  # site-2's certificate, site-1's session id
    thief.session_id = victim.session_id
    admin = Adversary(fed, "admin")
    admin.session_id = victim.session_id
    messages = [
        _refused(lambda: thief.heartbeat(running_jobs=["forged-job"])),
        _refused(lambda: admin.heartbeat(running_jobs=["forged-job"])),
        _refused(lambda: thief.poll(0.5)),
        _refused(lambda: thief.upload_status("any-upload")),
        _refused(lambda: thief.upload(task, update.read_bytes())),
        _refused(lambda: thief.submit(task, meta={"NUM_STEPS_CURRENT_ROUND": 1})),
        _refused(lambda: thief.report(job_id, logs=["forged line"], job_state="failed", message="forged")),
        _refused(lambda: thief.download(task.model)),
    ]
    after = _site_view(fed, "site-1")
    assert after == before, (before, after)
    assert after["running_jobs"] == ["job-of-site-1"]
    assert all("used with the session of 'site-1'" in m for m in messages), messages
    assert "certificate of 'site-2' (role 'site')" in messages[0]
    assert "certificate of 'admin' (role 'admin')" in messages[1]
    # site-1's directives are still its own: the refused poll took nothing from its queue.
    assert victim.poll_for("start_job").job_id == job_id
    victim_task = victim.poll_for("task")
    assert victim_task.job_id == job_id
    # The forged report neither failed site-1 nor wrote to its log; the attacker's task is still pending.
    assert fed.job(job_id)["status"] == "running"
    log = fed.root / "server" / "jobs" / job_id / "logs" / "site-1.log"
    assert not log.exists() or "forged" not in log.read_text()
    for site, t in ((attacker, task), (victim, victim_task)):
        upload_id, reply = site.upload(t, update.read_bytes())
        assert reply.complete
        assert site.submit(t, upload_id=upload_id).accepted
    wait_for(lambda: fed.job(job_id)["status"] == "finished", 120, "the job to finish")
    for a in (victim, attacker, thief, admin):
        a.close()
