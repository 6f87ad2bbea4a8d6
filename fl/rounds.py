"""Round numbering: one convention (FLARE's) for every log line, file and display.

Numbers, each with one meaning:

- **round index** ``r``, 0-based, ``0 .. N-1`` for a job of ``N`` rounds: the Client API's
  ``current_round`` (``FLModel.current_round``, meta ``CURRENT_ROUND``), a task's ``round``,
  ``status.json``'s ``round``, the ``round`` field of JSON log lines, ``validation.json``'s
  ``evaluated_in_round`` and the ``round`` a ``.pt`` checkpoint was produced by. The final
  validation after the last round is index ``N`` (its tasks carry ``current_round == N``).
- **model version** ``v``: ``0`` is the initial model; ``v = r + 1`` is the global model that round
  index ``r`` produced. A task of round index ``r`` carries model version ``r`` (the final validation
  carries version ``N``), so metrics a site sends with a round's result score the model it
  *received*: the initial model in round 1/N. ``validation.json`` and ``best_model.json`` key models
  by ``model_version``; a ``.pt`` holds ``model_version`` and the ``round`` that produced it
  (``v - 1``; none for the initial model); the server's TensorBoard scalars (``global/<metric>``)
  use the model version as their step.

People see "round r+1/N" (:func:`round_label`; log tags ``round=r+1/N``, ``round=final`` for the
final validation) and models by :func:`model_label`: "initial model", "global model after round
v/N", "final model (after round N/N)".
"""

from __future__ import annotations

__all__ = ["log_round", "model_label", "round_label", "round_tag", "task_label"]


def round_tag(index: int, num_rounds: int | None) -> str:
    """The short form of a round index for log tags: ``1/2`` for index 0 of 2, ``final`` after the last."""
    if not num_rounds:
        return str(index + 1)
    return "final" if index >= num_rounds else f"{index + 1}/{num_rounds}"


def round_label(index: int, num_rounds: int) -> str:
    """``round 1/2`` for index 0 of 2; ``final validation (after round 2/2)`` for index 2 of 2."""
    if index >= num_rounds:
        return f"final validation (after round {num_rounds}/{num_rounds})"
    return f"round {index + 1}/{num_rounds}"


def model_label(version: int, num_rounds: int | None) -> str:
    """What people call model version ``version``: initial, after round v/N, or the final model."""
    if version == 0:
        return "initial model"
    if not num_rounds:
        return f"global model after round {version}"
    if version >= num_rounds:
        return f"final model (after round {num_rounds}/{num_rounds})"
    return f"global model after round {version}/{num_rounds}"


def task_label(name: str, index: int, num_rounds: int) -> str:
    """A task as people read it: ``train task of round 1/2``, ``validate task of the final model (...)``."""
    if index >= num_rounds:
        return f"{name} task of the {model_label(num_rounds, num_rounds)}"
    return f"{name} task of {round_label(index, num_rounds)}"


def log_round(index: int, num_rounds: int | None) -> dict[str, int | None]:
    """The ``extra`` of a log record about round index ``index`` (rendered ``round=1/2`` by fl.log)."""
    return {"round": index, "num_rounds": num_rounds}
