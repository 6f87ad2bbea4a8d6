"""The per-site state store (fl.client.state): what a per-task script keeps between its runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fl.client.state import MAX_STATE_BYTES, STATE_FILE, SiteState, StateError


def test_scalars_tensors_and_nested_values_survive_a_new_store_on_the_same_folder(tmp_path):
    state = SiteState(tmp_path)
    state["count"] = 3
    state["name"] = "site-1"
    state["ratio"] = 0.25
    state["flags"] = [True, None, {"deep": "yes"}]
    state["weights"] = {"fc.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    state["array"] = np.array([1, 2, 3], dtype=np.int64)
    state["bf16"] = torch.ones(2, dtype=torch.bfloat16)
    state.save()

    again = SiteState(tmp_path)
    assert again["count"] == 3 and again["name"] == "site-1" and again["ratio"] == 0.25
    assert again["flags"] == [True, None, {"deep": "yes"}]
    assert torch.equal(again["weights"]["fc.weight"], torch.arange(6, dtype=torch.float32).reshape(2, 3))
    assert isinstance(again["array"], np.ndarray) and again["array"].tolist() == [1, 2, 3]
    assert again["bf16"].dtype == torch.bfloat16


def test_an_optimizer_state_dict_round_trips_with_its_integer_keys(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    state = SiteState(tmp_path)
    state["optimizer"] = optimizer.state_dict()
    state.save()

    restored = torch.optim.SGD(torch.nn.Linear(3, 2).parameters(), lr=0.5, momentum=0.0)
    restored.load_state_dict(SiteState(tmp_path)["optimizer"])
    saved = optimizer.state_dict()
    assert sorted(restored.state_dict()["state"]) == [0, 1]
    assert restored.param_groups[0]["momentum"] == 0.9 and restored.param_groups[0]["lr"] == 0.1
    for index in (0, 1):
        assert torch.equal(
            restored.state_dict()["state"][index]["momentum_buffer"], saved["state"][index]["momentum_buffer"]
        )


def test_an_unused_store_writes_nothing_and_a_fresh_folder_reads_empty(tmp_path):
    state = SiteState(tmp_path / "state")
    state.save()
    assert not (tmp_path / "state").exists()
    assert dict(state) == {} and state.loaded


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (object(), "object cannot be stored"),
        (float("nan"), "not finite"),
        ({1.5: "x"}, "dict keys"),
        ({True: 1}, "dict keys"),
    ],
)
def test_values_that_would_need_pickle_are_refused_when_set_naming_the_key(tmp_path, value, words):
    state = SiteState(tmp_path)
    with pytest.raises(StateError, match=words) as info:
        state["bad"] = value
    assert "'bad'" in str(info.value)
    assert "bad" not in state


def test_non_string_keys_are_refused(tmp_path):
    with pytest.raises(StateError, match="state keys are strings"):
        SiteState(tmp_path)[3] = 1  # type: ignore[index]


def test_the_file_is_safetensors_with_the_scalars_as_json_metadata(tmp_path):
    state = SiteState(tmp_path)
    state["round"] = 2
    state["t"] = torch.zeros(3)
    state.save()
    raw = (tmp_path / STATE_FILE).read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert header["t"]["dtype"] == "F32"
    assert json.loads(header["__metadata__"]["fl.state"])["round"] == 2


def test_a_corrupt_state_file_is_a_clear_error_not_a_crash(tmp_path):
    (tmp_path / STATE_FILE).write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}")
    with pytest.raises(StateError, match="cannot read the state file"):
        SiteState(tmp_path)["x"]


def test_a_state_over_the_size_limit_is_refused_at_save(tmp_path, monkeypatch):
    monkeypatch.setattr("fl.client.state.MAX_STATE_BYTES", 100)
    state = SiteState(tmp_path)
    state["big"] = torch.zeros(100)
    with pytest.raises(StateError, match="400 bytes of tensors, more than the limit of 100"):
        state.save()
    assert not (tmp_path / STATE_FILE).exists()
    assert MAX_STATE_BYTES == 1 << 30


def test_get_state_outside_a_site_says_so(monkeypatch):
    from fl.client.api import ClientAPI, NotUnderAgentError

    monkeypatch.delenv("FL_STATE_DIR", raising=False)
    with pytest.raises(NotUnderAgentError, match="FL_STATE_DIR"):
        ClientAPI().get_state()
