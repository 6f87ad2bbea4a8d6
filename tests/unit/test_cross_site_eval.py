"""Cross-site evaluation after FedAvg against the in-memory communicator; per-workflow state and resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fl.aliases import NVFLARE_ALIASES
from fl.fsutil import atomic_write_json, read_json
from fl.server.jobs import WorkflowStates
from fl.tensors import write_tensors
from fl.workflows.base import TaskSpec
from fl.workflows.cross_site_eval import (
    BEST_MODEL_NAME,
    GLOBAL_MODEL_NAME,
    MODEL_OWNER,
    RESULTS_FILE,
    CrossSiteModelEval,
)
from fl.workflows.fedavg import FedAvg
from tests.unit.test_fedavg import Context, FakePersistor

#: What each site's local model holds (its last local training, as the hello-pt script keeps it).
LOCAL = {"a": 10.0, "b": 20.0}


class ServerKilled(BaseException):
    """Stands for the server process dying mid-task (not an Exception: nothing catches it)."""


class StatesContext(Context):
    """The in-memory job context, with the server's per-workflow state files."""

    def __init__(self, run_dir: Path, sites: dict[str, Any], components: dict[str, Any], *, resume: bool) -> None:
        super().__init__(run_dir, sites, components)
        self.states = WorkflowStates(run_dir, resume=resume)

    def save_state(self, state: Any) -> None:
        self.states.save(state)

    def load_state(self) -> dict[str, Any] | None:
        return self.states.load()


def make_site(name: str, seen: list[tuple[str, str, str]], fail_on: tuple[str, str] | None = None) -> Any:
    """A site: trains +1, submits a constant local model, scores a model by its mean weight."""

    def site(task: TaskSpec, model: dict[str, np.ndarray]) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        owner = str(task.meta.get(MODEL_OWNER, ""))
        seen.append((name, task.name, owner))
        if fail_on == ("kill", owner):
            raise ServerKilled
        if fail_on == ("fail", owner):
            raise RuntimeError(f"{name} cannot evaluate {owner}")
        if task.name == "submit_model":
            return {"w": np.full(4, LOCAL[name], np.float32)}, {}, {}
        if task.name == "validate":
            return None, {"accuracy": float(model["w"].mean())}, {}
        return {k: v + 1 for k, v in model.items()}, {"accuracy": 0.5}, {"NUM_STEPS_CURRENT_ROUND": 1}

    return site


def job(tmp_path: Path, sites: dict[str, Any], *, resume: bool = False) -> tuple[StatesContext, list[Any]]:
    persistor = FakePersistor({"w": np.zeros(4, np.float32)})
    ctx = StatesContext(tmp_path, sites, {"persistor": persistor}, resume=resume)
    workflows = [("fedavg", FedAvg(num_clients=2, num_rounds=2)), ("xsite", CrossSiteModelEval())]
    return ctx, workflows


def full_matrix() -> dict[str, dict[str, dict[str, float]]]:
    """Every site's score of the global model (2.0 after two +1 rounds) and of each site's model."""
    scores = {GLOBAL_MODEL_NAME: {"accuracy": 2.0}, "a": {"accuracy": 10.0}, "b": {"accuracy": 20.0}}
    return {"a": scores, "b": scores}


def test_cross_site_eval_after_fedavg_writes_the_full_site_by_model_matrix(tmp_path):
    seen: list[tuple[str, str, str]] = []
    ctx, workflows = job(tmp_path, {"a": make_site("a", seen), "b": make_site("b", seen)})
    ctx.states.run_all(workflows, ctx)
    assert read_json(tmp_path / "cross_site_val" / RESULTS_FILE) == full_matrix()
    assert [t[0] for t in ctx.communicator.tasks] == ["train", "train", "validate", "submit_model"] + ["validate"] * 3
    assert read_json(tmp_path / "workflows.json") == {"finished": ["fedavg", "xsite"]}
    # FedAvg's state stays the un-keyed state.json; the second workflow's is its own file.
    assert read_json(tmp_path / "state.json")["next_round"] == 2
    assert read_json(tmp_path / "state-1.json")["evaluated"] == [GLOBAL_MODEL_NAME, "a", "b"]
    shared = sorted(p.name for p in (tmp_path / "cross_site_val" / "model_shareables").iterdir())
    assert shared == ["0.safetensors", "1.safetensors", "2.safetensors"]


