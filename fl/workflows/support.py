"""What every round engine needs besides its loop: weight claims, the spool, the background checkpoint.

:func:`result_weight` checks a site's claimed weight; :class:`Spool` keeps a round's updates on disk
until it closes (``max_site_share``); :class:`Background` runs one checkpoint at a time.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl.client.model import FLMetaKey
from fl.tensors import Layout, open_tensors
from fl.workflows.aggregation import ParamsType, WeightedAverage, capped_weights
from fl.workflows.base import TaskResult

__all__ = [
    "BEST_MODEL_FILE",
    "DEFAULT_MAX_WEIGHT",
    "Background",
    "Spool",
    "Spooled",
    "best_model_path",
    "check_number",
    "keep_best_model",
    "read_layout",
    "remove_old_model",
    "result_weight",
]

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
    """The layout of the safetensors file at ``path`` (its header only)."""
    f, layout, _ = open_tensors(path)
    f.close()
    return layout


@dataclass(frozen=True)
class Spooled:
    """One site's update kept on disk for the round: its file, weight (capped if so configured), params type."""

    site: str
    path: Path
    weight: float
    params_type: str


class Spool:
    """A round's updates kept on disk until the round closes (``max_share``: weights capped then)."""

    def __init__(self, folder: Path, max_share: float | None) -> None:
        self.folder = folder
        self.max_share = max_share
        self._kept: dict[str, tuple[Path, float, str]] = {}  # site -> (file, claimed weight, params type)
        self._lock = threading.Lock()

    def __enter__(self) -> Spool:
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

    def kept(self, sites: list[str]) -> list[Spooled]:
        """The accepted ``sites``' updates, in that order, no site's weight over ``max_share`` of the sum."""
        with self._lock:
            kept = [(site, *self._kept[site]) for site in sites]
        weights = [weight for _, _, weight, _ in kept]
        if self.max_share is not None:
            weights = capped_weights(weights, self.max_share)
        return [Spooled(site, path, w, kind) for (site, path, _, kind), w in zip(kept, weights, strict=True)]

    def fold(self, averager: WeightedAverage, sites: list[str], *, base_path: Path) -> None:
        """Fold the accepted ``sites``' updates into ``averager``, dropping each file once folded."""
        for update in self.kept(sites):
            averager.add_file(update.path, update.weight, params_type=update.params_type, base_path=base_path)
            update.path.unlink()


class Background:
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


def remove_old_model(path: Path) -> None:
    """Drop a superseded global model file (its .pt checkpoints are separate files)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


#: The tensors of the best global model so far (the model selector's choice), in the job's ``models/``:
#: what cross-site evaluation scores as FLARE's ``SRV_best_FL_global_model.pt`` (the .pt is never read back).
BEST_MODEL_FILE = "best-global.safetensors"


def best_model_path(run_dir: Path) -> Path:
    """Where :func:`keep_best_model` keeps the best global model's tensors for the job in ``run_dir``."""
    return Path(run_dir) / "models" / BEST_MODEL_FILE


def keep_best_model(run_dir: Path, model_path: Path) -> Path:
    """Keep the global model file ``model_path`` as the job's best model (a hard link: no copy; else a copy).

    The engine removes superseded global models; the link keeps this one's data for as long as it is the best.
    """
    target = best_model_path(run_dir)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}")
    try:
        try:
            os.link(model_path, tmp)
        except OSError:  # another file system, or one without hard links
            shutil.copyfile(model_path, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def check_number(owner: str, name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> float:
    """``value`` as a float if it is a number in [low, high] ((low, high] with ``low_open``); else ValueError."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok and (low < value if low_open else low <= value) and value <= high:
        return float(value)
    bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
    raise ValueError(f"{owner}: {name} must be a number in {bounds}, got {value!r}")
