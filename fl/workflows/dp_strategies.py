"""Server-side differential privacy as strategies on the round engine (Flower's names and parameters).

:class:`DifferentialPrivacyServerSideFixedClipping` and :class:`DifferentialPrivacyServerSideAdaptiveClipping`
are FedAvg subclasses, not wrappers of another strategy as Flower's are: each round, every update's
delta (to the model the sites trained) is clipped to the clipping norm, the clipped updates are
averaged uniformly (claimed weights are ignored: a site could otherwise escape the noise) and
Gaussian noise of std ``noise_multiplier * C / n`` is added to the average (the math is
:mod:`fl.workflows.dp`). The round's updates wait on the server's disk (``streams = False``, one
file per site) until the round closes, then are folded one at a time with their clip factors.
The noise multiplier and the job's (epsilon, delta) so far are logged every round and at the end;
the adaptive clipping norm is strategy state, so a restarted job resumes it. Epsilon is computed
without sampling amplification (the engine samples a fixed number of sites, not Poisson), which
over-states it: the safe side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fl.tensors import Layout, LayoutError, TensorSpec, check_finite
from fl.workflows.aggregation import NonFiniteAverage, ParamsType, WeightedAverage, from_accumulator, to_accumulator
from fl.workflows.base import JobContext, RoundFailed
from fl.workflows.dp import AdaptiveClipping, ClippedRound, FixedClipping, delta_norm, log_privacy
from fl.workflows.fedavg import FedAvg
from fl.workflows.support import Spooled, check_number

__all__ = ["DifferentialPrivacyServerSideAdaptiveClipping", "DifferentialPrivacyServerSideFixedClipping"]

Arrays = dict[str, np.ndarray]
#: delta of the (epsilon, delta) logged when none is given (a common choice below 1 / number of sites).
DEFAULT_DELTA = 1e-5


class _ServerSideDP(FedAvg):
    """FedAvg whose round aggregate is the noised uniform average of the clipped updates."""

    streams = False
    clipping: FixedClipping

    def _set_privacy(self, clipping: FixedClipping, num_sampled_clients: int, target_delta: float) -> None:
        if isinstance(num_sampled_clients, bool) or not isinstance(num_sampled_clients, int) or num_sampled_clients < 1:
            raise ValueError(
                f"{type(self).__name__}: num_sampled_clients must be an integer >= 1, got {num_sampled_clients!r}"
            )
        self.clipping = clipping
        self.num_sampled_clients = num_sampled_clients
        self.target_delta = check_number(type(self).__name__, "target_delta", target_delta, 0, 1, low_open=True)
        if self.target_delta == 1:
            raise ValueError(f"{type(self).__name__}: target_delta must be below 1, got 1")
        self._round: ClippedRound | None = None
        self._rng = np.random.default_rng()
        self._log: Any = None

    def run(self, ctx: JobContext) -> None:
        """Run the rounds, then log the job's noise multiplier and (epsilon, delta)."""
        self._log = ctx.log
        super().run(ctx)
        state = ctx.load_state() or {}
        rounds = int(state.get("next_round", self.num_rounds)) - self.start_round
        log_privacy(self.clipping, rounds, self.target_delta, logger=ctx.log, scope="the job")

    def combine(self, updates: list[Spooled], base_path: Path, layout: Layout, averager: WeightedAverage) -> None:
        """Fold each update with its clip factor and the base model with ``sum(1 - factor)`` (uniform weights)."""
        clipped = self.clipping.start_round()
        for update in updates:
            base = None if update.params_type == ParamsType.DIFF else base_path
            try:
                norm = delta_norm(update.path, layout, base)
            except LayoutError as exc:
                raise RoundFailed(f"{type(self).__name__}: the update of {update.site}: {exc}") from None
            averager.add_file(update.path, clipped.add(norm), params_type=update.params_type, base_path=base_path)
        if clipped.base_weight > 0:
            averager.add_file(base_path, clipped.base_weight)
        self._round = clipped

    def update_global(self, rnd: int, average: Arrays, model_path: Path, layout: Layout) -> Arrays:
        """The clipped average plus Gaussian noise; then adapt the clipping norm and log the privacy spent."""
        clipped, self._round = self._round, None
        assert clipped is not None, "combine() runs before update_global()"
        std = self.clipping.noise_std(clipped)
        noised = {spec.name: self._noised(spec, average[spec.name], std) for spec in layout.tensors}
        if self._log is not None:
            self._log.info(
                "round %d: %d updates clipped to norm %g (%d within it), noise std %g",
                rnd + 1,
                len(clipped.factors),
                clipped.clipping_norm,
                clipped.unclipped,
                std,
            )
            log_privacy(self.clipping, rnd + 1 - self.start_round, self.target_delta, logger=self._log, scope="so far")
        self.clipping.end_round(clipped, self._rng)
        return noised

    def _noised(self, spec: TensorSpec, values: np.ndarray, std: float) -> np.ndarray:
        """``values`` plus N(0, std^2) on each element of a float tensor (others unchanged)."""
        if not spec.is_float or std == 0:
            return values
        acc = to_accumulator(spec, values.reshape(-1))
        noise = self._rng.normal(0.0, std, acc.size).astype(acc.dtype)
        with np.errstate(over="ignore"):  # an overflow to Inf is refused just below
            out = from_accumulator(spec, acc + noise)
        try:
            check_finite(spec, out)
        except LayoutError as exc:
            raise NonFiniteAverage(f"the noised average is not finite: {exc}") from None
        return out.reshape(values.shape)

    def strategy_state(self) -> Arrays:
        """The clipping norm (the adaptive one moves each round), to resume with."""
        return {"dp.clipping_norm": np.array([self.clipping.clipping_norm], np.float64)}

    def load_strategy_state(self, arrays: Arrays) -> None:
        if "dp.clipping_norm" in arrays:
            self.clipping.clipping_norm = float(arrays["dp.clipping_norm"][0])