def test_the_servers_best_model_is_scored_beside_its_last_global_model_as_flares(tmp_path):
    """The selector's best (round 1's model, w=1, which the sites scored 100) is ``SRV_best_FL_global_model.pt``."""
    from fl.components.model_selector import IntimeModelSelector

    def site(name: str) -> Any:
        local = make_site(name, [])

        def answer(task: TaskSpec, model: dict[str, np.ndarray]) -> tuple[Any, dict[str, Any], dict[str, Any]]:
            params, metrics, meta = local(task, model)
            if task.name == "train":  # the score of the model received: 100 for w=1, 0 for the others
                metrics = {"accuracy": 100.0 if float(model["w"].mean()) == 1.0 else 0.0}
            return params, metrics, meta

        return answer

    persistor = FakePersistor({"w": np.zeros(4, np.float32)})
    components = {"persistor": persistor, "selector": IntimeModelSelector(key_metric="accuracy")}
    ctx = StatesContext(tmp_path, {"a": site("a"), "b": site("b")}, components, resume=False)
    ctx.states.run_all([("fedavg", FedAvg(num_clients=2, num_rounds=2)), ("xsite", CrossSiteModelEval())], ctx)
    assert persistor.best == [(0, 0.0), (1, 100.0)]
    scores = {GLOBAL_MODEL_NAME: {"accuracy": 2.0}, BEST_MODEL_NAME: {"accuracy": 1.0}}
    scores |= {"a": {"accuracy": 10.0}, "b": {"accuracy": 20.0}}
    assert read_json(tmp_path / "cross_site_val" / RESULTS_FILE) == {"a": scores, "b": scores}
    assert read_json(tmp_path / "state-1.json")["evaluated"] == [GLOBAL_MODEL_NAME, BEST_MODEL_NAME, "a", "b"]
    # The best model's file outlived the engine's removal of superseded global models.
    assert sorted(p.name for p in (tmp_path / "models").glob("*.safetensors")) == [
        "best-global.safetensors",
        "global-r0002.safetensors",
    ]


def test_a_site_that_fails_one_evaluation_is_recorded_in_the_matrix_and_the_job_goes_on(tmp_path):
    seen: list[tuple[str, str, str]] = []
    sites = {"a": make_site("a", seen), "b": make_site("b", seen, fail_on=("fail", "a"))}
    ctx, workflows = job(tmp_path, sites)
    ctx.states.run_all(workflows, ctx)
    matrix = read_json(tmp_path / "cross_site_val" / RESULTS_FILE)
    expected = full_matrix()
    assert matrix["a"] == expected["a"]
    assert matrix["b"][GLOBAL_MODEL_NAME] == {"accuracy": 2.0} and matrix["b"]["b"] == {"accuracy": 20.0}
    assert "validation_timeout" in matrix["b"]["a"]["error"]


def test_a_site_that_submits_no_model_has_no_column_but_scores_the_others(tmp_path):
    seen: list[tuple[str, str, str]] = []
    sites = {"a": make_site("a", seen, fail_on=("fail", "")), "b": make_site("b", seen)}
    ctx = StatesContext(tmp_path, sites, {"persistor": FakePersistor({"w": np.zeros(4, np.float32)})}, resume=False)
    # The "" owner fails train and submit_model on a: only the cross-site workflow, on the initial model.
    CrossSiteModelEval().run(ctx)
    matrix = read_json(tmp_path / "cross_site_val" / RESULTS_FILE)
    assert set(matrix["a"]) == set(matrix["b"]) == {GLOBAL_MODEL_NAME, "b"}
    assert matrix["a"]["b"] == {"accuracy": 20.0} and matrix["b"][GLOBAL_MODEL_NAME] == {"accuracy": 0.0}


def test_fedavg_then_cross_site_eval_resumes_after_a_server_kill(tmp_path):
    seen: list[tuple[str, str, str]] = []
    ctx, workflows = job(tmp_path, {"a": make_site("a", seen), "b": make_site("b", seen, fail_on=("kill", "b"))})
    with pytest.raises(ServerKilled):
        ctx.states.run_all(workflows, ctx)
    fedavg_state = read_json(tmp_path / "state.json")

    seen_after: list[tuple[str, str, str]] = []
    ctx, workflows = job(tmp_path, {"a": make_site("a", seen_after), "b": make_site("b", seen_after)}, resume=True)
    ctx.states.run_all(workflows, ctx)
    # FedAvg finished before the kill: not run again; the sites' models were in: not asked for again.
    assert [t[0] for t in ctx.communicator.tasks] == ["validate"]
    assert {owner for _, _, owner in seen_after} == {"b"}
    assert read_json(tmp_path / "state.json") == fedavg_state
    assert read_json(tmp_path / "cross_site_val" / RESULTS_FILE) == full_matrix()


