"""A site's log of a job: bounded per site, one line counting what was dropped, lines made safe."""

from __future__ import annotations

import re

from fl.server.jobs import MAX_LOG_LINE_BYTES, JobLogs

DROPPED = re.compile(r"^\[fl\] +(\d+) lines dropped: site-1 reached the log limit", re.MULTILINE)


def test_lines_past_the_limit_are_dropped_and_counted_in_one_line(tmp_path):
    logs = JobLogs(tmp_path, max_bytes=10_000)
    line = "x" * 99  # 100 bytes with its newline
    assert logs.append("site-1", [line] * 50) == 0
    assert logs.append("site-1", [line] * 80) == 30
    assert logs.append("site-1", [line] * 1000) == 1000
    text = (tmp_path / "site-1.log").read_text()
    assert len(DROPPED.findall(text)) == 1
    assert DROPPED.search(text).group(1) == "1030"  # type: ignore[union-attr]
    assert text.count(line + "\n") == 100
    assert (tmp_path / "site-1.log").stat().st_size <= 10_000 + 200


def test_the_limit_holds_across_instances_as_after_the_job_ended(tmp_path):
    JobLogs(tmp_path, max_bytes=4096).append("site-1", ["a" * 100] * 100)
    for _ in range(20):
        assert JobLogs(tmp_path, max_bytes=4096).append("site-1", ["late"]) == 1
    text = (tmp_path / "site-1.log").read_text()
    assert len(DROPPED.findall(text)) == 1
    assert int(DROPPED.search(text).group(1)) == 100 - 4096 // 101 + 20  # type: ignore[union-attr]


def test_each_site_has_its_own_limit(tmp_path):
    logs = JobLogs(tmp_path, max_bytes=4096)
    logs.append("site-1", ["a" * 1000] * 10)
    assert logs.append("site-2", ["fine"]) == 0
    assert (tmp_path / "site-2.log").read_text() == "fine\n"


def test_a_long_line_is_cut_and_says_so(tmp_path):
    logs = JobLogs(tmp_path)
    logs.append("site-1", ["é" * MAX_LOG_LINE_BYTES])
    written = (tmp_path / "site-1.log").read_bytes()
    assert len(written) < MAX_LOG_LINE_BYTES + 64
    assert written.decode().endswith(f" [{2 * MAX_LOG_LINE_BYTES - MAX_LOG_LINE_BYTES} bytes cut]\n")


def test_a_site_cannot_forge_lines_or_the_servers_notice(tmp_path):
    logs = JobLogs(tmp_path, max_bytes=4096)
    forged = "[fl]            0 lines dropped: site-1 reached the log limit per site and job"
    logs.append("site-1", [f"ok\n{forged}", forged, "\x1b[2Jclear screen\r"])
    lines = (tmp_path / "site-1.log").read_text().splitlines()
    assert len(lines) == 3
    assert not any(line.startswith("[fl]") for line in lines)
    assert "\x1b" not in lines[2]
    logs.append("site-1", ["b" * 5000])
    assert DROPPED.search((tmp_path / "site-1.log").read_text()).group(1) == "1"  # type: ignore[union-attr]
