"""The Client API for PyTorch Lightning: ``flare.patch(trainer)`` makes a Trainer federated.

    import fl.client.lightning as flare

    trainer = Trainer(max_epochs=1)
    flare.patch(trainer)
    while flare.is_running():
        input_model = flare.receive()
        trainer.validate(model, datamodule=dm)   # loads the global model, records its metrics
        trainer.fit(model, datamodule=dm)        # trains from it, sends the weights with NUM_STEPS

As NVIDIA FLARE's ``nvflare.client.lightning``: the callback receives the global model before
validate and fit, keeps the validation metrics of the global model as the result's metrics (the
key metric the server's model selector compares), and sends the trained params after fit.
"""

from __future__ import annotations

from typing import Any

try:
    import pytorch_lightning as pl
except ImportError as exc:
    raise ImportError("fl.client.lightning needs PyTorch Lightning on the site: pip install 'fl[lightning]'") from exc

import fl.client as _api
from fl.client import (
    FLModel,
    ParamsType,
    get_config,
    get_job_id,
    get_site_name,
    init,
    is_evaluate,
    is_running,
    is_submit_model,
    is_train,
    log,
    receive,
    send,
    shutdown,
    system_info,
)
from fl.client.model import FLMetaKey

__all__ = [
    "FLCallback",
    "FLModel",
    "ParamsType",
    "RestoreState",
    "get_config",
    "get_job_id",
    "get_site_name",
    "init",
    "is_evaluate",
    "is_running",
    "is_submit_model",
    "is_train",
    "log",
    "patch",
    "receive",
    "send",
    "shutdown",
    "system_info",
]

#: Attribute of a LightningModule whose dict is added to the result's meta (FLARE's name).
FL_META_KEY = "__fl_meta__"


def patch(trainer: Any, restore_state: bool = True, load_state_dict_strict: bool = True) -> None:
    """Add the federated callback (and, with ``restore_state``, optimizer state kept across rounds) to ``trainer``."""
    callbacks = list(trainer.callbacks or [])
    if not any(isinstance(cb, FLCallback) for cb in callbacks):
        callbacks.append(FLCallback(rank=trainer.global_rank, load_state_dict_strict=load_state_dict_strict))
    if restore_state and not any(isinstance(cb, RestoreState) for cb in callbacks):
        callbacks.append(RestoreState())
    trainer.callbacks = callbacks


def _scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Lightning's ``callback_metrics`` (tensors) as plain floats."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if hasattr(value, "numel") and value.numel() != 1:
            continue  # only scalars are metrics
        out[str(key)] = float(value.item() if hasattr(value, "item") else value)
    return out


class FLCallback(pl.Callback):
    """Receives the global model before validate/fit, sends metrics (evaluate) or trained params (train)."""

    def __init__(self, rank: int = 0, load_state_dict_strict: bool = True) -> None:
        super().__init__()
        init(rank=rank)
        self.rank = rank
        self.load_state_dict_strict = load_state_dict_strict
        self.metrics: dict[str, float] | None = None  # the global model's validation metrics this round
        self._received: FLModel | None = None  # the model loaded into the module this round
        self._start_step = 0
        self._epochs_per_round: int | None = None
        self._steps_per_round: int | None = None

    # ------------------------------------------------------------------ receiving
    def _load_global(self, pl_module: Any) -> FLModel | None:
        """Load the current task's model into ``pl_module`` once per round; None when the job has ended."""
        if self._received is not None:
            return self._received
        model = _api._context.current_model()
        if model is None:
            return None
        if model.params:
            missing, unexpected = pl_module.load_state_dict(model.params, strict=self.load_state_dict_strict)
            if missing or unexpected:  # only without strict loading
                print(f"fl.client.lightning: partial load: missing {sorted(missing)}, ignored {sorted(unexpected)}")
        self._received = model
        return model

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.state.fn == "validate" and self.metrics is None:
            self._load_global(pl_module)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.state.fn != "validate" or self.metrics is not None or self._received is None:
            return
        self.metrics = _scalar_metrics(dict(trainer.callback_metrics))
        if is_evaluate():
            if trainer.global_rank == 0:
                send(FLModel(metrics=self.metrics))
            self._reset(trainer)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self._load_global(pl_module) is not None:
            self._start_step = trainer.global_step

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._received is None or not is_train():
            return
        meta = dict(getattr(pl_module, FL_META_KEY, None) or {})
        meta.setdefault(FLMetaKey.NUM_STEPS_CURRENT_ROUND, trainer.global_step - self._start_step)
        result = FLModel(params=pl_module.cpu().state_dict(), meta=meta, metrics=self.metrics)
        if trainer.global_rank == 0:
            send(result)
        self._reset(trainer)

    def _reset(self, trainer: Any) -> None:
        """Ready for the next round: the same Trainer trains one more round's epochs/steps on the next fit."""
        if self._epochs_per_round is None:
            self._epochs_per_round = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
            self._steps_per_round = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        trainer.num_sanity_val_steps = 0
        if self._epochs_per_round is not None and trainer.current_epoch:
            trainer.fit_loop.max_epochs = self._epochs_per_round + trainer.current_epoch
        if self._steps_per_round is not None and trainer.global_step:
            trainer.fit_loop.epoch_loop.max_steps = self._steps_per_round + trainer.global_step
        self.metrics = None
        self._received = None


class RestoreState(pl.Callback):
    """Keeps the optimizers' and schedulers' state from one round's fit to the next (each fit makes new ones)."""

    def __init__(self) -> None:
        super().__init__()
        self._optimizers: list[dict[str, Any]] | None = None
        self._schedulers: list[dict[str, Any]] | None = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self._optimizers is not None:
            for optimizer, state in zip(trainer.optimizers, self._optimizers, strict=False):
                optimizer.load_state_dict(state)
        if self._schedulers is not None:
            for config, state in zip(trainer.lr_scheduler_configs, self._schedulers, strict=False):
                config.scheduler.load_state_dict(state)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._optimizers = [optimizer.state_dict() for optimizer in trainer.optimizers]
        self._schedulers = [config.scheduler.state_dict() for config in trainer.lr_scheduler_configs]
