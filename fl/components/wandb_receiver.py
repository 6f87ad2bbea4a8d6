"""Weights & Biases receiver: each site's metrics become a W&B run, offline by default (files on disk).

NVIDIA FLARE's arguments (``wandb_args`` with project, group, job_type, name; ``mode``). Offline
runs are written under ``<job>/wandb/`` on the server (``wandb sync`` uploads them later); needs the
``wandb`` package on the server (``pip install 'fl[tracking]'``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from fl.components.tracking import TrackingReceiver

__all__ = ["WandBReceiver"]

MODES = ("offline", "online", "disabled")


class WandBReceiver(TrackingReceiver):
    """One W&B run per site (``<site>-<name>``) in ``wandb_args["project"]``/``group``; params become its config.

    Parameters
    ----------
    wandb_args:
        Arguments of ``wandb.init``: ``project``, ``group``, ``job_type`` (required, as in FLARE), ``name``,
        ``config``, ``tags``, ``notes``...
    mode:
        ``"offline"`` (default: files under ``<job>/wandb``), ``"online"`` or ``"disabled"``.
    """

    def __init__(
        self,
        wandb_args: dict[str, Any],
        mode: str = "offline",
        events: list[str] | None = None,
        process_timeout: float = 10.0,
    ) -> None:
        super().__init__(events)
        if not isinstance(wandb_args, dict):
            raise ValueError(f"WandBReceiver: wandb_args must be a dict, got {wandb_args!r}")
        missing = [key for key in ("project", "group", "job_type") if key not in wandb_args]
        if missing:
            raise ValueError(f"WandBReceiver: wandb_args needs {', '.join(missing)}")
        if mode not in MODES:
            raise ValueError(f"WandBReceiver: mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.wandb_args = dict(wandb_args)
        self.mode = mode
        self.process_timeout = process_timeout
        self._runs: dict[str, Any] = {}
        self._dir: Path | None = None

    def start(self, ctx: Any) -> None:
        import wandb  # noqa: F401  (fails here, once, when the package is missing)

        self._dir = Path(ctx.run_dir) / "wandb"
        self._dir.mkdir(parents=True, exist_ok=True)

    def _site_run(self, ctx: Any, site: str) -> Any:
        run = self._runs.get(site)
        if run is None:
            import wandb

            args = dict(self.wandb_args)
            args["name"] = f"{site}-{args.get('name') or ctx.job_id}"
            config = dict(args.pop("config", None) or {})
            config.update({"site": site, "job_id": str(ctx.job_id)})
            settings = wandb.Settings(console="off", x_disable_stats=True, init_timeout=self.process_timeout)
            run = wandb.init(
                **args,
                config=config,
                mode=cast(Any, self.mode),
                dir=str(self._dir),
                reinit="create_new",
                settings=settings,
            )
            self._runs[site] = run
        return run

    def deliver(self, ctx: Any, site: str, records: list[dict[str, Any]]) -> None:
        run = self._site_run(ctx, site)
        by_step: dict[int, dict[str, float]] = {}
        for rec in records:
            key = str(rec.get("tag", ""))
            if rec.get("kind") in ("param", "tag"):
                run.config.update({key: str(rec.get("text", ""))}, allow_val_change=True)
            elif not rec.get("kind") and rec.get("value") is not None:
                if rec.get("group_member"):
                    key = f"{key}/{rec['group_member']}"
                by_step.setdefault(int(rec.get("step") or 0), {})[key] = float(rec["value"])
        for step in sorted(by_step):
            # The site's own step goes in the row ("step"): W&B's step must only grow, sites' need not.
            run.log({**by_step[step], "step": step})

    def finish(self, ctx: Any, status: str) -> None:
        for run in self._runs.values():
            run.finish(exit_code=0 if status == "finished" else 1)