class DifferentialPrivacyServerSideFixedClipping(_ServerSideDP):
    """DP-FedAvg with a fixed clipping norm (Flower's ``DifferentialPrivacyServerSideFixedClipping``).

    ``noise_multiplier`` z and ``clipping_norm`` C: noise std ``z * C / n``, ``n`` the updates averaged
    (Flower uses ``num_sampled_clients``; the updates actually received are never more, so never less
    noise). ``target_delta`` is the delta of the (epsilon, delta) logged (fl's addition).
    """

    def __init__(
        self,
        *,
        noise_multiplier: float,
        clipping_norm: float,
        num_sampled_clients: int,
        target_delta: float = DEFAULT_DELTA,
        **engine_args: Any,
    ) -> None:
        super().__init__(**engine_args)
        self._set_privacy(FixedClipping(noise_multiplier, clipping_norm), num_sampled_clients, target_delta)


class DifferentialPrivacyServerSideAdaptiveClipping(_ServerSideDP):
    """DP-FedAvg whose clipping norm tracks a quantile of the update norms (Flower's ``...AdaptiveClipping``).

    Andrew et al. 2021: ``C <- C * exp(-clip_norm_lr * (noised unclipped fraction - target_clipped_quantile))``
    after each round; ``clipped_count_stddev`` defaults to ``num_sampled_clients / 20`` (Flower's).
    """

    def __init__(
        self,
        *,
        noise_multiplier: float,
        num_sampled_clients: int,
        initial_clipping_norm: float = 0.1,
        target_clipped_quantile: float = 0.5,
        clip_norm_lr: float = 0.2,
        clipped_count_stddev: float | None = None,
        target_delta: float = DEFAULT_DELTA,
        **engine_args: Any,
    ) -> None:
        super().__init__(**engine_args)
        clipping = AdaptiveClipping(
            noise_multiplier,
            num_sampled_clients,
            initial_clipping_norm=initial_clipping_norm,
            target_clipped_quantile=target_clipped_quantile,
            clip_norm_lr=clip_norm_lr,
            clipped_count_stddev=clipped_count_stddev,
        )
        self._set_privacy(clipping, num_sampled_clients, target_delta)
