"""The Client API on ranks of a torch.distributed.run script: the rank comes from init(rank=...), RANK or
LOCAL_RANK; only rank 0 connects; other ranks behave as FLARE's (no task, no send, no channel)."""

from __future__ import annotations

import pytest

from fl.client.api import ClientAPI, NotUnderAgentError, process_rank


@pytest.fixture
def under_torchrun(monkeypatch) -> None:
    """The environment of a rank: a channel socket path (that nobody listens on), site and job."""
    for name in ("FL_CHANNEL_FD", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FL_CHANNEL_PATH", "/nonexistent/channel.sock")
    monkeypatch.setenv("FL_CHANNEL_TOKEN", "t")
    monkeypatch.setenv("FL_SITE_NAME", "site-1")
    monkeypatch.setenv("FL_JOB_ID", "j1")


def test_rank_comes_from_the_argument_then_rank_then_local_rank(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert process_rank(None) == 0
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert process_rank(None) == 3
    monkeypatch.setenv("RANK", "5")
    assert (process_rank(None), process_rank("2"), process_rank(1)) == (5, 2, 1)


@pytest.mark.parametrize("bad", ["x", -1, True, "1.5"])
def test_a_rank_that_is_not_a_whole_number_is_refused_naming_it(bad):
    with pytest.raises(ValueError, match=r"rank from init.* must be a whole number >= 0, got"):
        process_rank(bad)


def test_a_bad_rank_env_names_the_variable(monkeypatch):
    monkeypatch.setenv("RANK", "zero")
    with pytest.raises(ValueError, match="rank from RANK must be a whole number >= 0, got 'zero'"):
        process_rank(None)


@pytest.mark.usefixtures("under_torchrun")
def test_other_ranks_never_connect_and_get_flares_answers():
    api = ClientAPI()
    api.init(rank=1)  # would raise if it tried the (missing) socket
    assert api.rank == 1 and api._channel is None
    assert api.is_running() is False  # at once: only rank 0 waits for tasks
    assert api.receive() is None and api.receive(timeout=0) is None
    from fl.client.model import FLModel

    assert api.send(FLModel(params={})) is False
    api.log("loss", 1.0)  # nothing to send it to; no error
    assert (api.get_site_name(), api.get_job_id()) == ("site-1", "j1")
    with pytest.raises(RuntimeError, match="only rank 0 knows the task"):
        api.is_train()


@pytest.mark.usefixtures("under_torchrun")
def test_rank_0_connects_to_the_channel_socket_and_says_when_it_cannot():
    with pytest.raises(ConnectionError, match=r"cannot connect to the site agent's channel /nonexistent/channel\.sock"):
        ClientAPI().init(rank=0)


def test_not_under_an_agent_is_said_on_every_rank(monkeypatch):
    for name in ("FL_CHANNEL_FD", "FL_CHANNEL_PATH"):
        monkeypatch.delenv(name, raising=False)
    for rank in (0, 1):
        with pytest.raises(NotUnderAgentError, match="not started by an fl site"):
            ClientAPI().init(rank=rank)
