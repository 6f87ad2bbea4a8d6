"""One run, every artifact: log lines, summary, JSON files, checkpoints, TensorBoard and what the
script saw all number rounds and models the same way (fl.rounds: FLARE's convention)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fl.fsutil import read_json
from tests.integration.probe_job import export_probe_job

pytestmark = pytest.mark.timeout(400)
LABELS = {0: "initial model", 1: "global model after round 1/2", 2: "final model (after round 2/2)"}


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """``tag -> [(step, value)]`` of the TensorBoard event files in ``folder``."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    points: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                number = value.tensor.float_val[0] if value.HasField("tensor") else value.simple_value
                points.setdefault(value.tag, []).append((event.step, number))
    return points


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """One simulation of the probe job (2 sites, 2 rounds): its output and its job folder."""
    tmp = tmp_path_factory.mktemp("numbering")
    with pytest.MonkeyPatch.context() as mp:
        folder = export_probe_job(mp, tmp / "export")
    ws = tmp / "ws"
    proc = subprocess.run(
        [sys.executable, "-m", "fl", "simulate", str(folder), "-w", str(ws)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return output, (ws / "latest").resolve()


def test_the_script_sees_0_based_current_round_and_the_model_of_that_version(run):
    output, _ = run
    seen = sorted(set(re.findall(r"(site-\d): current_round=(\d) total_rounds=2 task=(\w+) received=(\S+)", output)))
    expected = [
        (site, str(r), task, str(v))
        for site in ("site-1", "site-2")
        for r, task, v in ((0, "train", 0), (1, "train", 1), (2, "validate", 2))
    ]
    assert seen == expected


def test_site_log_tags_say_round_r_plus_1_of_n_and_final(run):
    output, _ = run
    tags = set(re.findall(r"\[(site-\d) job=\w+ round=([\w/]+)\] site-\d: current_round=(\d)", output))
    assert tags == {
        (s, tag, r) for s in ("site-1", "site-2") for tag, r in (("1/2", "0"), ("2/2", "1"), ("final", "2"))
    }
    assert "round=3" not in output and "round 3" not in output


def test_server_log_says_which_model_the_round_metrics_scored(run):
    output, _ = run
    assert "[server job=" in output
    assert re.search(r"round=1/2\] train task sent to site-1, site-2", output)
    assert re.search(r"round=2/2\] train task sent to site-1, site-2", output)
    assert re.search(r"round=final\] validate task sent to site-1, site-2", output)
    assert "round 1/2 done: 2 results; the model they received (initial model) scored accuracy=0\n" in output
    assert (
        "round 2/2 done: 2 results; the model they received (global model after round 1/2) scored accuracy=1\n"
        in output
    )
    assert "final model (after round 2/2): accuracy=2\n" in output
    assert "new best model: accuracy=2 (final model (after round 2/2))" in output


def test_summary_labels_every_model_as_the_log_does(run):
    output, _ = run
    assert (
        "accuracy: initial model 0.0000, global model after round 1/2 1.0000, "
        "final model (after round 2/2) 2.0000" in output
    )
    assert "best accuracy: 2.0000 (final model (after round 2/2))" in output


def test_validation_and_best_model_json_key_models_by_version(run):
    _, job = run
    models = read_json(job / "validation.json")["models"]
    assert [(m["model_version"], m["description"], m["evaluated_in_round"]) for m in models] == [
        (v, LABELS[v], v) for v in (0, 1, 2)
    ]
    for m in models:  # the probe scores a model by its version
        assert m["aggregate"]["accuracy"] == m["model_version"]
        assert set(m["sites"]) == {"site-1", "site-2"}
    best = read_json(job / "best_model.json")
    assert best == {
        "key_metric": "accuracy",
        "score": 2.0,
        "model_version": 2,
        "description": LABELS[2],
        "file": "best_FL_global_model.pt",
    }


def test_checkpoints_hold_the_model_version_and_the_round_index_that_made_it(run):
    _, job = run
    for name in ("FL_global_model.pt", "best_FL_global_model.pt"):
        checkpoint = torch.load(job / name, weights_only=True)
        assert checkpoint["model_version"] == 2 and checkpoint["round"] == 1, name
        assert checkpoint["description"] == LABELS[2], name
        assert torch.equal(checkpoint["model"]["weight"], torch.full((16,), 2.0)), name


def test_tensorboard_steps_are_model_versions_on_the_server_and_current_round_on_sites(run):
    _, job = run
    assert _scalars(job / "tb_events" / "server")["global/accuracy"] == [(0, 0.0), (1, 1.0), (2, 2.0)]
    for site in ("site-1", "site-2"):
        # The script logged its received model's score at global_step=current_round: step r, model version r.
        assert _scalars(job / "tb_events" / site)["received_model_score"] == [(0, 0.0), (1, 1.0)]
