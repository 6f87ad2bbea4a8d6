"""A small per-site, per-job state store for training scripts (Flower's ``Context.state``).

A script that runs per task (``launch_once=False``) starts fresh each round; what must survive
between its runs (an optimizer's momentum, a counter, the last local model) goes here::

    state = flare.get_state()
    state["rounds_seen"] = state.get("rounds_seen", 0) + 1
    state["momentum"] = optimizer.state_dict()      # nested dicts/lists of tensors and scalars
    ...
    flare.send(result)                             # saves the state before the result goes

The store is one safetensors file in the site's workspace (``FL_STATE_DIR``, set by the site agent
per site and job): tensors (torch or NumPy) as its tensors, everything else as JSON in its metadata,
written atomically. Never pickle: only JSON values (str, int, float, bool, None, lists, dicts with
str keys) and tensors can be stored; anything else is refused when it is set.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

__all__ = ["MAX_STATE_BYTES", "STATE_FILE", "SiteState", "StateError"]

STATE_FILE = "state.safetensors"
MAX_STATE_BYTES = 1 << 30
_JSON_KEY = "fl.state"  # the metadata entry holding the JSON skeleton
_TENSOR = "__fl_tensor__"  # a skeleton leaf naming a tensor: {"__fl_tensor__": name, "kind": "torch"|"numpy"}
_ITEMS = "__fl_items__"  # a dict with int keys (an optimizer's state_dict): {"__fl_items__": [[key, value], ...]}


class StateError(ValueError):
    """A value the state store cannot hold, or a state file it cannot read."""


class SiteState(MutableMapping[str, Any]):
    """A dict persisted in ``folder/state.safetensors``; loaded at first use, saved by :meth:`save`."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.path = Path(folder) / STATE_FILE
        self._data: dict[str, Any] | None = None

    # ------------------------------------------------------------------ the mapping
    def _values(self) -> dict[str, Any]:
        if self._data is None:
            self._data = _load(self.path) if self.path.is_file() else {}
        return self._data

    def __getitem__(self, key: str) -> Any:
        return self._values()[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if not isinstance(key, str):
            raise StateError(f"state keys are strings, got {type(key).__name__} {key!r}")
        _encode(value, key, {})  # refuse what could not be saved now, not at the next save
        self._values()[key] = value

    def __delitem__(self, key: str) -> None:
        del self._values()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values())

    def __len__(self) -> int:
        return len(self._values())

    @property
    def loaded(self) -> bool:
        """Whether the script has used the store in this run (only then does :meth:`save` write)."""
        return self._data is not None

    # ------------------------------------------------------------------ the file
    def save(self) -> None:
        """Write the state atomically (nothing is written if it was never used in this run)."""
        if self._data is None:
            return
        from fl.tensors import write_tensors

        tensors: dict[str, Any] = {}
        skeleton = {key: _encode(value, key, tensors) for key, value in self._data.items()}
        size = sum(_nbytes(t) for t in tensors.values())
        if size > MAX_STATE_BYTES:
            raise StateError(f"the state holds {size} bytes of tensors, more than the limit of {MAX_STATE_BYTES}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_tensors(self.path, tensors, {_JSON_KEY: json.dumps(skeleton, allow_nan=False)})


def _is_tensor(value: Any) -> str | None:
    """The kind of a tensor value, "torch" or "numpy"; None for anything else."""
    module = type(value).__module__
    if module.startswith("torch") and hasattr(value, "detach"):
        return "torch"
    if module == "numpy" and hasattr(value, "dtype") and hasattr(value, "shape"):
        return "numpy"
    return None


def _encode(value: Any, where: str, tensors: dict[str, Any]) -> Any:
    """``value`` as JSON, its tensors moved into ``tensors`` under their path ``where``."""
    kind = _is_tensor(value)
    if kind == "torch":
        tensors[where] = value.detach().cpu().contiguous()
        return {_TENSOR: where, "kind": kind}
    if kind == "numpy":
        tensors[where] = value
        return {_TENSOR: where, "kind": kind}
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise StateError(f"state {where!r}: {value} is not finite (JSON cannot hold it)")
        return value
    if isinstance(value, list | tuple):
        return [_encode(v, f"{where}/{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, str | int) or isinstance(k, bool):
                raise StateError(f"state {where!r}: dict keys must be strings or ints, got {type(k).__name__}")
        items = [[k, _encode(v, f"{where}/{k}", tensors)] for k, v in value.items()]
        if all(isinstance(k, str) for k in value):
            return dict(items)
        return {_ITEMS: items}  # int keys stay ints (an optimizer's state_dict keys parameters by index)
    raise StateError(
        f"state {where!r}: a {type(value).__name__} cannot be stored (only tensors, numbers, strings, "
        "booleans, None, lists and dicts of them; never pickled objects)"
    )


def _decode(skeleton: Any, tensor: Callable[[str, str], Any]) -> Any:
    """The value ``skeleton`` encodes; ``tensor(name, kind)`` gives the file's tensors."""
    if isinstance(skeleton, dict) and _TENSOR in skeleton:
        return tensor(str(skeleton[_TENSOR]), str(skeleton.get("kind")))
    if isinstance(skeleton, dict) and _ITEMS in skeleton:
        return {k: _decode(v, tensor) for k, v in skeleton[_ITEMS]}
    if isinstance(skeleton, dict):
        return {k: _decode(v, tensor) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [_decode(v, tensor) for v in skeleton]
    return skeleton


def _load(path: Path) -> dict[str, Any]:
    from fl.tensors import LayoutError
    from fl.tensors.io import load_numpy, load_torch, open_tensors

    loaded: dict[str, dict[str, Any]] = {}

    def tensor(name: str, kind: str) -> Any:
        if kind not in loaded:
            loaded[kind] = load_torch(path) if kind == "torch" else load_numpy(path)
        if name not in loaded[kind]:
            raise StateError(f"the state file {path} names tensor {name!r} but does not hold it")
        return loaded[kind][name]

    try:
        f, layout, _ = open_tensors(path)
        f.close()
        skeleton = json.loads(layout.metadata.get(_JSON_KEY, "{}"))
        if not isinstance(skeleton, dict):
            raise StateError(f"{path}: the state is not a JSON object")
        return {str(k): _decode(v, tensor) for k, v in skeleton.items()}
    except StateError:
        raise
    except (LayoutError, OSError, ValueError, TypeError) as exc:
        raise StateError(f"cannot read the state file {path}: {exc}") from exc


def _nbytes(tensor: Any) -> int:
    if hasattr(tensor, "element_size"):
        return int(tensor.numel() * tensor.element_size())
    return int(tensor.nbytes)