def test_a_job_saved_before_states_were_keyed_resumes_fedavg_from_its_state_json(tmp_path):
    (tmp_path / "models").mkdir()
    write_tensors(tmp_path / "models" / "global-r0001.safetensors", {"w": np.full(4, 1.0, np.float32)})
    atomic_write_json(tmp_path / "state.json", {"next_round": 1, "model_file": "global-r0001.safetensors"})
    seen: list[tuple[str, str, str]] = []
    ctx, workflows = job(tmp_path, {"a": make_site("a", seen), "b": make_site("b", seen)}, resume=True)
    ctx.states.run_all(workflows, ctx)
    assert [t[:2] for t in ctx.communicator.tasks][:2] == [("train", 1), ("validate", 2)]
    assert read_json(tmp_path / "cross_site_val" / RESULTS_FILE) == full_matrix()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"validation_timeout": -1}, "validation_timeout must be a number"),
        ({"submit_model_timeout": "10"}, "submit_model_timeout must be a number"),
        ({"cross_val_dir": "../out"}, "cross_val_dir must be a folder inside the job's folder"),
        ({"participating_clients": "site-1"}, "participating_clients must be a list of site names"),
        ({"validation_task_name": ""}, "validation_task_name must be a non-empty string"),
    ],
)
def test_bad_arguments_are_refused_naming_the_argument_and_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CrossSiteModelEval(**kwargs)


def test_flare_import_path_names_the_workflow():
    target = NVFLARE_ALIASES["nvflare.app_common.workflows.cross_site_model_eval.CrossSiteModelEval"]
    assert target == "fl.workflows.cross_site_eval.CrossSiteModelEval"


def test_add_cross_site_evaluation_runs_after_training_once_per_recipe(tmp_path, monkeypatch):
    from fl.recipe import FedAvgRecipe, add_cross_site_evaluation

    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.py").write_text("print('train')\n")
    recipe = FedAvgRecipe(name="r", min_clients=2, model=torch_net(), train_script="train.py")
    add_cross_site_evaluation(recipe, validation_timeout=60, participating_clients=["site-1", "site-2"])
    server = read_json(recipe.export(tmp_path / "out") / "app_server" / "config" / "config_fed_server.json")
    evaluation = server["workflows"][1]
    assert evaluation["path"] == "fl.workflows.cross_site_eval.CrossSiteModelEval"
    assert evaluation["args"] == {
        "submit_model_timeout": 600,
        "validation_timeout": 60,
        "participating_clients": ["site-1", "site-2"],
    }
    with pytest.raises(RuntimeError, match="has cross-site evaluation already"):
        add_cross_site_evaluation(recipe)


def test_fed_eval_recipe_evaluates_the_checkpoint_on_every_site_without_their_models(tmp_path, monkeypatch):
    from fl.recipe import FedEvalRecipe, add_cross_site_evaluation

    monkeypatch.chdir(tmp_path)
    (tmp_path / "eval.py").write_text("print('eval')\n")
    recipe = FedEvalRecipe(
        model=torch_net(), eval_ckpt="/data/model.safetensors", min_clients=2, eval_script="eval.py", eval_args="-q"
    )
    job_dir = recipe.export(tmp_path / "out")
    server = read_json(job_dir / "app_server" / "config" / "config_fed_server.json")
    assert [w["path"] for w in server["workflows"]] == ["fl.workflows.cross_site_eval.CrossSiteModelEval"]
    assert server["workflows"][0]["args"]["evaluate_site_models"] is False
    persistor = next(c for c in server["components"] if c["id"] == "persistor")
    assert persistor["args"]["source_ckpt_file_full_name"] == "/data/model.safetensors"
    assert NVFLARE_ALIASES["nvflare.app_opt.pt.recipes.fedeval.FedEvalRecipe"] == "fl.recipe.fedeval.FedEvalRecipe"
    with pytest.raises(RuntimeError, match="has cross-site evaluation already"):
        add_cross_site_evaluation(recipe)


def test_fed_eval_on_the_initial_model_scores_it_on_every_site(tmp_path):
    seen: list[tuple[str, str, str]] = []
    ctx = StatesContext(
        tmp_path,
        {"a": make_site("a", seen), "b": make_site("b", seen)},
        {"persistor": FakePersistor({"w": np.full(4, 3.0, np.float32)})},
        resume=False,
    )
    CrossSiteModelEval(evaluate_site_models=False).run(ctx)
    assert [t[0] for t in ctx.communicator.tasks] == ["validate"]
    expected = {GLOBAL_MODEL_NAME: {"accuracy": 3.0}}
    assert read_json(tmp_path / "cross_site_val" / RESULTS_FILE) == {"a": expected, "b": expected}


def torch_net() -> Any:
    import torch

    return torch.nn.Linear(3, 2)
