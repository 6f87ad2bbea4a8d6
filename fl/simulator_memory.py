"""The simulator's memory estimate: a run that cannot fit is refused before it starts, not OOM-killed.

A run costs a fixed base (the server and the sites hosts), a little per idle site (its
registration, its agent's state), a training script per site that trains at once, and the model's
bytes in flight. The constants below are that estimate's, measured on a 2-core machine
(``python -m bench.sim_idle 200 1000``, PSS of the whole tree, and issue 13's hello-pt runs); each is
rounded up so that the estimate errs on the side of the run's own survival. Where the machine runs in a cgroup
with a memory limit, what is left under that limit counts, not the machine's free memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import psutil

__all__ = [
    "BASE_BYTES",
    "IDLE_SITE_BYTES",
    "MODEL_COPIES_ON_SERVER",
    "MODEL_COPIES_PER_TRAINING_SITE",
    "TRAINING_SITE_BYTES",
    "GiB",
    "MemoryEstimate",
    "MiB",
    "available_memory",
    "estimate",
    "model_bytes_of",
    "refusal",
]

GiB = 1024**3
MiB = 1024**2
#: The driver, the server and two sites hosts with their imports, no site yet (measured ~0.12 GiB PSS).
BASE_BYTES = 256 * MiB
#: One registered idle site: its agent's state in a sites host, its session and long poll in the
#: server (measured: 1000 idle sites add ~70 MiB of PSS to the tree, 0.07 MiB each).
IDLE_SITE_BYTES = MiB // 2
#: One site's training script while it trains, by default: a hello-pt-like CNN script's private
#: memory with its torch import (issue 13: 32 sites' scripts took 8 GiB). Override per run
#: (``simulate(site_memory=...)``, ``fl simulate --site-memory-gib``) for a heavier script.
TRAINING_SITE_BYTES = GiB // 4
#: Copies of the model a training site holds in flight: the task's model its agent downloads, the
#: script's tensors, and the result on its way back.
MODEL_COPIES_PER_TRAINING_SITE = 3
#: Copies of the model on the server: the global model and the running average.
MODEL_COPIES_ON_SERVER = 2
_WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors", ".npy", ".npz", ".bin")


@dataclass(frozen=True)
class MemoryEstimate:
    """What a run is expected to need, by part (bytes)."""

    sites: int
    training_at_once: int
    base: int
    idle_sites: int
    training: int
    models: int

    @property
    def total(self) -> int:
        return self.base + self.idle_sites + self.training + self.models

    def describe(self) -> str:
        return (
            f"{_gib(self.total)} (base {_gib(self.base)} + {self.sites} idle sites x {IDLE_SITE_BYTES / MiB:g} MiB"
            f" + {self.training_at_once} training at once x {_gib(self.training // max(1, self.training_at_once))}"
            f" + models in flight {_gib(self.models)})"
        )


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def estimate(
    sites: int, training_at_once: int, model_bytes: int, training_site_bytes: int = TRAINING_SITE_BYTES
) -> MemoryEstimate:
    """The estimate for ``sites`` sites of which ``training_at_once`` train at once, for a model of ``model_bytes``."""
    return MemoryEstimate(
        sites=sites,
        training_at_once=training_at_once,
        base=BASE_BYTES,
        idle_sites=sites * IDLE_SITE_BYTES,
        training=training_at_once * training_site_bytes,
        models=model_bytes * (MODEL_COPIES_ON_SERVER + MODEL_COPIES_PER_TRAINING_SITE * training_at_once),
    )


def model_bytes_of(job_dir: Path) -> int:
    """The largest weights file the job folder ships (its initial model), or 0 when its model is built by code."""
    sizes = [p.stat().st_size for p in job_dir.rglob("*") if p.suffix in _WEIGHT_SUFFIXES and p.is_file()]
    return max(sizes, default=0)


def _cgroup_room(root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")) -> int | None:
    """Bytes left under this process's cgroup memory limit (v2 or v1), or None when no limit applies."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2
            folder, limit_file, usage_file = root / path.lstrip("/"), "memory.max", "memory.current"
        elif "memory" in controllers.split(","):
            folder, limit_file, usage_file = (
                root / "memory" / path.lstrip("/"),
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
            )
        else:
            continue
        try:
            limit_text = (folder / limit_file).read_text().strip()
            usage = int((folder / usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit_text == "max" or int(limit_text) >= 1 << 60:  # v1 writes "no limit" as a huge number
            continue
        return max(0, int(limit_text) - usage)
    return None


def available_memory() -> tuple[int, str]:
    """Bytes a run may use now and where that figure comes from (the machine's available memory, or
    its cgroup's room when that is less)."""
    machine = int(psutil.virtual_memory().available)
    room = _cgroup_room()
    if room is not None and room < machine:
        return room, "left under this cgroup's memory limit"
    return machine, "available on this machine"


def refusal(need: MemoryEstimate, available: int, where: str, *, threads: int | None) -> str | None:
    """Why a run of estimate ``need`` cannot start with ``available`` bytes, saying what to change; None if it fits."""
    if need.total <= available:
        return None
    advice = [
        f"fewer sites training at once (-t/--threads; now {threads or 'all'}: {need.training_at_once} at once)",
        "sampling fewer sites a round (FedAvg num_clients)",
        "fewer sites (-n)",
    ]
    return (
        f"this simulation of {need.sites} sites needs an estimated {need.describe()}, "
        f"but {_gib(available)} is {where}; try {', '.join(advice)}, or, if one site's script needs less than "
        f"{_gib(need.training // max(1, need.training_at_once))} while it trains, say so with --site-memory-gib"
    )
