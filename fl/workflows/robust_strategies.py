"""Byzantine-robust strategies on the round engine: FedMedian, FedTrimmedAvg, Krum and MultiKrum (Flower's).

They cannot stream (``streams = False``): a median or a distance ranking needs every update of the
round, so the engine keeps each site's update on the server's disk (one model file per site, in
``models/spool/``) until the round closes, then :mod:`fl.workflows.robust` reads them together block
by block (memory: N x one block for the median and trimmed mean, plus the N x N distance matrix
for Krum; never N models). The robust aggregate then takes the place of the average for the rest
of the round (new global model, checkpoint, events). All of a round's results must be FULL models
or all DIFFs of the model they trained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fl.tensors import Layout
from fl.workflows.aggregation import WeightedAverage
from fl.workflows.base import RoundFailed
from fl.workflows.engine import RoundEngine
from fl.workflows.robust import coordinate_median, multikrum, trimmed_mean
from fl.workflows.support import Spooled, check_number

__all__ = ["FedMedian", "FedTrimmedAvg", "Krum", "MultiKrum"]


class _Robust(RoundEngine):
    """A strategy whose aggregate is computed from all of the round's update files at once."""

    streams = False

    def reduce(self, updates: list[Spooled], layout: Layout, out_path: Path) -> None:
        """Write the robust aggregate of ``updates`` to ``out_path`` (FULL or DIFF, as the updates)."""
        raise NotImplementedError

    def combine(self, updates: list[Spooled], base_path: Path, layout: Layout, averager: WeightedAverage) -> None:
        kinds = sorted({u.params_type for u in updates})
        if len(kinds) > 1:
            by_kind = "; ".join(f"{k}: {', '.join(u.site for u in updates if u.params_type == k)}" for k in kinds)
            raise RoundFailed(f"{type(self).__name__}: a round's results must all be FULL or all DIFF, got {by_kind}")
        out_path = updates[0].path.with_name("aggregate.safetensors")
        self.reduce(updates, layout, out_path)
        averager.add_file(out_path, 1.0, params_type=kinds[0], base_path=base_path)
        out_path.unlink()


class FedMedian(_Robust):
    """The coordinate-wise median of the round's updates (Flower's FedMedian; unweighted)."""

    def reduce(self, updates: list[Spooled], layout: Layout, out_path: Path) -> None:
        coordinate_median([u.path for u in updates], layout, out_path)


class FedTrimmedAvg(_Robust):
    """The coordinate-wise mean without the ``int(beta * N)`` lowest and highest values (Flower's; unweighted)."""

    def __init__(self, *, beta: float = 0.2, **engine_args: Any) -> None:
        super().__init__(**engine_args)
        self.beta = check_number("FedTrimmedAvg", "beta", beta, 0, 0.5)
        if self.beta == 0.5:
            raise ValueError("FedTrimmedAvg: beta must be below 0.5 (at 0.5 nothing is left to average), got 0.5")

    def reduce(self, updates: list[Spooled], layout: Layout, out_path: Path) -> None:
        trimmed_mean([u.path for u in updates], layout, out_path, beta=self.beta)


class _Krum(_Robust):
    """Krum's selection: the updates of lowest score, a score summing the squared distances to the
    ``N - num_malicious_nodes - 2`` nearest others; the aggregate is their weighted average."""

    num_malicious_nodes = 0
    num_nodes_to_select = 1

    def _set_selection(self, num_malicious_nodes: int, num_nodes_to_select: int) -> None:
        """Check and keep the selection's sizes against ``min_clients`` (a round's fewest results)."""
        for name, value, low in (
            ("num_malicious_nodes", num_malicious_nodes, 0),
            ("num_nodes_to_select", num_nodes_to_select, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value < self.min_clients + low:
                raise ValueError(
                    f"{type(self).__name__}: {name} must be an integer in [{low}, {self.min_clients + low - 1}] "
                    f"(min_clients {self.min_clients}), got {value!r}"
                )
        self.num_malicious_nodes = num_malicious_nodes
        self.num_nodes_to_select = num_nodes_to_select

    def reduce(self, updates: list[Spooled], layout: Layout, out_path: Path) -> None:
        multikrum(
            [u.path for u in updates],
            [u.weight for u in updates],
            layout,
            out_path,
            num_malicious_nodes=self.num_malicious_nodes,
            num_nodes_to_select=self.num_nodes_to_select,
        )


class MultiKrum(_Krum):
    """The weighted average of the ``num_nodes_to_select`` updates of lowest Krum score (Flower's MultiKrum)."""

    def __init__(self, *, num_malicious_nodes: int = 0, num_nodes_to_select: int = 1, **engine_args: Any) -> None:
        super().__init__(**engine_args)
        self._set_selection(num_malicious_nodes, num_nodes_to_select)


class Krum(_Krum):
    """The one update of lowest Krum score becomes the aggregate (Flower's Krum)."""

    def __init__(self, *, num_malicious_nodes: int = 0, **engine_args: Any) -> None:
        super().__init__(**engine_args)
        self._set_selection(num_malicious_nodes, 1)
