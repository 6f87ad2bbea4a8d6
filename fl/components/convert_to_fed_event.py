"""Site-side: forward the script's analytics (SummaryWriter points) to the server."""

from __future__ import annotations

from fl.components.base import Component

__all__ = ["ConvertToFedEvent"]


class ConvertToFedEvent(Component):
    """Sites running a job with this component send the named events to the server.

    fl forwards SummaryWriter points whenever this component is configured for
    ``analytix_log_stats`` (as NVIDIA FLARE's job configs do); without it they stay local.
    """

    def __init__(self, events_to_convert: list[str] | None = None, fed_event_prefix: str = "fed.") -> None:
        self.events_to_convert = list(events_to_convert or ["analytix_log_stats"])
        self.fed_event_prefix = fed_event_prefix

    @property
    def forwards_analytics(self) -> bool:
        return "analytix_log_stats" in self.events_to_convert
