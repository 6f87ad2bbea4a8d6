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

from fl.workflows.engine import RoundEngine
from fl.workflows.support import DEFAULT_MAX_WEIGHT, result_weight

__all__ = ["DEFAULT_MAX_WEIGHT", "FedAvg", "result_weight"]


class FedAvg(RoundEngine):
    """FedAvg over ``num_rounds`` rounds with ``num_clients`` sites a round (at least ``min_clients``).

    Parameters
    ----------
    num_clients:
        Sites asked to train each round: when more are connected, each round samples this many of
        them at random (logged, and in the job status's ``round_sites``).
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
    seed:
        Makes each round's sample of sites reproducible: the same seed, round and sites draw the
        same sample (also after a resume). None (default): a fresh draw every round of every run.

    Round mechanics (deadlines, streaming fold, checkpoints, resume, events, final validation) are
    :class:`~fl.workflows.engine.RoundEngine`'s; FedAvg's new global model is the round's average.
    """
