"""TensorBoard receiver: writes the metrics each site's SummaryWriter sent, one run folder per site."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any

from fl.components.base import Component, Events

__all__ = ["TBAnalyticsReceiver"]

_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


class TBAnalyticsReceiver(Component):
    """Event files under ``<job>/<tb_folder>/<site>/``; ``add_scalars`` groups get sub-folders.

    The server's own aggregated metrics go to ``<tb_folder>/server/`` as ``global/<metric>`` with
    the model version as their step (0: the initial model; see :mod:`fl.rounds`). Sites' points
    keep the step their script gave them.
    """

    def __init__(self, tb_folder: str = "tb_events", events: list[str] | None = None) -> None:
        if not tb_folder or ".." in Path(tb_folder).parts or Path(tb_folder).is_absolute():
            raise ValueError(f"tb_folder must be a relative folder inside the job, got {tb_folder!r}")
        self.tb_folder = tb_folder
        self.events = list(events or ["fed.analytix_log_stats"])
        self._writers: dict[Path, Any] = {}
        self._lock = threading.Lock()

    def _writer(self, folder: Path) -> Any:
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        writer = self._writers.get(folder)
        if writer is None:
            folder.mkdir(parents=True, exist_ok=True)
            writer = self._writers[folder] = EventFileWriter(str(folder))
        return writer

    def _scalar(self, folder: Path, tag: str, value: float, step: int | None, wall_time: float) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=tag, simple_value=value)])
        self._writer(folder).add_event(Event(wall_time=wall_time, step=step or 0, summary=summary))

    def handle_event(self, event: str, data: dict[str, Any], ctx: Any) -> None:
        root = Path(ctx.run_dir) / self.tb_folder
        with self._lock:
            if event == Events.ANALYTICS:
                site_dir = root / _SAFE.sub("_", data["site"])
                for rec in data["records"]:
                    if rec.get("value") is None or rec.get("kind"):
                        continue  # params and tags (MLflow-style writers) are no scalars
                    folder = site_dir
                    if rec.get("group_member"):
                        folder = site_dir / _SAFE.sub("_", f"{rec['tag']}_{rec['group_member']}")
                    self._scalar(
                        folder, rec["tag"], float(rec["value"]), rec.get("step"), rec.get("wall_time") or time.time()
                    )
                for writer in {self._writers[f] for f in self._writers if site_dir in (f, *f.parents)}:
                    writer.flush()
            elif event == Events.MODEL_EVALUATED:
                folder = root / "server"
                for key, value in data["metrics"].items():
                    self._scalar(folder, f"global/{key}", float(value), data["model_version"], time.time())
                self._writer(folder).flush()
            elif event == Events.JOB_FINISHED:
                for writer in self._writers.values():
                    writer.close()
                self._writers.clear()
