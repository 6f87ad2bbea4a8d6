"""SCAFFOLD's site side (Karimireddy et al. 2020, option II), with NVIDIA FLARE's ``PTScaffoldHelper`` interface.

The control variates travel with the model as extra named tensors (fl has no pickled meta):

* the task's params hold the global control ``c`` as ``scaffold_c_global.<parameter name>``;
* the result's params hold the change of this site's control ``c_i`` as ``scaffold_c_diff.<parameter name>``.

Only trainable parameters have controls (buffers such as BatchNorm statistics are plain model
state). fl's server sends a control for every floating-point tensor (it cannot tell parameters from
buffers): those of buffers are ignored and their change is sent as zeros. A training script::

    helper = PTScaffoldHelper(); helper.init(model)
    model_params, c_global = split_controls(input_model.params)
    model.load_state_dict(model_params); helper.load_global_controls(c_global)
    global_model = copy.deepcopy(model)
    c_global_para, c_local_para = helper.get_params()
    for x, y in batches:
        ...; optimizer.step()
        helper.model_update(model, lr, c_global_para, c_local_para)
    helper.terms_update(model, lr, c_global_para, c_local_para, global_model)
    flare.send(FLModel(params=with_control_diff(model.state_dict(), helper.get_delta_controls()), ...))
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "C_DIFF_PREFIX",
    "C_GLOBAL_PREFIX",
    "PTScaffoldHelper",
    "get_lr_values",
    "split_controls",
    "with_control_diff",
]

#: Name prefix of the global control tensors in a task's params.
C_GLOBAL_PREFIX = "scaffold_c_global."
#: Name prefix of the site's control change in a result's params.
C_DIFF_PREFIX = "scaffold_c_diff."

Controls = dict[str, torch.Tensor]


def get_lr_values(optimizer: torch.optim.Optimizer) -> list[float]:
    """The learning rate of each of the optimizer's parameter groups (FLARE's helper)."""
    return [float(group["lr"]) for group in optimizer.param_groups]


def _numpy_able(dtype: torch.dtype) -> torch.dtype:
    """``dtype``, or float32 for bfloat16 (numpy has no bfloat16)."""
    return torch.float32 if dtype == torch.bfloat16 else dtype


def split_controls(params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A task's params as (the model's params, the global controls by parameter name)."""
    model: dict[str, Any] = {}
    controls: dict[str, Any] = {}
    for name, value in params.items():
        if name.startswith(C_GLOBAL_PREFIX):
            controls[name[len(C_GLOBAL_PREFIX) :]] = value
        else:
            model[name] = value
    return model, controls


def with_control_diff(params: Mapping[str, Any], control_diff: Mapping[str, Any]) -> dict[str, Any]:
    """A result's params: the model's, plus the control change under ``scaffold_c_diff.`` names."""
    out = dict(params)
    for name, value in control_diff.items():
        out[C_DIFF_PREFIX + name] = value
    return out


