"""On a terminal the simulator's progress line and log lines never share a line: while the display
shows, fl's log handler and the sites' forwarded output print through its console, above it."""

from __future__ import annotations

import io
import logging
import re
import sys

from rich.console import Console

from fl.log import adapter, setup_logging
from fl.simulator import _Progress

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _screen_lines(raw: str) -> list[str]:
    """What a terminal shows per line, roughly: after the last carriage return, without escape codes."""
    return [ANSI.sub("", chunk.rsplit("\r", 1)[-1]) for chunk in raw.split("\n")]


def test_log_lines_never_share_a_terminal_line_with_the_progress_line(monkeypatch):
    terminal = io.StringIO()
    monkeypatch.setattr(sys, "stderr", terminal)
    setup_logging()  # its handler writes to sys.stderr: the terminal
    handler = next(h for h in logging.getLogger("fl").handlers if getattr(h, "_fl_handler", False))
    console = Console(file=terminal, force_terminal=True, width=200)
    with _Progress(True, console=console):
        adapter("fl.test").info("a log line from the server")
        sys.stderr.write("a forwarded line from a site\n")
        sys.stderr.write("a line without its newline yet")
    lines = _screen_lines(terminal.getvalue())
    logged = [line for line in lines if line.endswith("INFO    a log line from the server")]
    assert logged and re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} INFO", logged[0]), lines
    assert "a forwarded line from a site" in lines and "a line without its newline yet" in lines, lines
    assert sys.stderr is terminal and handler.stream is terminal  # restored afterwards


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_display_writes_to_the_real_stderr_not_to_the_rerouted_one(monkeypatch):
    """Else the display's refreshes would go into the stream that prints above it (a deadlock)."""
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.delenv("TERM", raising=False)
    with _Progress(True) as progress:
        assert sys.stderr is not terminal
        assert progress._live.console.file is terminal
        progress._live.refresh()
    assert "\x1b[" in terminal.getvalue()  # the display drew on the terminal


def test_without_a_terminal_lines_are_written_plainly(monkeypatch):
    terminal = io.StringIO()
    monkeypatch.setattr(sys, "stderr", terminal)
    setup_logging()
    with _Progress(False):
        adapter("fl.test").info("plain line")
    assert terminal.getvalue().endswith("INFO    plain line\n")
