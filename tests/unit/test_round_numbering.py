"""One round numbering (fl.rounds) in labels, log tags, FedAvg's lines, JSON files and checkpoints."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import torch

from fl.components.model_selector import IntimeModelSelector
from fl.components.persistor import PTFileModelPersistor
from fl.components.validation_json import ValidationJsonGenerator
from fl.fsutil import read_json
from fl.log import JsonFormatter, TextFormatter, adapter
from fl.rounds import log_round, model_label, round_label, round_tag, task_label
from fl.tensors import write_tensors
from fl.workflows.fedavg import FedAvg
from tests.unit.test_fedavg import Context, FakePersistor, plus_one


@contextmanager
def captured(name: str = "fl") -> Iterator[list[logging.LogRecord]]:
    """Records of logger ``name`` at INFO and above, whatever the logging setup of the session."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger(name)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_labels_count_rounds_from_one_and_models_by_version():
    assert [round_label(r, 2) for r in range(3)] == ["round 1/2", "round 2/2", "final validation (after round 2/2)"]
    assert [round_tag(r, 2) for r in range(3)] == ["1/2", "2/2", "final"]
    assert [model_label(v, 2) for v in range(3)] == [
        "initial model",
        "global model after round 1/2",
        "final model (after round 2/2)",
    ]
    assert task_label("train", 0, 2) == "train task of round 1/2"
    assert task_label("validate", 2, 2) == "validate task of the final model (after round 2/2)"


def _record(**extra: object) -> logging.LogRecord:
    record = logging.LogRecord("fl.site", logging.INFO, __file__, 1, "task train received", None, None)
    record.__dict__.update(extra)
    return record


def test_text_log_tags_show_rounds_as_people_count_and_json_lines_keep_the_index():
    tags = [TextFormatter().format(_record(site="site-1", **log_round(r, 2))) for r in range(3)]
    assert ["[site-1 round=1/2]" in t for t in tags] == [True, False, False]
    assert "[site-1 round=2/2]" in tags[1] and "[site-1 round=final]" in tags[2]
    line = json.loads(JsonFormatter().format(_record(site="site-1", **log_round(0, 2))))
    assert (line["round"], line["num_rounds"]) == (0, 2)


def test_fedavg_lines_say_which_model_the_metrics_scored(tmp_path):
    ctx = Context(
        tmp_path,
        {"a": plus_one(lambda r: r / 10), "b": plus_one(lambda r: r / 10)},
        {"persistor": FakePersistor({"w": np.zeros(1, np.float32)})},
    )
    with captured() as records:
        FedAvg(num_clients=2, num_rounds=2).run(ctx)
    lines = [r.getMessage() for r in records]
    assert "round 1/2 done: 2 results; the model they received (initial model) scored accuracy=0" in lines
    assert (
        "round 2/2 done: 2 results; the model they received (global model after round 1/2) scored accuracy=0.1" in lines
    )
    assert "final model (after round 2/2): accuracy=0.2" in lines
    assert not [line for line in lines if "round 3" in line or "after round 0" in line]


def test_validation_and_best_model_json_describe_models_with_the_same_labels(tmp_path):
    accuracy = {0: 0.1, 1: 0.6, 2: 0.7}
    components = {
        "persistor": FakePersistor({"w": np.zeros(1, np.float32)}),
        "model_selector": IntimeModelSelector(key_metric="accuracy"),
        "json_generator": ValidationJsonGenerator(),
    }
    ctx = Context(tmp_path, {"a": plus_one(accuracy.get), "b": plus_one(accuracy.get)}, components)
    with captured() as records:
        FedAvg(num_clients=2, num_rounds=2).run(ctx)
    models = read_json(tmp_path / "validation.json")["models"]
    assert [(m["model_version"], m["description"], m["evaluated_in_round"]) for m in models] == [
        (0, "initial model", 0),
        (1, "global model after round 1/2", 1),
        (2, "final model (after round 2/2)", 2),
    ]
    best = read_json(tmp_path / "best_model.json")
    assert best["model_version"] == 2 and best["description"] == "final model (after round 2/2)"
    assert "after_round" not in best  # it was model_version - 1 under a name that read as the version
    lines = [r.getMessage() for r in records]
    assert "new best model: accuracy=0.1 (initial model)" in lines
    assert "new best model: accuracy=0.7 (final model (after round 2/2))" in lines


def _job_finished(ctx: Context) -> None:
    ctx.fire("job_finished", status="finished")


def test_without_metrics_the_job_says_why_there_is_no_best_model(tmp_path):
    def silent(task, model):
        return {k: v + 1 for k, v in model.items()}, {}, {}

    selector = IntimeModelSelector(key_metric="accuracy")
    ctx = Context(
        tmp_path,
        {"a": silent, "b": silent},
        {"persistor": FakePersistor({"w": np.zeros(1, np.float32)}), "model_selector": selector},
    )
    with captured() as records:
        FedAvg(num_clients=2, num_rounds=2).run(ctx)
        _job_finished(ctx)
    best = read_json(tmp_path / "best_model.json")
    assert best["model_version"] is None and "sent no metrics" in best["reason"]
    lines = [r.getMessage() for r in records]
    assert "no final validation: the sites sent no metrics with their results" in lines
    assert f"no best model: {best['reason']}" in lines


def test_a_missing_key_metric_is_named_with_the_metrics_sites_did_send(tmp_path):
    def lossy(task, model):
        return ({k: v + 1 for k, v in model.items()} if task.name == "train" else None), {"loss": 0.5}, {}

    components = {
        "persistor": FakePersistor({"w": np.zeros(1, np.float32)}),
        "model_selector": IntimeModelSelector(key_metric="accuracy"),
    }
    ctx = Context(tmp_path, {"a": lossy}, components)
    FedAvg(num_clients=1, num_rounds=1).run(ctx)
    _job_finished(ctx)
    reason = read_json(tmp_path / "best_model.json")["reason"]
    assert "no site reported the key metric 'accuracy'" in reason and "they reported: loss" in reason


def test_checkpoints_carry_the_model_version_the_round_index_that_made_it_and_the_label(tmp_path):
    model = tmp_path / "model.safetensors"
    write_tensors(model, {"w": np.full(3, 2.0, np.float32)})
    ctx = SimpleNamespace(run_dir=tmp_path, job_id="job-1", log=adapter("fl.test"))
    persistor = PTFileModelPersistor(model="src.net.Net")
    persistor.handle_event("round_started", {"round": 0, "num_rounds": 2}, ctx)
    persistor.save_global(ctx, model, round=1)
    final = torch.load(tmp_path / "FL_global_model.pt", weights_only=True)
    assert {k: final[k] for k in ("model_version", "round", "description")} == {
        "model_version": 2,
        "round": 1,
        "description": "final model (after round 2/2)",
    }
    persistor.save_best(ctx, model, model_version=0, metric=0.5)
    best = torch.load(tmp_path / "best_FL_global_model.pt", weights_only=True)
    assert {k: best[k] for k in ("model_version", "round", "description", "metric")} == {
        "model_version": 0,
        "round": None,  # no round made the initial model
        "description": "initial model",
        "metric": 0.5,
    }
