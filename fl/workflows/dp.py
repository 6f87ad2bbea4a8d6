"""Server-side differential privacy: clip each update, add Gaussian noise to the average, account epsilon.

As Flower's ``DifferentialPrivacyServerSideFixedClipping`` / ``...AdaptiveClipping`` (DP-FedAvg,
McMahan et al. 2018; adaptive clipping, Andrew et al. 2021, "Differentially Private Learning with
Adaptive Clipping"), in fl's streaming form:

* :func:`delta_norm` reads an update and its base (the global model the task carried) block by
  block and returns the L2 norm of the difference over the float tensors (integer counters such as
  ``num_batches_tracked`` are not parameters and would dominate the norm).
* :meth:`FixedClipping.clip` turns the norms into **fold weights**: clipping update ``i`` by
  ``f_i = min(1, C / norm_i)`` and averaging uniformly is the same as folding update ``i`` with weight
  ``f_i`` and the base model itself (as a FULL model, for DIFF updates too) with weight
  ``sum(1 - f_i)`` (skip it when 0) into a :class:`WeightedAverage`. No clipped copy is written.
  Weights are uniform, not the sites' claimed sample counts: a site could otherwise claim a large
  weight and escape the noise calibrated to ``C / n``.
* :func:`add_gaussian_noise` writes the average plus N(0, std^2) on every float element, std =
  ``noise_multiplier * C / n`` (n the updates averaged), streamed file to file.
* :func:`private_average` does one round over update files (clip, fold, noise, adapt); an engine
  can do the same as results arrive: the round's clipping norm is fixed, so each update's weight is
  known once its norm is (:meth:`ClippedRound.add`), and only the base's weight waits for the close.
* :func:`job_epsilon` is the job's (epsilon, delta) after its rounds: Google's ``dp-accounting`` RDP
  accountant when installed (``pip install fl[dp]``), else the RDP of the Gaussian mechanism
  (Mironov 2017, Prop. 7: ``alpha / (2 z^2)`` per round) with the conversion of Balle et al. 2020
  (Thm. 21), which ignores sampling amplification (an upper bound).

Noise comes from numpy's PCG64 seeded from the OS, as Flower's.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fl.tensors import Layout, check_finite, iter_blocks, open_tensors
from fl.tensors.io import as_byte_view, write_layout
from fl.workflows.aggregation import ParamsType, WeightedAverage, accumulator_dtype, from_accumulator, to_accumulator

__all__ = [
    "AdaptiveClipping",
    "ClippedRound",
    "FixedClipping",
    "add_gaussian_noise",
    "clip_factor",
    "delta_norm",
    "job_epsilon",
    "log_privacy",
    "private_average",
    "rdp_gaussian_epsilon",
]

PathLike = str | os.PathLike[str]
log = logging.getLogger("fl.dp")

#: RDP orders searched for the best conversion (the dp-accounting library's defaults).
RDP_ORDERS: tuple[float, ...] = (
    *(1 + x / 10.0 for x in range(1, 100)),
    *(float(x) for x in range(12, 64)),
    128.0,
    256.0,
    512.0,
    1024.0,
)


def _positive(name: str, value: object, *, zero_ok: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not zero_ok):  # type: ignore[operator]
        bound = ">= 0" if zero_ok else "> 0"
        raise ValueError(f"differential privacy: {name} must be a finite number {bound}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def delta_norm(path: PathLike, layout: Layout, base_path: PathLike | None = None) -> float:
    """L2 norm over the float tensors of ``path - base_path`` (of ``path`` itself for a DIFF update)."""
    f, file_layout, offset = open_tensors(path)
    with f:
        file_layout.check_matches(layout)
        specs = file_layout.by_name()
        base = open_tensors(base_path) if base_path is not None else None
        try:
            if base is not None:
                base[1].check_matches(layout)
            total = 0.0
            for spec in layout.tensors:
                if not spec.is_float:
                    continue
                blocks = iter_blocks(f, specs[spec.name], offset)
                base_blocks = iter_blocks(base[0], base[1].by_name()[spec.name], base[2]) if base else None
                for _, block in blocks:
                    values = to_accumulator(spec, block).astype(np.float64)
                    if base_blocks is not None:
                        values -= to_accumulator(spec, next(base_blocks)[1])
                    total += float(np.dot(values, values))
        finally:
            if base is not None:
                base[0].close()
    return math.sqrt(total)


def clip_factor(norm: float, clipping_norm: float) -> float:
    """The factor that scales an update of L2 ``norm`` to at most ``clipping_norm`` (1.0 if it is within)."""
    return 1.0 if norm <= clipping_norm else clipping_norm / norm


class ClippedRound:
    """One round's clipping, built as results arrive: per update its factor (= fold weight), and the base's weight.

    The clipping norm is fixed for the round, so each update can be folded as soon as its norm is
    known (:meth:`add`); the base model is folded with :attr:`base_weight` when the round closes.
    """

    def __init__(self, clipping_norm: float) -> None:
        self.clipping_norm = clipping_norm
        self.factors: list[float] = []
        #: updates whose norm was within the clipping norm (the bit Andrew et al.'s quantile counts)
        self.unclipped = 0

    def add(self, norm: float) -> float:
        """Clip one more update of delta L2 ``norm``; returns its fold weight ``min(1, C / norm)``."""
        _positive("an update's norm", norm, zero_ok=True)
        factor = clip_factor(norm, self.clipping_norm)
        self.factors.append(factor)
        self.unclipped += norm <= self.clipping_norm
        return factor

    @property
    def update_weights(self) -> tuple[float, ...]:
        """Fold weights for the updates, in the order added (uniform averaging of the clipped updates)."""
        return tuple(self.factors)

    @property
    def base_weight(self) -> float:
        """Fold weight of the base model: ``sum(1 - f_i)`` (0 when nothing was clipped)."""
        return math.fsum(1.0 - f for f in self.factors)


class FixedClipping:
    """Fixed clipping norm ``C`` and Gaussian noise ``noise_multiplier * C / n`` on the average (Flower's)."""

    def __init__(self, noise_multiplier: float, clipping_norm: float) -> None:
        self.noise_multiplier = _positive("noise_multiplier", noise_multiplier, zero_ok=True)
        self.clipping_norm = _positive("clipping_norm", clipping_norm)
        #: the multiplier of the noise added to the model (adaptive clipping spends part on the count)
        self.model_noise_multiplier = self.noise_multiplier

    def start_round(self) -> ClippedRound:
        """A round's clipping at the current norm; add each update's norm as it arrives."""
        return ClippedRound(self.clipping_norm)

    def clip(self, norms: Sequence[float]) -> ClippedRound:
        """Fold weights that average the updates of these delta ``norms`` clipped to the current norm."""
        clipped = self.start_round()
        for norm in norms:
            clipped.add(norm)
        return clipped

    def noise_std(self, clipped: ClippedRound) -> float:
        """Standard deviation of the noise on the average of ``clipped``'s updates (sensitivity C / n)."""
        if not clipped.factors:
            raise ValueError("differential privacy: no updates were clipped this round")
        return self.model_noise_multiplier * clipped.clipping_norm / len(clipped.factors)

    def end_round(self, clipped: ClippedRound, rng: np.random.Generator | None = None) -> None:
        """Adapt the state after a round (nothing to adapt for a fixed norm)."""


class AdaptiveClipping(FixedClipping):
    """Clipping norm that tracks a quantile of the update norms (Andrew et al. 2021, as Flower's).

    After each round ``C <- C * exp(-clip_norm_lr * (b / n - target_clipped_quantile))`` with ``b`` the
    count of unclipped updates plus N(0, clipped_count_stddev^2) noise. That count costs privacy too,
    so the model's noise multiplier is ``(z^-2 - (2 * clipped_count_stddev)^-2)^-1/2`` and the whole
    is as private as the Gaussian mechanism with ``noise_multiplier`` z (their Theorem 1).
    """

    def __init__(
        self,
        noise_multiplier: float,
        num_sampled_clients: int,
        initial_clipping_norm: float = 0.1,
        target_clipped_quantile: float = 0.5,
        clip_norm_lr: float = 0.2,
        clipped_count_stddev: float | None = None,
    ) -> None:
        super().__init__(noise_multiplier, initial_clipping_norm)
        if not (isinstance(num_sampled_clients, int) and num_sampled_clients > 0):
            raise ValueError(f"differential privacy: num_sampled_clients must be > 0, got {num_sampled_clients!r}")
        if not (isinstance(target_clipped_quantile, int | float) and 0 <= target_clipped_quantile <= 1):
            raise ValueError(
                f"differential privacy: target_clipped_quantile must be in [0, 1], got {target_clipped_quantile!r}"
            )
        self.target_clipped_quantile = float(target_clipped_quantile)
        self.clip_norm_lr = _positive("clip_norm_lr", clip_norm_lr)
        if clipped_count_stddev is None:
            clipped_count_stddev = num_sampled_clients / 20 if self.noise_multiplier > 0 else 0.0
        self.clipped_count_stddev = _positive("clipped_count_stddev", clipped_count_stddev, zero_ok=True)
        self.model_noise_multiplier = self._model_noise_multiplier()

    def _model_noise_multiplier(self) -> float:
        z, sigma_b = self.noise_multiplier, self.clipped_count_stddev
        if z == 0 or sigma_b == 0:
            return z
        if 2 * sigma_b <= z:
            raise ValueError(
                f"differential privacy: clipped_count_stddev {sigma_b:g} must exceed noise_multiplier / 2 "
                f"({z / 2:g}), or no noise is left for the model"
            )
        return float((z**-2 - (2 * sigma_b) ** -2) ** -0.5)

    def end_round(self, clipped: ClippedRound, rng: np.random.Generator | None = None) -> None:
        """Move the clipping norm toward the target quantile, from the noised count of unclipped updates."""
        if not clipped.factors:
            raise ValueError("differential privacy: no updates were clipped this round")
        rng = rng or np.random.default_rng()
        noised = clipped.unclipped + (rng.normal(0.0, self.clipped_count_stddev) if self.clipped_count_stddev else 0.0)
        fraction = noised / len(clipped.factors)
        self.clipping_norm *= math.exp(-self.clip_norm_lr * (fraction - self.target_clipped_quantile))


def _noised_pieces(
    f: Any, layout: Layout, offset: int, std: float, rng: np.random.Generator
) -> Iterator[memoryview | bytes]:
    specs = layout.by_name()
    for spec in layout.tensors:
        for _, block in iter_blocks(f, specs[spec.name], offset):
            if not spec.is_float or std == 0:
                yield bytes(as_byte_view(block))
                continue
            values = to_accumulator(spec, block) + rng.normal(0.0, std, block.size).astype(accumulator_dtype(spec))
            with np.errstate(over="ignore"):  # an overflow to Inf is refused just below
                noised = from_accumulator(spec, values)
            check_finite(spec, noised)
            yield as_byte_view(np.ascontiguousarray(noised))


def add_gaussian_noise(
    src: PathLike,
    dst: PathLike,
    std: float,
    *,
    rng: np.random.Generator | None = None,
    metadata: Mapping[str, str] | None = None,
    digest: Any = None,
) -> Layout:
    """Write ``src`` plus N(0, std^2) noise on every float element to ``dst``, atomically, block by block."""
    std = _positive("the noise's standard deviation", std, zero_ok=True)
    rng = rng or np.random.default_rng()
    f, layout, offset = open_tensors(src)
    with f:
        out = Layout(layout.tensors, dict(metadata if metadata is not None else layout.metadata))
        return write_layout(dst, out, _noised_pieces(f, layout, offset, std, rng), digest=digest)


def private_average(
    clipping: FixedClipping,
    paths: Sequence[PathLike],
    layout: Layout,
    base_path: PathLike,
    out_path: PathLike,
    *,
    params_type: str = ParamsType.FULL,
    rng: np.random.Generator | None = None,
    metadata: Mapping[str, str] | None = None,
    digest: Any = None,
) -> ClippedRound:
    """One DP round over update files: clip, average uniformly, add noise to ``out_path``, adapt the norm.

    The round engine may do the same as results arrive (``start_round``, ``add`` each norm and fold
    with the weight it returns, fold the base, then :func:`add_gaussian_noise` and ``end_round``).
    """
    rng = rng or np.random.default_rng()
    clipped = clipping.start_round()
    average = WeightedAverage(layout)
    for path in paths:
        norm = delta_norm(path, layout, None if params_type == ParamsType.DIFF else base_path)
        average.add_file(path, clipped.add(norm), params_type=params_type, base_path=base_path)
    if clipped.base_weight > 0:
        average.add_file(base_path, clipped.base_weight)
    unnoised = Path(out_path).with_name(f".{Path(out_path).name}.unnoised")  # never the result: removed below
    try:
        average.write_result(unnoised)
        add_gaussian_noise(unnoised, out_path, clipping.noise_std(clipped), rng=rng, metadata=metadata, digest=digest)
    finally:
        unnoised.unlink(missing_ok=True)
    clipping.end_round(clipped, rng)
    return clipped


def rdp_gaussian_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Epsilon of ``rounds`` Gaussian mechanisms of multiplier z (no sampling), by RDP.

    RDP(alpha) = rounds * alpha / (2 z^2) (Mironov 2017, Prop. 7), converted with Balle et al. 2020,
    Thm. 21: eps = RDP + log((alpha - 1) / alpha) - (log delta + log alpha) / (alpha - 1), best order.
    """
    z = _positive("noise_multiplier", noise_multiplier)
    best = math.inf
    for alpha in RDP_ORDERS:
        rdp = rounds * alpha / (2 * z * z)
        eps = rdp + math.log1p(-1 / alpha) - (math.log(delta) + math.log(alpha)) / (alpha - 1)
        best = min(best, eps)
    return max(0.0, best)


def job_epsilon(noise_multiplier: float, rounds: int, delta: float, sample_rate: float = 1.0) -> tuple[float, str]:
    """(epsilon, how it was computed) of a job of ``rounds`` noised rounds at ``delta``.

    ``sample_rate`` is the fraction of sites a round samples (Poisson sampling assumed, as the
    accountant's); without ``dp-accounting`` it is ignored, which over-states epsilon (safe side).
    """
    if not (isinstance(rounds, int) and rounds >= 0):
        raise ValueError(f"differential privacy: rounds must be an integer >= 0, got {rounds!r}")
    if not (isinstance(delta, float | int) and 0 < delta < 1):
        raise ValueError(f"differential privacy: delta must be in (0, 1), got {delta!r}")
    if not (isinstance(sample_rate, float | int) and 0 < sample_rate <= 1):
        raise ValueError(f"differential privacy: sample_rate must be in (0, 1], got {sample_rate!r}")
    if noise_multiplier == 0:
        return math.inf, "no noise"
    if rounds == 0:
        return 0.0, "no rounds"
    try:
        from dp_accounting import dp_event
        from dp_accounting.rdp import rdp_privacy_accountant
    except ImportError:
        return rdp_gaussian_epsilon(noise_multiplier, rounds, delta), "RDP Gaussian (Mironov 2017), no sampling"
    event: Any = dp_event.GaussianDpEvent(noise_multiplier)
    if sample_rate < 1:
        event = dp_event.PoissonSampledDpEvent(sample_rate, event)
    accountant = rdp_privacy_accountant.RdpAccountant(list(RDP_ORDERS))
    accountant.compose(event, count=rounds)
    return float(accountant.get_epsilon(delta)), "dp-accounting RDP"


def log_privacy(
    clipping: FixedClipping,
    rounds: int,
    delta: float,
    sample_rate: float = 1.0,
    *,
    logger: logging.Logger | logging.LoggerAdapter[Any] = log,
    scope: str = "",
) -> float:
    """Log the job's noise multiplier, clipping norm and (epsilon, delta); returns epsilon.

    ``scope`` (e.g. "so far", "the job") is said after "differential privacy" in the line.
    """
    eps, how = job_epsilon(clipping.noise_multiplier, rounds, delta, sample_rate)
    logger.info(
        "differential privacy%s: noise_multiplier=%g (model %g) clipping_norm=%g rounds=%d sample_rate=%g "
        "epsilon=%.4g delta=%g (%s)",
        f" ({scope})" if scope else "",
        clipping.noise_multiplier,
        clipping.model_noise_multiplier,
        clipping.clipping_norm,
        rounds,
        sample_rate,
        eps,
        delta,
        how,
    )
    return eps
