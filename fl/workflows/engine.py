"""One round engine for every server-side algorithm; an algorithm overrides only what differs.

:class:`RoundEngine` owns the round mechanics: which sites train (deadlines, minimum counts), the
streaming fold of each checked result as it arrives (or the spool when ``max_site_share`` caps
shares), writing the new global model, the background ``.pt`` checkpoint, resume from the last
completed round after a restart, events for the selector / validation JSON / TensorBoard,
progress, and the final validation. An algorithm (a subclass, Flower's strategy layering) supplies:

* :meth:`RoundEngine.train_meta` - extra config sent with the round's train task;
* :meth:`RoundEngine.check_result` - a strategy's own refusal of a train result, before it is folded;
* :meth:`RoundEngine.results_in` - what a strategy notes of a round's accepted results (SCAFFOLD:
  how many of the job's sites sent one);
* :meth:`RoundEngine.update_global` - the new global arrays from the round's average (FedAvg: the
  average itself; FedOpt: the server optimizer's step over ``average - global``);
* :meth:`RoundEngine.strategy_state` / :meth:`RoundEngine.load_strategy_state` - its own tensors to
  resume with (saved as safetensors next to the model, never JSON or pickle; :mod:`fl.workflows.resume`).

``streams`` says whether results are folded as they arrive (server memory: one model for the
average, whatever the number of sites); a strategy that cannot stream (median, Krum) sets it False
and documents that it holds one update per site.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from fl.checksum import Checksum
from fl.client.model import FLMetaKey
from fl.rounds import model_label, round_label
from fl.tensors import Layout
from fl.workflows.aggregation import NonFiniteAverage, ParamsType, WeightedAverage, weighted_metrics, write_arrays
from fl.workflows.base import Controller, JobContext, RoundFailed, TaskResult, TaskSpec
from fl.workflows.resume import RoundState, write_strategy_state
from fl.workflows.support import (
    DEFAULT_MAX_WEIGHT,
    TRAIN_TASK,
    VALIDATE_TASK,
    Background,
    Spool,
    Spooled,
    read_layout,
    remove_old_model,
    result_weight,
)

__all__ = ["RoundEngine"]

Arrays = dict[str, np.ndarray]


class RoundEngine(Controller):
    """``num_rounds`` rounds with ``num_clients`` sites a round (at least ``min_clients``); see FedAvg for the args."""

    #: Whether results are folded into the average as they arrive (memory: one model, any number of sites).
    streams: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A subclass whose ``__init__`` forwards ``**kwargs`` shows its parent's arguments as its own.

        So the Job API exports, and config checks accept, exactly the arguments it takes (no "kwargs").
        """
        super().__init_subclass__(**kwargs)
        own = [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
        if not any(p.kind is p.VAR_KEYWORD for p in own):
            return
        named = [p for p in own if p.kind is not p.VAR_KEYWORD]
        names = {p.name for p in named}
        inherited = [p for p in inspect.signature(cls.__mro__[1]).parameters.values() if p.name not in names]
        setattr(cls, "__signature__", inspect.Signature(named + inherited))  # noqa: B010 - read by inspect

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
        seed: int | None = None,
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
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an integer (or None for a fresh draw each run), got {seed!r}")
        #: Seeds each round's sample of sites (``num_clients`` of those connected); None: a fresh draw.
        self.seed = seed

    # ------------------------------------------------------------------ strategy hooks
    def train_meta(self, rnd: int) -> dict[str, Any]:
        """Extra config for round ``rnd``'s train task (merged into its meta); none by default."""
        return {}

    def check_result(self, result: TaskResult) -> None:
        """Refuse a train result before it is folded (raise ValueError naming the site); accepts all by default.

        Called after the server's filters and before the weight check; a refusal fails that site's task only.
        """

    def results_in(self, rnd: int, results: Sequence[TaskResult], sites: Sequence[str]) -> None:
        """Round ``rnd``'s accepted (and folded) ``results`` of one leg, before :meth:`update_global`.

        ``sites``: the job's sites that can take tasks now. Nothing to note by default.
        """

    def update_global(self, rnd: int, average: Arrays, model_path: Path, layout: Layout) -> Arrays:
        """Round ``rnd``'s new global arrays from its ``average``; ``model_path`` holds the current global."""
        return average

    def combine(self, updates: list[Spooled], base_path: Path, layout: Layout, averager: WeightedAverage) -> None:
        """A non-streaming strategy's aggregate of the round's ``updates`` (files), folded into ``averager``.

        Called when the round closes, only if :attr:`streams` is False; ``base_path`` is the model they trained.
        """
        raise NotImplementedError(f"{type(self).__name__} streams its results; combine() is not used")

    def task_model(self, rnd: int, model: tuple[Path, str | None], layout: Layout) -> tuple[Path, Layout, str | None]:
        """The file (path, layout, checksum) round ``rnd``'s train task carries for ``model``: the model itself.

        SCAFFOLD sends the model plus its control tensors; a file other than the model is removed
        when the round's results are in.
        """
        return model[0], layout, model[1]

    def result_layout(self, layout: Layout) -> Layout:
        """The layout a train result must have (the model's ``layout``; SCAFFOLD adds its control changes)."""
        return layout

    def strategy_state(self) -> Arrays:
        """The algorithm's own tensors to resume with (e.g. server optimizer moments); none by default."""
        return {}

    def load_strategy_state(self, arrays: Arrays) -> None:
        """Take back what :meth:`strategy_state` returned before a restart."""

    # ------------------------------------------------------------------ the round loop
    def _weight(self, result: TaskResult) -> float:
        """``result``'s aggregation weight under this job's bound; ValueError names the site if refused."""
        return result_weight(result.meta, self.aggregation_weight_key, site=result.site, max_weight=self.max_weight)

    def _check_weight(self, result: TaskResult) -> None:
        """on_result of tasks that carry no params: refuse a result whose weight claim is invalid."""
        self._weight(result)

    def _targets(self, ctx: JobContext, rnd: int) -> list[str]:
        sites = ctx.sites
        cannot = f"{type(self).__name__} ({self._clients_setting}) cannot run {round_label(rnd, self.num_rounds)}"
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
        if len(sites) <= self.num_clients:
            return sites
        sample = self.sample_sites(sites, rnd)
        label = round_label(rnd, self.num_rounds) if rnd < self.num_rounds else "final validation"
        ctx.log.info("%s: sampled %d of %d sites: %s", label, len(sample), len(sites), ", ".join(sample))
        ctx.set_progress(round_sites=sample)
        return sample

    def sample_sites(self, sites: list[str], rnd: int) -> list[str]:
        """``num_clients`` of ``sites`` for round ``rnd``, drawn anew each round (Flower's and FLARE's sampling).

        With a ``seed`` the draw depends only on the seed, the round and the set of sites, so a rerun
        or a job resumed after a restart samples the same sites for the same round.
        """
        rng = random.Random(f"{self.seed}:{rnd}") if self.seed is not None else random.SystemRandom()
        return sorted(rng.sample(sorted(sites), self.num_clients))

    def run(self, ctx: JobContext) -> None:
        persistor = ctx.components.get(self.persistor_id)
        if persistor is None:
            raise ValueError(f"{type(self).__name__}: no component with id {self.persistor_id!r} (the model persistor)")
        state = RoundState.load(ctx, self.start_round)
        start = state.next_round
        if state.model_path is not None:
            model_path = state.model_path
            ctx.log.info("resuming at %s from %s", round_label(start, self.num_rounds), model_path.name)
        else:
            model_path = persistor.load_initial(ctx)
        self.load_strategy_state(state.strategy_arrays())
        layout = read_layout(model_path)
        averager = WeightedAverage(self.result_layout(layout))
        ctx.set_progress(round=start, num_rounds=self.num_rounds)
        checkpoint = Background()
        # The sums' memory is touched while the sites download and train; the first fold waits.
        checkpoint.start(averager.prefault)
        averager.hold_until(checkpoint.done)
        if state.resumed and start > 0:
            # After a restart the .pt may lag the resumed model by a round: write it again.
            persistor.save_global(ctx, model_path, round=start - 1)
        try:
            files = (model_path, state.strategy_file)
            self._rounds(ctx, persistor, start, files, layout, averager, checkpoint, state.sites_report_metrics)
        finally:
            checkpoint.wait()
        ctx.set_progress(round=self.num_rounds, num_rounds=self.num_rounds, phase="done")

    def _rounds(
        self,
        ctx: JobContext,
        persistor: Any,
        start: int,
        files: tuple[Path, Path | None],
        layout: Layout,
        averager: WeightedAverage,
        checkpoint: Background,
        reported_metrics: bool,
    ) -> None:
        """Rounds ``start``.. from ``files``: the global model and the strategy's saved state (if any)."""
        model_checksum: str | None = None
        model_path, strategy_file = files

        for rnd in range(start, self.num_rounds):
            ctx.set_progress(round=rnd, num_rounds=self.num_rounds, phase="training")
            ctx.fire("round_started", round=rnd, num_rounds=self.num_rounds)
            legs = self.legs(rnd, self._targets(ctx, rnd))
            results: list[TaskResult] = []
            leg_path, new_path = model_path, ctx.run_dir / "models" / f"global-r{rnd + 1:04d}.safetensors"
            for leg, targets in enumerate(legs):
                averager.reset()
                leg_results = self._train_round(ctx, rnd, (leg_path, model_checksum), layout, averager, targets)
                if leg == 0:  # the sites of the first leg received (and scored) the round's starting model
                    reported_metrics = self._report_scores(ctx, rnd, model_path, leg_results) or reported_metrics
                results += leg_results
                out_path = (
                    new_path
                    if leg == len(legs) - 1
                    else new_path.with_name(f"{new_path.stem}-leg{leg + 1}.safetensors")
                )
                arrays, model_checksum = self._write_global(ctx, rnd, averager, leg_path, out_path, layout, checkpoint)
                if leg_path != model_path:
                    remove_old_model(leg_path)
                leg_path = out_path
            weights = {r.site: self._weight(r) for r in results}
            metrics = weighted_metrics((r.metrics, weights[r.site]) for r in results)
            # The .pt checkpoint is written while the next round's downloads and training go on;
            # it reads the averager's memory, so the next round's first fold waits for it.
            checkpoint.start(persistor.save_global, ctx, new_path, round=rnd, arrays=arrays)
            averager.hold_until(checkpoint.done)
            ctx.fire("round_completed", round=rnd, model_path=new_path, metrics=metrics, sites=sorted(weights))
            new_strategy_file = write_strategy_state(ctx, rnd, self.strategy_state())
            RoundState(rnd + 1, new_path, new_strategy_file, reported_metrics).save(ctx)
            label = round_label(rnd, self.num_rounds)
            ctx.log.info("%s done: %d results%s", label, len(results), self._scored(rnd, metrics))
            if model_path != new_path:
                remove_old_model(model_path)
            if strategy_file is not None and strategy_file != new_strategy_file:
                remove_old_model(strategy_file)
            model_path, strategy_file = new_path, new_strategy_file

        if self.final_validation and reported_metrics:
            self._validate_final(ctx, model_path, model_checksum, layout)
        elif self.final_validation:
            ctx.log.info("no final validation: the sites sent no metrics with their results")

    def legs(self, rnd: int, targets: list[str]) -> list[list[str]]:
        """Round ``rnd``'s legs: site groups trained one after another, each on the model the last one made.

        One leg of all ``targets`` by default (the sites train in parallel on the same model).
        """
        return [targets]

    def _report_scores(self, ctx: JobContext, rnd: int, model_path: Path, results: list[TaskResult]) -> bool:
        """Fire ``model_evaluated`` with the metrics sites sent about ``model_path``; True if any did."""
        site_metrics = {r.site: r.metrics for r in results if r.metrics}
        if site_metrics:
            weights = {r.site: self._weight(r) for r in results}
            ctx.fire(
                "model_evaluated",
                model_version=rnd,
                model_path=model_path,
                round=rnd,
                num_rounds=self.num_rounds,
                site_metrics=site_metrics,
                site_weights=weights,
                metrics=weighted_metrics((r.metrics, weights[r.site]) for r in results),
            )
        return bool(site_metrics)

    def _write_global(
        self,
        ctx: JobContext,
        rnd: int,
        averager: WeightedAverage,
        model_path: Path,
        new_path: Path,
        layout: Layout,
        checkpoint: Background,
    ) -> tuple[Arrays, str]:
        """Write the strategy's new global model (from the average) to ``new_path``; its arrays and checksum."""
        digest = Checksum()
        # The last .pt checkpoint read the averager's memory; the folds waited for it, so must we.
        checkpoint.wait()
        try:
            arrays = self.update_global(rnd, averager.finalize(), model_path, layout)
            write_arrays(new_path, layout, arrays, {"round": str(rnd), "job_id": ctx.job_id}, digest=digest)
        except NonFiniteAverage as exc:
            raise RoundFailed(
                f"round {rnd + 1}: {exc}; it was not written, the global model stays {model_path.name}"
            ) from None
        return arrays, digest.hexdigest()

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
        model: tuple[Path, str | None],
        layout: Layout,
        averager: WeightedAverage,
        targets: list[str],
    ) -> list[TaskResult]:
        """Send round ``rnd``'s train task with ``model`` (path, checksum) to ``targets``; fold what comes back."""
        model_path = model[0]
        spooled = self.max_site_share is not None or not self.streams
        spool = Spool(ctx.run_dir / "models" / "spool", self.max_site_share) if spooled else None

        def on_result(result: TaskResult) -> None:
            if result.params_path is None:
                raise ValueError("a train result must carry params")
            self.check_result(result)
            weight = self._weight(result)
            params_type = result.params_type or ParamsType.FULL
            if spool is not None:
                spool.keep(result, weight)
            else:
                averager.add_file(result.params_path, weight, params_type=params_type, base_path=model_path)
            ctx.fire("result_received", round=rnd, site=result.site, metrics=result.metrics, meta=result.meta)

        task_path, task_layout, task_checksum = self.task_model(rnd, model, layout)
        task = TaskSpec(
            name=TRAIN_TASK,
            round=rnd,
            num_rounds=self.num_rounds,
            model_path=task_path,
            model_layout=task_layout,
            model_checksum=task_checksum,
            meta={**self.train_meta(rnd), FLMetaKey.CURRENT_ROUND: rnd, FLMetaKey.TOTAL_ROUNDS: self.num_rounds},
            result_layout=averager.layout,
        )
        with spool or contextlib.nullcontext(), self._removed_after(task_path, model_path):
            results = ctx.communicator.broadcast_and_wait(
                task,
                targets,
                min_responses=min(self.min_clients, len(targets)),
                timeout=self.round_timeout,
                on_result=on_result,
            )
            if spool is not None and self.streams:
                spool.fold(averager, [r.site for r in results], base_path=model_path)
            elif spool is not None:
                self.combine(spool.kept([r.site for r in results]), model_path, layout, averager)
        self.results_in(rnd, results, ctx.sites)
        return results

    @staticmethod
    @contextlib.contextmanager
    def _removed_after(task_path: Path, model_path: Path) -> Iterator[None]:
        """Remove a task's own model file (``task_path``, if not the global model) once its round is done."""
        try:
            yield
        finally:
            if task_path != model_path:
                remove_old_model(task_path)

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
