"""Federated averaging: each round, sites train on the global model; the server averages the results.

Weights are each result's ``NUM_STEPS_CURRENT_ROUND`` (equal weights when it is absent); a claimed
weight that is not a number in ``(0, max_weight]`` refuses that result (see :func:`result_weight`). Results
are folded into the average as they arrive (see :mod:`fl.workflows.aggregation`), so server memory
does not grow with the number of sites. Metrics that sites send with a train result describe the
model they received, i.e. the global model of the previous round (the initial model in round 1/N);
after the last round a ``validate`` task measures the final model (skipped when sites report no
metrics). Round indices, model versions and their labels follow :mod:`fl.rounds`.
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fl.checksum import Checksum
from fl.client.model import FLMetaKey
from fl.rounds import model_label, round_label
from fl.tensors import Layout, open_tensors
from fl.workflows.aggregation import (
    NonFiniteAverage,
    ParamsType,
    WeightedAverage,
    capped_weights,
    weighted_metrics,
)
from fl.workflows.base import Controller, JobContext, RoundFailed, TaskResult, TaskSpec

__all__ = ["DEFAULT_MAX_WEIGHT", "FedAvg", "result_weight"]

TRAIN_TASK = "train"
VALIDATE_TASK = "validate"
#: The largest weight a site may claim by default. A weight is a count of steps or samples in one
#: round: 1e9 is beyond any honest round, yet far below where float32 sums overflow (3.4e38), and
#: sums of such weights over any number of sites stay exact in float64 (integers up to 2**53).
DEFAULT_MAX_WEIGHT = 1e9
_MAX_SHOWN = 60  # characters of a refused value shown in the error


def result_weight(
    meta: dict[str, Any],
    key: str = FLMetaKey.NUM_STEPS_CURRENT_ROUND,
    *,
    site: str = "a site",
    max_weight: float = DEFAULT_MAX_WEIGHT,
) -> float:
    """A result's aggregation weight: ``meta[key]``, or 1 when the site claims none (key absent, as FLARE).

    A claim that is not a number in ``(0, max_weight]`` (a bool, string, null, NaN, Inf, zero,
    negative or too large) is refused: :class:`ValueError` naming the site, the value and the bound.
    """
    if key not in meta:
        return 1.0
    value = meta[key]
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= max_weight:
        return float(value)
    shown = repr(value)
    shown = shown if len(shown) <= _MAX_SHOWN else shown[:_MAX_SHOWN] + "..."
    raise ValueError(
        f"{site} claimed {key}={shown}: a weight must be a number greater than 0 and at most {max_weight:g} "
        "(FedAvg max_weight)"
    )


def read_layout(path: Path) -> Layout:
    f, layout, _ = open_tensors(path)
    f.close()
    return layout


class FedAvg(Controller):
    """FedAvg over ``num_rounds`` rounds with ``num_clients`` sites a round (at least ``min_clients``).

    Parameters
    ----------
    num_clients:
        Sites asked to train each round (sampled at random if more are in the job).
    num_rounds:
        Rounds to run.
    min_clients:
        Results needed for a round to count; defaults to ``num_clients``.
    round_timeout:
        Seconds a round waits for results before going on with what arrived (if at least
        ``min_clients``) or failing the job.
    persistor_id:
        The component that loads the initial model and saves global models.
    final_validation:
        After the last round, ask sites to evaluate the final model (only if they report metrics).
    site_wait_timeout:
        When fewer than ``min_clients`` sites are available at the start of a round (e.g. some are
        restarting), how long to wait for them before failing the job.
    max_weight:
        The largest weight (``aggregation_weight_key``) a site may claim; a result claiming more,
        or anything but a positive number, is refused (see :data:`DEFAULT_MAX_WEIGHT`).
    max_site_share:
        If set (in ``(0, 1]``, at least ``1 / min_clients``), no site's share of the average exceeds
        it: the largest weights are lowered to a common cap when the round closes
        (:func:`~fl.workflows.aggregation.capped_weights`). The round's updates then wait on the
        server's disk (one model file per site, not memory) and are folded after the round closes.
    """

    def __init__(
        self,
        *,
        num_clients: int = 2,
        num_rounds: int = 5,
        min_clients: int | None = None,
        round_timeout: float = 3600.0,
        persistor_id: str = "persistor",
        aggregation_weight_key: str = FLMetaKey.NUM_STEPS_CURRENT_ROUND,
        final_validation: bool = True,
        start_round: int = 0,
        site_wait_timeout: float = 300.0,
        max_weight: float = DEFAULT_MAX_WEIGHT,
        max_site_share: float | None = None,
    ) -> None:
        if num_clients < 1:
            raise ValueError(f"num_clients must be at least 1, got {num_clients}")
        if num_rounds < 1:
            raise ValueError(f"num_rounds must be at least 1, got {num_rounds}")
        if min_clients is not None and not 1 <= min_clients <= num_clients:
            raise ValueError(f"min_clients must be between 1 and num_clients ({num_clients}), got {min_clients}")
        if round_timeout <= 0:
            raise ValueError(f"round_timeout must be positive, got {round_timeout}")
        if isinstance(max_weight, bool) or not isinstance(max_weight, int | float) or not 0 < max_weight < math.inf:
            raise ValueError(f"max_weight must be a positive finite number, got {max_weight!r}")
        if max_site_share is not None and not (
            isinstance(max_site_share, int | float) and not isinstance(max_site_share, bool) and 0 < max_site_share <= 1
        ):
            raise ValueError(f"max_site_share must be a number in (0, 1], got {max_site_share!r}")
        if max_site_share is not None and max_site_share * (min_clients or num_clients) < 1:
            raise ValueError(
                f"max_site_share {max_site_share:g} cannot be met by a round of {min_clients or num_clients} results "
                "(min_clients): it must be at least 1 / min_clients"
            )
        self.num_clients = num_clients
        self.num_rounds = num_rounds
        self.min_clients = min_clients or num_clients
        self._clients_setting = (
            f"num_clients={num_clients}, min_clients={min_clients}"
            if min_clients
            else f"num_clients={num_clients}, so min_clients={num_clients}"
        )
        self.round_timeout = round_timeout
        self.persistor_id = persistor_id
        self.aggregation_weight_key = aggregation_weight_key
        self.final_validation = final_validation
        self.start_round = start_round
        self.site_wait_timeout = site_wait_timeout
        self.max_weight = float(max_weight)
        self.max_site_share = max_site_share

    def _weight(self, result: TaskResult) -> float:
        """``result``'s aggregation weight under this job's bound; ValueError names the site if refused."""
        return result_weight(result.meta, self.aggregation_weight_key, site=result.site, max_weight=self.max_weight)

    def _check_weight(self, result: TaskResult) -> None:
        """on_result of tasks that carry no params: refuse a result whose weight claim is invalid."""
        self._weight(result)

    def _targets(self, ctx: JobContext, rnd: int) -> list[str]:
        sites = ctx.sites
        cannot = f"FedAvg ({self._clients_setting}) cannot run {round_label(rnd, self.num_rounds)}"
        if len(sites) < self.min_clients:
            try:
                sites = ctx.wait_for_sites(self.min_clients, self.site_wait_timeout)
            except RoundFailed as exc:
                raise RoundFailed(f"{cannot}: {exc}") from None
        if len(sites) < self.min_clients:
            raise RoundFailed(
                f"{cannot}: {len(sites)} of its sites can take tasks ({', '.join(sites) or 'none'}) after waiting "
                f"{self.site_wait_timeout:.0f} s (site_wait_timeout) for {self.min_clients}"
            )
        if len(sites) > self.num_clients:
            return sorted(random.sample(sites, self.num_clients))
        return sites

    def run(self, ctx: JobContext) -> None:
        persistor = ctx.components.get(self.persistor_id)
        if persistor is None:
            raise ValueError(f"FedAvg: no component with id {self.persistor_id!r} (the model persistor)")
        state = ctx.load_state() or {}
        start = int(state.get("next_round", self.start_round))
        if state.get("model_file"):
            model_path = ctx.run_dir / "models" / state["model_file"]
            ctx.log.info("resuming at %s from %s", round_label(start, self.num_rounds), model_path.name)
        else:
            model_path = persistor.load_initial(ctx)
        layout = read_layout(model_path)
        averager = WeightedAverage(layout)
        reported_metrics = bool(state.get("sites_report_metrics", False))
        ctx.set_progress(round=start, num_rounds=self.num_rounds)
        checkpoint = _Background()
        # The sums' memory is touched while the sites download and train; the first fold waits.
        checkpoint.start(averager.prefault)
        averager.hold_until(checkpoint.done)
        if state.get("model_file") and start > 0:
            # After a restart the .pt may lag the resumed model by a round: write it again.
            persistor.save_global(ctx, model_path, round=start - 1)
        try:
            self._rounds(ctx, persistor, start, model_path, layout, averager, checkpoint, reported_metrics)
        finally:
            checkpoint.wait()
        ctx.set_progress(round=self.num_rounds, num_rounds=self.num_rounds, phase="done")

    def _rounds(
        self,
        ctx: JobContext,
        persistor: Any,
        start: int,
        model_path: Path,
        layout: Layout,
        averager: WeightedAverage,
        checkpoint: _Background,
        reported_metrics: bool,
    ) -> None:
        model_checksum: str | None = None

        for rnd in range(start, self.num_rounds):
            ctx.set_progress(round=rnd, num_rounds=self.num_rounds, phase="training")
            ctx.fire("round_started", round=rnd, num_rounds=self.num_rounds)
            averager.reset()
            results = self._train_round(ctx, rnd, model_path, model_checksum, layout, averager)
            site_metrics = {r.site: r.metrics for r in results if r.metrics}
            reported_metrics = reported_metrics or bool(site_metrics)
            weights = {r.site: self._weight(r) for r in results}
            metrics = weighted_metrics((r.metrics, weights[r.site]) for r in results)
            if site_metrics:
                ctx.fire(
                    "model_evaluated",
                    model_version=rnd,
                    model_path=model_path,
                    round=rnd,
                    num_rounds=self.num_rounds,
                    site_metrics=site_metrics,
                    site_weights=weights,
                    metrics=metrics,
                )
            new_path = ctx.run_dir / "models" / f"global-r{rnd + 1:04d}.safetensors"
            digest = Checksum()
            try:
                averager.write_result(new_path, {"round": str(rnd), "job_id": ctx.job_id}, digest=digest)
            except NonFiniteAverage as exc:
                raise RoundFailed(
                    f"round {rnd + 1}: {exc}; it was not written, the global model stays {model_path.name}"
                ) from None
            model_checksum = digest.hexdigest()
            # The .pt checkpoint is written while the next round's downloads and training go on;
            # it reads the averager's memory, so the next round's first fold waits for it.
            checkpoint.wait()
            checkpoint.start(persistor.save_global, ctx, new_path, round=rnd, arrays=averager.finalize())
            averager.hold_until(checkpoint.done)
            ctx.fire("round_completed", round=rnd, model_path=new_path, metrics=metrics, sites=sorted(weights))
            ctx.save_state(
                {"next_round": rnd + 1, "model_file": new_path.name, "sites_report_metrics": reported_metrics}
            )
            label = round_label(rnd, self.num_rounds)
            ctx.log.info("%s done: %d results%s", label, len(results), self._scored(rnd, metrics))
            if model_path != new_path:
                _remove_old_model(model_path)
            model_path = new_path

        if self.final_validation and reported_metrics:
            self._validate_final(ctx, model_path, model_checksum, layout)
        elif self.final_validation:
            ctx.log.info("no final validation: the sites sent no metrics with their results")

    def _scored(self, rnd: int, metrics: dict[str, float]) -> str:
        """How a round's metrics read: they score the model the sites received, not the new one."""
        if not metrics:
            return ""
        values = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        return f"; the model they received ({model_label(rnd, self.num_rounds)}) scored {values}"

    def _train_round(
        self,
        ctx: JobContext,
        rnd: int,
        model_path: Path,
        model_checksum: str | None,
        layout: Layout,
        averager: WeightedAverage,
    ) -> list[TaskResult]:
        spool = None if self.max_site_share is None else _Spool(ctx.run_dir / "models" / "spool", self.max_site_share)

        def on_result(result: TaskResult) -> None:
            if result.params_path is None:
                raise ValueError("a train result must carry params")
            weight = self._weight(result)
            params_type = result.params_type or ParamsType.FULL
            if spool is not None:
                spool.keep(result, weight)
            else:
                averager.add_file(result.params_path, weight, params_type=params_type, base_path=model_path)
            ctx.fire("result_received", round=rnd, site=result.site, metrics=result.metrics, meta=result.meta)

        task = TaskSpec(
            name=TRAIN_TASK,
            round=rnd,
            num_rounds=self.num_rounds,
            model_path=model_path,
            model_layout=layout,
            model_checksum=model_checksum,
            meta={FLMetaKey.CURRENT_ROUND: rnd, FLMetaKey.TOTAL_ROUNDS: self.num_rounds},
        )
        with spool or contextlib.nullcontext():
            results = ctx.communicator.broadcast_and_wait(
                task,
                self._targets(ctx, rnd),
                min_responses=self.min_clients,
                timeout=self.round_timeout,
                on_result=on_result,
            )
            if spool is not None:
                spool.fold(averager, [r.site for r in results], base_path=model_path)
        return results

    def _validate_final(self, ctx: JobContext, model_path: Path, model_checksum: str | None, layout: Layout) -> None:
        ctx.set_progress(phase="validating final model")
        task = TaskSpec(
            name=VALIDATE_TASK,
            round=self.num_rounds,
            num_rounds=self.num_rounds,
            model_path=model_path,
            model_layout=layout,
            model_checksum=model_checksum,
            meta={FLMetaKey.CURRENT_ROUND: self.num_rounds, FLMetaKey.TOTAL_ROUNDS: self.num_rounds},
            expect_params=False,
        )
        results = ctx.communicator.broadcast_and_wait(
            task,
            self._targets(ctx, self.num_rounds),
            min_responses=self.min_clients,
            timeout=self.round_timeout,
            on_result=self._check_weight,
        )
        site_metrics = {r.site: r.metrics for r in results if r.metrics}
        if site_metrics:
            weights = {r.site: self._weight(r) for r in results}
            metrics = weighted_metrics((r.metrics, weights[r.site]) for r in results)
            ctx.fire(
                "model_evaluated",
                model_version=self.num_rounds,
                model_path=model_path,
                round=self.num_rounds,
                num_rounds=self.num_rounds,
                site_metrics=site_metrics,
                site_weights=weights,
                metrics=metrics,
            )
            values = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            ctx.log.info("%s: %s", model_label(self.num_rounds, self.num_rounds), values)


