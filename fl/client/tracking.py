"""Experiment tracking from a training script: the values reach the server's TensorBoard receiver."""

from __future__ import annotations

from typing import Any

import fl.client as _api

__all__ = ["SummaryWriter"]


class SummaryWriter:
    """A TensorBoard-style writer whose points are sent to the server (``tb_events/<site>/``)."""

    def __init__(self, *_: Any, **__: Any) -> None:
        # Arguments of torch's SummaryWriter (log_dir, ...) are accepted and ignored: the server
        # decides where the events are written.
        pass

    def add_scalar(self, tag: str, scalar: Any, global_step: int | None = None, **kwargs: Any) -> None:
        _api.log(tag, scalar, "SCALAR", global_step, **kwargs)

    def add_scalars(self, tag: str, scalars: dict[str, Any], global_step: int | None = None, **kwargs: Any) -> None:
        _api.log(tag, scalars, "SCALARS", global_step, **kwargs)

    def flush(self) -> None:
        """Points are sent as they are added; nothing to flush."""

    def close(self) -> None:
        pass
