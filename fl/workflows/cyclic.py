"""Cyclic weight transfer: the model passes from site to site, each training on what the last one sent.

Each round visits the round's sites one after another (a leg of one site each, see
:meth:`~fl.workflows.engine.RoundEngine.legs`), in a fixed order (sorted by name) or a new random
order every round; the last site's model is the round's global model. Deadlines, weight checks,
checkpoints, resume (from the start of the last unfinished round), events and the final validation
are the engine's. Metrics of the first site of a round score the round's starting model.
"""

from __future__ import annotations

import random
from typing import Any

from fl.workflows.engine import RoundEngine

__all__ = ["Cyclic"]

ORDERS = ("fixed", "random")


class Cyclic(RoundEngine):
    """FLARE's ``Cyclic``: ``num_rounds`` rounds, each passing the model through ``num_clients`` sites in ``order``.

    ``order``: ``"fixed"`` (sites sorted by name) or ``"random"`` (shuffled every round).
    ``memory_gc_rounds`` is accepted for FLARE's configs and unused (the server hands memory back
    after every large upload). Other arguments: :class:`~fl.workflows.fedavg.FedAvg`'s, except
    ``max_site_share`` (one result per step: there is nothing to cap).
    """

    def __init__(self, *, order: str = "fixed", memory_gc_rounds: int = 0, **engine_args: Any) -> None:
        if engine_args.get("max_site_share") is not None:
            raise ValueError("Cyclic: max_site_share does not apply (each step takes one site's model whole)")
        if order not in ORDERS:
            raise ValueError(f"Cyclic: order must be one of {', '.join(ORDERS)}, got {order!r}")
        if isinstance(memory_gc_rounds, bool) or not isinstance(memory_gc_rounds, int) or memory_gc_rounds < 0:
            raise ValueError(f"Cyclic: memory_gc_rounds must be a non-negative integer, got {memory_gc_rounds!r}")
        super().__init__(**engine_args)
        self.order = order
        self.memory_gc_rounds = memory_gc_rounds

    def legs(self, rnd: int, targets: list[str]) -> list[list[str]]:
        """One leg per site, in this job's order."""
        sites = sorted(targets)
        if self.order == "random":
            random.shuffle(sites)
        return [[site] for site in sites]
