"""The command line: every option has help and shows its default, one name per concept, and the
spellings NVIDIA FLARE users type (simulator, hello-pt's job.py) parse to the same values."""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from fl.cli.main import build_parser, main
from fl.cli.options import HelpFormatter

REPO = Path(__file__).resolve().parents[2]


def _commands(parser: argparse.ArgumentParser, name: str = "fl") -> list[tuple[str, argparse.ArgumentParser]]:
    """The parser and every subcommand's parser, depth first, with their names."""
    found = [(name, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                found += _commands(sub, f"{name} {sub_name}")
    return found


def _arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        a
        for a in parser._actions
        if not isinstance(a, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction))
    ]


COMMANDS = _commands(build_parser())


@pytest.mark.parametrize("name,parser", COMMANDS, ids=[name for name, _ in COMMANDS])
def test_every_option_of_every_command_has_help_text(name, parser):
    visible = {a.dest for a in _arguments(parser) if a.help and a.help is not argparse.SUPPRESS}
    for action in _arguments(parser):
        flags = "/".join(action.option_strings) or action.dest
        assert action.help, f"{name} {flags}: no help text"
        if action.help is argparse.SUPPRESS:  # another spelling: its option must be documented
            assert action.dest in visible, f"{name} {flags}: hidden, and no visible option for {action.dest}"


@pytest.mark.parametrize("name,parser", COMMANDS, ids=[name for name, _ in COMMANDS])
def test_every_option_with_a_default_shows_it_in_help(name, parser):
    formatter = HelpFormatter(name)
    for action in _arguments(parser):
        if action.help is argparse.SUPPRESS or action.default in (None, False, "", [], argparse.SUPPRESS):
            continue
        text = formatter._expand_help(action)
        assert "default" in text, f"{name} {'/'.join(action.option_strings)}: help does not show its default"


def test_help_formatter_appends_the_default_once():
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    parser.add_argument("--a", default=3, help="three")
    parser.add_argument("--b", default="x", help="bee (env B)")
    parser.add_argument("--c", default=None, help="nothing")
    parser.add_argument("--d", default=1, help="one (default: one)")
    text = " ".join(parser.format_help().split())
    assert "three (default: 3)" in text and "bee (env B; default: x)" in text
    assert "nothing --d" in text and "one (default: one)" in text


FLARE_SIMULATOR = "simulate -w WS -n 3 -t 2 -c a,b,c -gpu 0,1 JOB"
FL_SIMULATE = "simulate --workspace WS --n-sites 3 --threads 2 --sites a,b,c --gpu 0,1 JOB"


@pytest.mark.parametrize(
    "argv",
    [
        FLARE_SIMULATOR,
        "simulate --workspace WS --n_clients 3 --threads 2 --clients a,b,c --gpu 0,1 JOB",
        "simulate -w WS --n-clients 3 -t 2 --sites a,b,c --gpu 0,1 JOB",
    ],
)
def test_flare_simulator_spellings_parse_to_fl_values(argv):
    assert build_parser().parse_args(argv.split()) == build_parser().parse_args(FL_SIMULATE.split())


def test_flare_simulator_command_line_reaches_the_simulator(monkeypatch, tmp_path):
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    monkeypatch.setattr("fl.simulator.simulate", lambda *a, **k: calls.append((a, k)) or 0)
    monkeypatch.setattr("fl.cli.commands.setup_logging", lambda *a, **k: None)
    job = tmp_path / "job"
    job.mkdir()
    argv = f"simulate -w {tmp_path / 'ws'} -n 3 -t 2 -c a,b,c -gpu 0,1 --timeout 9 {job}".split()
    assert main(argv) == 0
    (job_dir, workspace), kwargs = calls[0]
    assert (job_dir, workspace) == (str(job), str(tmp_path / "ws"))
    assert kwargs == {
        "n_clients": 3,
        "threads": 2,
        "clients": ["a", "b", "c"],
        "gpu": "0,1",
        "timeout": 9.0,
        "status_interval": None,
        "fresh_processes": False,
    }
    assert main([*argv[:-1], "--fresh-processes", argv[-1]]) == 0
    assert calls[1][1]["fresh_processes"] is True


@pytest.mark.parametrize(
    "argv,dest,value",
    [
        ("simulate --timeout 9 J", "job_timeout", 9.0),
        ("simulate --job-timeout 9 J", "job_timeout", 9.0),
        ("submit --timeout 7 J", "wait_timeout", 7.0),
        ("submit --wait-timeout 7 J", "wait_timeout", 7.0),
        ("health --timeout 2", "rpc_timeout", 2.0),
        ("health --rpc-timeout 2", "rpc_timeout", 2.0),
        ("health", "rpc_timeout", 5.0),
    ],
)
def test_each_timeout_has_its_own_name_and_the_old_one_still_works(argv, dest, value):
    assert getattr(build_parser().parse_args(argv.split()), dest) == value


def test_help_lists_one_name_per_concept():
    text = build_parser()._subparsers._group_actions[0].choices["simulate"].format_help()  # type: ignore[union-attr]
    options = text.split("options:")[1].split("NVIDIA FLARE")[0]
    assert "--n-sites" in options and "--sites" in options and "--job-timeout" in options
    for hidden in ("--n_clients N", "--clients NAMES", "--timeout SECONDS", "-c NAMES"):
        assert hidden not in options


def _job_py() -> ModuleType:
    spec = importlib.util.spec_from_file_location("hello_pt_job", REPO / "jobs" / "hello-pt" / "job.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "argv",
    [
        "--n_clients 3 --num_rounds 4 --batch_size 8",  # FLARE's hello-pt job.py
        "--n-clients 3 --num-rounds 4 --batch-size 8",  # fl's older spelling (the Helm chart's)
    ],
)
def test_hello_pt_job_accepts_flare_spellings(argv):
    parser = _job_py().define_parser()
    canonical = ["--n-sites", "3", "--num-rounds", "4", "--batch-size", "8"]
    assert parser.parse_args(argv.split()) == parser.parse_args(canonical)


def test_hello_pt_job_options_all_have_help():
    for action in _job_py().define_parser()._actions:
        assert action.help, action.option_strings


def _check_tools(cache: Path) -> subprocess.CompletedProcess[str]:
    """Run scripts/test.sh's tool check with nothing on PATH and ``cache`` as the tools cache."""
    env = {**os.environ, "PATH": "", "FL_CACHE_DIR": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "tests.tools"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


def test_tool_check_prints_one_line_per_missing_tool(tmp_path):
    from tests.tools import SUITE_TOOLS

    proc = _check_tools(tmp_path)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 1
    assert len(lines) == len(SUITE_TOOLS) == 3, proc.stderr
    for line, tool in zip(lines, SUITE_TOOLS, strict=True):
        assert line.startswith(f"missing tool: {tool},") and "bash tools/install-tools.sh" in line


def test_tool_check_is_silent_when_every_tool_is_there(tmp_path):
    from tests.tools import SUITE_TOOLS

    bin_dir = tmp_path / "tools" / "bin"
    bin_dir.mkdir(parents=True)
    for tool in SUITE_TOOLS:
        (bin_dir / tool).write_text("#!/bin/sh\n")
        (bin_dir / tool).chmod(0o755)
    proc = _check_tools(tmp_path)
    assert (proc.returncode, proc.stderr) == (0, "")
