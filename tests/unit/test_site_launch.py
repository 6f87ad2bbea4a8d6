"""How a site launches a job's script (fl.site.launch): the site's Python, FLARE's torch.distributed.run
spelling, the site's --nproc-per-node; and the unix-socket channel that rank 0 connects to."""

from __future__ import annotations

import socket
import sys
import threading
from pathlib import Path

import pytest

from fl.channel import ChannelListener, LineChannel, connect_channel
from fl.cli.main import build_parser
from fl.site.launch import LAUNCHER_PID_VARIABLE, LaunchError, training_command

SCRIPT = Path("/job/app/custom/train.py")


def _launcher_and_rank(argv: list[str]) -> tuple[list[str], list[str]]:
    """The torchrun part of a distributed argv (after fl's pid-exporting wrapper) and the rank's own command."""
    assert argv[:4] == [sys.executable, "-I", "-S", "-c"] and argv[5] == LAUNCHER_PID_VARIABLE
    launcher = argv[6 : argv.index("--no-python")]
    rank = argv[argv.index("--no-python") + 1 :]
    assert rank[:4] == [sys.executable, "-I", "-S", "-c"] and rank[5:7] == [f"${LAUNCHER_PID_VARIABLE}", "9"]
    return launcher, rank[7:]


def test_no_command_runs_the_script_with_the_sites_python_over_the_inherited_fd():
    launch = training_command(None, SCRIPT, "--epochs 2")
    assert launch == type(launch)([sys.executable, "-u", str(SCRIPT), "--epochs", "2"], False)


def test_flares_multi_gpu_command_runs_under_the_sites_torch_distributed_run_with_ranks_bound_to_it():
    command = "python3 -m torch.distributed.run --nnodes=1 --nproc_per_node=2 --master_port=7777"
    launch = training_command(command, SCRIPT, "--lr 0.1")
    assert launch.distributed
    launcher, rank = _launcher_and_rank(launch.argv)
    assert launcher == [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                        "--master_port=7777"]  # fmt: skip
    assert rank == [sys.executable, "-u", str(SCRIPT), "--lr", "0.1"]


def test_torchrun_without_a_rendezvous_gets_a_free_master_port():
    launcher, _ = _launcher_and_rank(training_command("torchrun --nproc-per-node 2", SCRIPT).argv)
    assert launcher[:5] == [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    [port] = [a.split("=", 1)[1] for a in launcher if a.startswith("--master_port=")]
    assert 0 < int(port) < 65536


def test_the_sites_nproc_per_node_wraps_a_plain_python_job_in_torch_distributed_run():
    for command in (None, "python3 -u"):
        launcher, rank = _launcher_and_rank(training_command(command, SCRIPT, "", nproc_per_node=4).argv)
        assert launcher[:5] == [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=4"]
        assert rank == [sys.executable, "-u", str(SCRIPT)]


def test_a_jobs_own_launcher_wins_over_the_sites_nproc_per_node():
    launcher, _ = _launcher_and_rank(training_command("torchrun --nproc_per_node=2", SCRIPT, "", 8).argv)
    assert "--nproc_per_node=2" in launcher and not any("=8" in a for a in launcher)


@pytest.mark.parametrize("option", ["--no-python", "--no_python", "--run-path", "--module", "-m"])
def test_launcher_options_that_would_not_run_the_script_file_are_refused_by_name(option):
    with pytest.raises(LaunchError, match=f"has {option.replace('_', '-')}"):
        training_command(f"torchrun --nproc_per_node=2 {option}", SCRIPT)


def test_ranks_for_a_command_that_is_not_python_are_refused_naming_both():
    with pytest.raises(LaunchError, match=r"runs 2 ranks per job .* 'bash wrap\.sh'"):
        training_command("bash wrap.sh", SCRIPT, "", nproc_per_node=2)
    with pytest.raises(LaunchError, match="nproc_per_node must be >= 1, got 0"):
        training_command(None, SCRIPT, "", nproc_per_node=0)


def test_a_non_python_command_without_ranks_runs_as_given():
    assert training_command("bash wrap.sh", SCRIPT).argv == ["bash", "wrap.sh", str(SCRIPT)]


def test_fl_site_nproc_per_node_option_and_its_bounds(capsys):
    parser = build_parser()
    args = parser.parse_args(["site", "--nproc-per-node", "2"])
    assert args.nproc_per_node == 2
    assert parser.parse_args(["site"]).nproc_per_node == 1
    with pytest.raises(SystemExit):
        parser.parse_args(["site", "--nproc-per-node", "0"])
    assert "'0' is not a number of ranks" in capsys.readouterr().err


def _accept_in_thread(listener: ChannelListener) -> tuple[threading.Thread, list[object]]:
    got: list[object] = []
    thread = threading.Thread(target=lambda: got.append(listener.accept(lambda: True)), daemon=True)
    thread.start()
    return thread, got


def test_the_channel_listener_turns_away_a_wrong_token_and_takes_the_right_one_once(tmp_path):
    listener = ChannelListener(tmp_path)
    assert listener.path.stat().st_mode & 0o777 == 0o600
    thread, got = _accept_in_thread(listener)
    intruder = connect_channel(str(listener.path), "not-the-token", {"op": "hello", "pid": 1})
    with pytest.raises(ConnectionError):
        intruder.recv()  # closed without a word
    rank0 = connect_channel(str(listener.path), listener.token, {"op": "hello", "pid": 2, "rank": 0})
    thread.join(10)
    [accepted] = got
    assert isinstance(accepted, tuple)
    channel, hello = accepted
    assert isinstance(channel, LineChannel) and hello["pid"] == 2
    channel.send({"op": "welcome"})
    assert rank0.recv() == {"op": "welcome"}
    assert not listener.path.exists()  # no second process can connect
    with pytest.raises(ConnectionError):
        connect_channel(str(listener.path), listener.token, {"op": "hello"})
    for end in (channel, rank0, intruder):
        end.close()


def test_the_channel_listener_gives_up_when_the_script_is_gone_and_fits_a_deep_workspace(tmp_path):
    deep = tmp_path / ("d" * 90)
    deep.mkdir()
    listener = ChannelListener(deep)
    assert len(str(listener.path)) <= 100 and listener.path.exists()
    assert listener.accept(lambda: False) is None
    assert not listener.path.exists() and not listener.path.parent.exists()


def test_a_connection_that_never_says_hello_is_dropped_after_the_hello_timeout(tmp_path, monkeypatch):
    monkeypatch.setattr("fl.channel.HELLO_TIMEOUT_S", 0.2)
    listener = ChannelListener(tmp_path)
    thread, got = _accept_in_thread(listener)
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.connect(str(listener.path))
    rank0 = connect_channel(str(listener.path), listener.token, {"op": "hello", "pid": 3})
    thread.join(10)
    assert isinstance(got[0], tuple) and got[0][1]["pid"] == 3
    silent.close()
    rank0.close()
    got[0][0].close()
