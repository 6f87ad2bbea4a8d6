"""Server-side optimizers over the averaged update: FedAvgM and the FedOpt family (FedAdam, FedYogi, FedAdagrad).

Each round the engine averages the sites' models as FedAvg does; the new global model is then one
optimizer step along the pseudo-gradient ``delta = average - global`` (Reddi et al. 2020,
"Adaptive Federated Optimization", Algorithm 2; Hsu et al. 2019 for FedAvgM):

* FedAvgM:    ``v = momentum * v + delta``;  ``global += lr * v``
* FedAdam:    ``m = b1 * m + (1 - b1) * delta``;  ``v = b2 * v + (1 - b2) * delta**2``
* FedYogi:    same ``m``;  ``v = v - (1 - b2) * delta**2 * sign(v - delta**2)``
* FedAdagrad: same ``m``;  ``v = v + delta**2``
* the three adaptive ones: ``global += eta * m / (sqrt(v) + tau)``

Argument names and defaults are Flower's (``flwr.server.strategy``: ``eta``, ``eta_l``, ``beta_1``,
``beta_2``, ``tau``; ``server_learning_rate``, ``server_momentum``); no bias correction, as in the
paper. ``eta_l`` (the sites' learning rate) is sent to the sites in the train task's meta, where a
training script may read it. The step applies to floating-point tensors; integer tensors (e.g.
batch-norm step counters) take the plain average.

Server memory: the averager's one model, plus the optimizer's moments in float32 (float64 for
float64 tensors): one model more for FedAvgM (none with ``server_momentum=0``), two for the
adaptive ones. Moments are updated block by block (temporaries of one block), and saved with each
round's state as safetensors next to the model, so a restarted server resumes them exactly.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from fl.tensors import Layout, LayoutError, TensorSpec, check_finite, iter_blocks, open_tensors
from fl.workflows.aggregation import NonFiniteAverage, from_accumulator, to_accumulator
from fl.workflows.engine import Arrays, RoundEngine
from fl.workflows.support import check_number

__all__ = ["FedAdagrad", "FedAdam", "FedAvgM", "FedOpt", "FedYogi", "ServerOptimizer"]


class ServerOptimizer(RoundEngine):
    """A RoundEngine whose new global model is an optimizer step along ``average - global``."""

    #: Moment buffers this optimizer keeps per float tensor (subclasses name them).
    moment_names: tuple[str, ...] = ()

    def __init__(self, **engine_args: Any) -> None:
        super().__init__(**engine_args)
        self._moments: dict[str, dict[str, np.ndarray]] = {}

    def step(self, rnd: int, delta: np.ndarray, moments: dict[str, np.ndarray]) -> np.ndarray:
        """The update to add to the global block, given its pseudo-gradient ``delta`` (whose memory it may reuse).

        Updates ``moments`` (this block's slices) in place.
        """
        raise NotImplementedError

    def update_global(self, rnd: int, average: Arrays, model_path: Path, layout: Layout) -> Arrays:
        """Replace ``average``'s float tensors, block by block, with ``global + step(average - global)``."""
        f, global_layout, offset = open_tensors(model_path)
        with f:
            specs = global_layout.by_name()
            for spec in layout.tensors:
                if spec.is_float:
                    self._update_tensor(
                        rnd, spec, average[spec.name].reshape(-1), iter_blocks(f, specs[spec.name], offset)
                    )
        return average

    def _update_tensor(self, rnd: int, spec: TensorSpec, flat: np.ndarray, global_blocks: Any) -> None:
        moments = self._moments_for(spec)
        for start, block in global_blocks:
            end = start + block.size
            base = to_accumulator(spec, block)
            with np.errstate(over="ignore", invalid="ignore"):  # a non-finite step is refused just below
                delta = np.subtract(to_accumulator(spec, flat[start:end]), base)
                new = self.step(rnd, delta, {k: m[start:end] for k, m in moments.items()})
                new += base
                out = from_accumulator(spec, new)
            try:
                check_finite(spec, out)
            except LayoutError as exc:
                raise NonFiniteAverage(f"{type(self).__name__}'s server step is not finite: {exc}") from None
            flat[start:end] = out

    def _moments_for(self, spec: TensorSpec) -> dict[str, np.ndarray]:
        """``spec``'s moment buffers (zeros at first; checked against the tensor's size when resumed)."""
        moments = self._moments.setdefault(spec.name, {})
        acc = np.float64 if spec.dtype == "F64" else np.float32
        for name in self.moment_names:
            buffer = moments.get(name)
            if buffer is None:
                moments[name] = np.zeros(spec.numel, dtype=acc)
            elif buffer.size != spec.numel or buffer.dtype != acc:
                raise ValueError(
                    f"{type(self).__name__}: saved moment {name!r} of tensor {spec.name!r} has {buffer.size} "
                    f"{buffer.dtype} values, the model's tensor {spec.numel} ({spec.dtype}); the state does not match"
                )
        return moments

    def strategy_state(self) -> Arrays:
        return {f"{name}:{tensor}": m for tensor, moments in self._moments.items() for name, m in moments.items()}

    def load_strategy_state(self, arrays: Arrays) -> None:
        self._moments = {}
        for key, value in arrays.items():
            name, _, tensor = key.partition(":")
            if name not in self.moment_names or not tensor:
                raise ValueError(f"{type(self).__name__}: unexpected tensor {key!r} in its saved state")
            self._moments.setdefault(tensor, {})[name] = np.array(value, copy=True).reshape(-1)


class FedAvgM(ServerOptimizer):
    """FedAvg with server momentum (Hsu et al. 2019).

    ``v = server_momentum * v + delta``; ``global += server_learning_rate * v``.

    Defaults as Flower's ``FedAvgM`` (``server_learning_rate=1.0``, ``server_momentum=0.0``: plain
    FedAvg); the paper's experiments use ``server_momentum=0.9``. Other arguments: :class:`FedAvg`'s.
    """

    def __init__(self, *, server_learning_rate: float = 1.0, server_momentum: float = 0.0, **engine_args: Any) -> None:
        super().__init__(**engine_args)
        owner = type(self).__name__
        self.server_learning_rate = check_number(
            owner, "server_learning_rate", server_learning_rate, 0, 1e6, low_open=True
        )
        self.server_momentum = check_number(owner, "server_momentum", server_momentum, 0, 1)
        self.moment_names = ("momentum",) if self.server_momentum > 0 else ()

    def learning_rate(self, rnd: int) -> float:
        """The server learning rate of round ``rnd`` (constant here; FLARE's FedOpt schedules it)."""
        return self.server_learning_rate

    def step(self, rnd: int, delta: np.ndarray, moments: dict[str, np.ndarray]) -> np.ndarray:
        lr = self.learning_rate(rnd)
        if self.moment_names:
            velocity = moments["momentum"]
            velocity *= self.server_momentum
            velocity += delta
            np.copyto(delta, velocity)
        delta *= lr
        return delta


class _Adaptive(ServerOptimizer):
    """FedAdam / FedYogi / FedAdagrad: Adam's first moment ``m``, ``v`` per subclass, ``eta * m / (sqrt(v) + tau)``."""

    moment_names = ("m", "v")

    def _set_hyperparameters(self, *, eta: float, eta_l: float, beta_1: float, beta_2: float, tau: float) -> None:
        """Check and keep the optimizer's hyperparameters (each subclass has its own defaults)."""
        owner = type(self).__name__
        self.eta = check_number(owner, "eta", eta, 0, 1e6, low_open=True)
        self.eta_l = check_number(owner, "eta_l", eta_l, 0, 1e6, low_open=True)
        self.beta_1 = check_number(owner, "beta_1", beta_1, 0, 1)
        self.beta_2 = check_number(owner, "beta_2", beta_2, 0, 1)
        self.tau = check_number(owner, "tau", tau, 0, 1e6, low_open=True)

    def train_meta(self, rnd: int) -> dict[str, Any]:
        return {"eta_l": self.eta_l}

    def second_moment(self, v: np.ndarray, delta_squared: np.ndarray) -> None:
        """Update ``v`` in place from ``delta**2`` (a scratch buffer it may overwrite)."""
        raise NotImplementedError

    def step(self, rnd: int, delta: np.ndarray, moments: dict[str, np.ndarray]) -> np.ndarray:
        m, v = moments["m"], moments["v"]
        scratch = np.multiply(delta, 1.0 - self.beta_1)
        m *= self.beta_1
        m += scratch
        self.second_moment(v, np.square(delta, out=scratch))
        denominator = np.sqrt(v, out=scratch)
        denominator += self.tau
        np.divide(m, denominator, out=delta)
        delta *= self.eta
        return delta


class FedAdam(_Adaptive):
    """FedAdam (Reddi et al. 2020): ``v = beta_2 * v + (1 - beta_2) * delta**2``. Defaults as Flower's FedAdam."""

    def __init__(
        self,
        *,
        eta: float = 1e-1,
        eta_l: float = 1e-1,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-9,
        **engine_args: Any,
    ) -> None:
        super().__init__(**engine_args)
        self._set_hyperparameters(eta=eta, eta_l=eta_l, beta_1=beta_1, beta_2=beta_2, tau=tau)

    def second_moment(self, v: np.ndarray, delta_squared: np.ndarray) -> None:
        v *= self.beta_2
        delta_squared *= 1.0 - self.beta_2
        v += delta_squared


class FedYogi(_Adaptive):
    """FedYogi (Reddi et al. 2020): ``v -= (1 - beta_2) * delta**2 * sign(v - delta**2)``; Flower's defaults."""

    def __init__(
        self,
        *,
        eta: float = 1e-2,
        eta_l: float = 0.0316,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-3,
        **engine_args: Any,
    ) -> None:
        super().__init__(**engine_args)
        self._set_hyperparameters(eta=eta, eta_l=eta_l, beta_1=beta_1, beta_2=beta_2, tau=tau)

    def second_moment(self, v: np.ndarray, delta_squared: np.ndarray) -> None:
        sign = np.sign(np.subtract(v, delta_squared))
        delta_squared *= sign
        delta_squared *= 1.0 - self.beta_2
        v -= delta_squared


class FedAdagrad(_Adaptive):
    """FedAdagrad (Reddi et al. 2020): ``v = v + delta**2``; Flower's defaults (``beta_1=0``: ``m = delta``)."""

    def __init__(
        self,
        *,
        eta: float = 1e-1,
        eta_l: float = 1e-1,
        beta_1: float = 0.0,
        tau: float = 1e-9,
        **engine_args: Any,
    ) -> None:
        super().__init__(**engine_args)
        self._set_hyperparameters(eta=eta, eta_l=eta_l, beta_1=beta_1, beta_2=0.0, tau=tau)

    def second_moment(self, v: np.ndarray, delta_squared: np.ndarray) -> None:
        v += delta_squared


_SGD = "torch.optim.SGD"
_COSINE = "torch.optim.lr_scheduler.CosineAnnealingLR"


class FedOpt(FedAvgM):
    """NVIDIA FLARE's ``FedOpt`` (``nvflare.app_opt.pt.fedopt_ctl``) with its arguments, computed without torch.

    ``optimizer_args`` must name ``torch.optim.SGD`` (``lr``, ``momentum``: FedAvgM's step; FLARE's
    default ``lr=1.0, momentum=0.6``); ``lr_scheduler_args`` ``torch.optim.lr_scheduler.CosineAnnealingLR``
    (``T_max``, ``eta_min``; FLARE's default ``T_max=3, eta_min=0.9``), or ``{}`` for a constant rate.
    ``source_model`` and ``device`` are accepted for FLARE's configs and unused (the server steps
    every float tensor in numpy; FLARE averages non-parameter buffers such as batch-norm statistics).
    """

    def __init__(
        self,
        *,
        source_model: str | None = None,
        optimizer_args: dict[str, Any] | None = None,
        lr_scheduler_args: dict[str, Any] | None = None,
        device: str | None = None,
        **engine_args: Any,
    ) -> None:
        optimizer = {"path": _SGD, "args": {"lr": 1.0, "momentum": 0.6}} if optimizer_args is None else optimizer_args
        opt_args = self._spec_args("optimizer_args", optimizer, _SGD, {"lr", "momentum"})
        super().__init__(
            server_learning_rate=opt_args.get("lr", 1.0), server_momentum=opt_args.get("momentum", 0.0), **engine_args
        )
        self.source_model, self.device = source_model, device
        self.schedule: tuple[float, float] | None = None  # (T_max, eta_min)
        if lr_scheduler_args == {}:
            return  # no scheduler: a constant learning rate
        scheduler = lr_scheduler_args or {"path": _COSINE, "args": {"T_max": 3, "eta_min": 0.9}}
        sched_args = self._spec_args("lr_scheduler_args", scheduler, _COSINE, {"T_max", "eta_min"})
        t_max = check_number("FedOpt", "lr_scheduler_args T_max", sched_args.get("T_max"), 0, 1e9, low_open=True)
        eta_min = check_number("FedOpt", "lr_scheduler_args eta_min", sched_args.get("eta_min", 0.0), 0, 1e6)
        self.schedule = (t_max, eta_min)

    @staticmethod
    def _spec_args(what: str, spec: Any, path: str, accepted: set[str]) -> dict[str, Any]:
        """The ``args`` of FLARE's ``{"path", "args"}`` ``spec``: it must name ``path``, only ``accepted`` args."""
        if not isinstance(spec, dict) or spec.get("path") != path:
            shown = spec.get("path") if isinstance(spec, dict) else spec
            raise ValueError(f"FedOpt: {what} path {shown!r} is not supported; fl's FedOpt supports {path}")
        args = spec.get("args") or {}
        unknown = sorted(set(args) - accepted) if isinstance(args, dict) else ["(args is not an object)"]
        if unknown:
            raise ValueError(
                f"FedOpt: {what} for {path}: unsupported arguments {unknown}; supported: {sorted(accepted)}"
            )
        return dict(args)

    def learning_rate(self, rnd: int) -> float:
        """``CosineAnnealingLR``'s rate after ``rnd`` steps (its closed form), or the constant rate."""
        if self.schedule is None:
            return self.server_learning_rate
        t_max, eta_min = self.schedule
        return eta_min + (self.server_learning_rate - eta_min) * (1 + math.cos(math.pi * rnd / t_max)) / 2