class _Spool:
    """A round's updates kept on disk until the round closes, then folded with capped weights."""

    def __init__(self, folder: Path, max_share: float) -> None:
        self.folder = folder
        self.max_share = max_share
        self._kept: dict[str, tuple[Path, float, str]] = {}  # site -> (file, claimed weight, params type)
        self._lock = threading.Lock()

    def __enter__(self) -> _Spool:
        shutil.rmtree(self.folder, ignore_errors=True)  # left by a server that stopped mid-round
        self.folder.mkdir(parents=True)
        return self

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def keep(self, result: TaskResult, weight: float) -> None:
        """Take over ``result``'s params file (valid only during on_result otherwise)."""
        assert result.params_path is not None
        kept = self.folder / f"{result.site}.safetensors"
        shutil.move(result.params_path, kept)
        with self._lock:
            self._kept[result.site] = (kept, weight, result.params_type or ParamsType.FULL)

    def fold(self, averager: WeightedAverage, sites: list[str], *, base_path: Path) -> None:
        """Fold the accepted ``sites``' updates, no site over ``max_share`` of the average."""
        with self._lock:
            kept = [self._kept[site] for site in sites]
        weights = capped_weights([weight for _, weight, _ in kept], self.max_share)
        for (path, _, params_type), weight in zip(kept, weights, strict=True):
            averager.add_file(path, weight, params_type=params_type, base_path=base_path)
            path.unlink()


class _Background:
    """One background task at a time; ``wait`` re-raises what it raised."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.done.set()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        def run() -> None:
            try:
                fn(*args, **kwargs)
            except BaseException as exc:
                self._error = exc
            finally:
                self.done.set()

        self.done.clear()
        self._thread = threading.Thread(target=run, name="fl-checkpoint", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        self.done.wait()
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def _remove_old_model(path: Path) -> None:
    """Drop a superseded global model file (its .pt checkpoints are separate files)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
