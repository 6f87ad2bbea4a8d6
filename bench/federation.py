"""Figures of a production federation on this machine: daemons with mutual TLS on loopback.

    python -m bench.federation          # prints one JSON line

Provisions TLS material, starts `fl server` and two `fl site` daemons, then measures:

- from `fl submit` (the command's start) to the first round starting on the server, and to the
  first task reaching a site;
- seconds per round of a tiny job (hello-pt's CNN, 64 samples per site, 6 rounds);
- after `kill -9` of the server mid-job and a restart on the same workspace: the time until the
  job runs its next round, and whether it finishes with every round applied exactly once.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.integration.federation import Federation, wait_for  # noqa: E402

LINE_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})")


def _times(log: str, pattern: str) -> list[float]:
    """Unix times (second resolution) of the log lines matching ``pattern``."""
    out = []
    for line in log.splitlines():
        m = LINE_TIME.match(line)
        if m and re.search(pattern, line):
            out.append(datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp())
    return out


def _export(out: Path, rounds: int) -> Path:
    subprocess.run(
        [sys.executable, str(REPO_ROOT / "jobs/hello-pt/job.py"), "--export-dir", str(out), "--dataset", "synthetic",
         "--train-size", "64", "--test-size", "64", "--epochs", "1", "--num-rounds", str(rounds)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return out / "hello-pt"


def main() -> int:
    result: dict[str, Any] = {"scenario": "federation", "status": "ok"}
    with tempfile.TemporaryDirectory(prefix="fl-bench-federation-") as tmp:
        root = Path(tmp)
        fed = Federation(root, ["site-1", "site-2"], heartbeat_timeout=10)
        try:
            server = fed.start_server()
            sites = [fed.start_site(n) for n in ("site-1", "site-2")]
            fed.wait_sites(["site-1", "site-2"])
            job_dir = _export(root / "export", 6)

            submitted = time.time()
            proc = fed.fl("submit", str(job_dir), "--json")
            job_id = json.loads(proc.stdout)["job_id"]
            first_round = wait_for(
                lambda: _times(server.log(), r"round=1/\d+\] train task sent"), 120, "the first round to start"
            )[0]
            first_task = min(
                wait_for(lambda site=site: _times(site.log(), r"task train received"), 120, "a task")[0]
                for site in sites
            )
            result["submit_to_first_round_s"] = round(first_round - submitted, 1)
            result["submit_to_first_task_at_a_site_s"] = round(first_task - submitted, 1)
            final = wait_for(lambda: (j := fed.job(job_id))["status"] in ("finished", "failed") and j, 300, "job 1")
            log = server.log()
            done = _times(log, r"round \d+/6 done")
            result["tiny_job_status"] = final["status"]
            result["tiny_job_seconds_per_round"] = round((done[-1] - done[0]) / max(len(done) - 1, 1), 2)
            result["tiny_job_submit_to_finished_s"] = round(final["ended"] - submitted, 1)

            # Resume after kill -9 of the server mid-job.
            job2 = json.loads(fed.fl("submit", str(_export(root / "export2", 6)), "--json").stdout)["job_id"]
            state = fed.root / "server" / "jobs" / job2 / "state.json"
            wait_for(lambda: state.exists() and json.loads(state.read_text())["next_round"] >= 2, 120, "round 2")
            server.kill9()
            killed = time.time()
            restarted = fed.start_server()
            resumed = wait_for(lambda: _times(restarted.log(), r"train task sent"), 180, "the resumed round")[0]
            final2 = wait_for(lambda: (j := fed.job(job2))["status"] in ("finished", "failed") and j, 300, "job 2")
            result["resume_after_server_kill_s"] = round(resumed - killed, 1)
            result["resumed_job_status"] = final2["status"]
            result["resumed_job_rounds"] = final2["num_rounds"]
        except Exception as exc:  # a failed measurement is a result
            result["status"] = f"failed: {exc}"
        finally:
            fed.stop()
    print(json.dumps(result))
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