class PTScaffoldHelper:
    """Local and global control variates of one site, kept on the CPU, for trainable parameters only."""

    def __init__(self) -> None:
        self.cnt = 0
        self.c_global: Controls = {}
        self.c_local: Controls = {}
        self.c_delta_para: dict[str, np.ndarray] | None = None
        self._model: weakref.ref[nn.Module] | None = None
        self._corrections: Controls = {}
        #: float buffers the server sent controls for: ignored, their change is zero
        self._buffer_controls: dict[str, np.ndarray] = {}

    def init(self, model: nn.Module) -> None:
        """Start with zero controls for every parameter of ``model`` (kept by weak reference)."""
        params = dict(model.named_parameters())
        if not params:
            raise ValueError("SCAFFOLD: the model has no parameters")
        self._model = weakref.ref(model)
        self.c_global = {k: torch.zeros_like(p.detach(), device="cpu") for k, p in params.items()}
        self.c_local = {k: torch.zeros_like(p.detach(), device="cpu") for k, p in params.items()}

    def _get_model(self) -> nn.Module:
        model = self._model() if self._model is not None else None
        if model is None:
            raise RuntimeError("SCAFFOLD: init(model) first (or the model was freed)")
        return model

    def load_global_controls(self, weights: Mapping[str, Any]) -> None:
        """Take the server's global controls (numpy arrays or tensors by parameter name); absent ones are 0."""
        model = self._get_model()
        params = dict(model.named_parameters())
        buffers = {k: b for k, b in model.named_buffers() if k not in params and b.is_floating_point()}
        self._buffer_controls = {
            k: torch.zeros_like(buffers[k], device="cpu", dtype=_numpy_able(buffers[k].dtype)).numpy()
            for k in weights
            if k in buffers
        }
        unknown = sorted(set(weights) - set(params) - set(buffers))
        if unknown:
            raise ValueError(f"SCAFFOLD: global controls for parameters the model lacks: {unknown[:5]}")
        controls: Controls = {}
        for key, param in params.items():
            if key not in weights:
                controls[key] = torch.zeros_like(param.detach(), device="cpu")
                continue
            value = torch.as_tensor(
                np.asarray(weights[key]) if not isinstance(weights[key], torch.Tensor) else weights[key]
            )
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(
                    f"SCAFFOLD: global control {key!r} has shape {tuple(value.shape)}, "
                    f"the parameter {tuple(param.shape)}"
                )
            controls[key] = value.detach().to(device="cpu", dtype=param.dtype)
        self.c_global = controls

    def get_params(self) -> tuple[Controls, Controls]:
        """Begin a round: (global controls, local controls) to pass to the update calls."""
        self.cnt = 0
        self.c_delta_para = None
        self._corrections = {}
        return dict(self.c_global), dict(self.c_local)

    def _correction(self, key: str, param: torch.Tensor, c_global: Controls, c_local: Controls) -> torch.Tensor:
        """``c - c_i`` for one parameter, on its device and in its dtype (computed once a round)."""
        cached = self._corrections.get(key)
        if cached is None or cached.device != param.device or cached.dtype != param.dtype:
            cached = c_global[key].to(param) - c_local[key].to(param)
            self._corrections[key] = cached
        return cached

    def model_update(self, model: nn.Module, curr_lr: float, c_global_para: Controls, c_local_para: Controls) -> None:
        """After an optimizer step: ``y <- y - lr * (c - c_i)`` on every trainable parameter."""
        with torch.no_grad():
            for key, param in model.named_parameters():
                if param.requires_grad:
                    param.add_(self._correction(key, param, c_global_para, c_local_para), alpha=-curr_lr)
        self.cnt += 1

    def terms_update(
        self,
        model: nn.Module,
        curr_lr: float,
        c_global_para: Controls,
        c_local_para: Controls,
        model_global: nn.Module,
    ) -> None:
        """End of round: ``c_i+ = c_i - c + (x - y) / (K * lr)`` (option II); keeps ``c_i+ - c_i`` for the result."""
        if self.cnt <= 0:
            raise RuntimeError("SCAFFOLD: terms_update needs at least one model_update this round")
        if not curr_lr > 0:
            raise ValueError(f"SCAFFOLD: the learning rate must be > 0, got {curr_lr!r}")
        global_state = model_global.state_dict()
        delta: dict[str, np.ndarray] = {}
        with torch.no_grad():
            for key, param in model.named_parameters():
                if not param.requires_grad:
                    continue
                correction = self._correction(key, param, c_global_para, c_local_para)
                new_local = (-correction + (global_state[key].to(param) - param) / (self.cnt * curr_lr)).cpu()
                change = new_local - c_local_para[key].to(new_local)
                delta[key] = change.to(_numpy_able(change.dtype)).numpy()
                self.c_local[key] = new_local
        self.c_delta_para = delta
        self._corrections = {}

    def get_delta_controls(self) -> dict[str, np.ndarray]:
        """This round's change of the local controls, by parameter name (``scaffold_c_diff.`` in the result)."""
        if self.c_delta_para is None:
            raise ValueError("SCAFFOLD: the control change is computed by terms_update, which has not run")
        return {**self.c_delta_para, **self._buffer_controls}
