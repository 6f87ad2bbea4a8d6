"""Filters: components that rewrite a task's model on its way to a site's script, or a result on its way out.

A config names them in NVIDIA FLARE's shape, on the site (``config_fed_client.json``) and on the
server (``config_fed_server.json``)::

    "task_result_filters": [
        {"tasks": ["train"], "filters": [{"path": "fl.filters.ExcludeVars", "args": {"exclude_vars": "bn"}}]}
    ]

``tasks`` lists task names (``"*"``: every task). The site runs ``task_data_filters`` on a task's
model after it is downloaded, before the script sees it, and ``task_result_filters`` on a result
before it is uploaded; the server runs its ``task_result_filters`` on a result before the workflow
(the aggregator) gets it. A filter reads one safetensors file and writes another of the same layout
(the global model's: a filter never drops a tensor, it gives it a value that carries nothing, see
:class:`fl.filters.ExcludeVars`). A filter that fails refuses that result, with a message naming the
filter, the task and the site; the job goes on.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl.components.base import Component
from fl.config import ConfigError, build_component

__all__ = ["Filter", "FilterChain", "FilterContext", "FilterError"]

#: The two config keys, as FLARE's.
FILTER_KEYS = ("task_data_filters", "task_result_filters")


class FilterError(ValueError):
    """A filter could not process a task's model or result; the message names filter, task and site."""


@dataclass
class FilterContext:
    """What a filter may know about the params it processes."""

    site: str
    task_name: str
    #: "task_data" (a task's model) or "task_result" (a site's result)
    kind: str
    #: FULL or DIFF
    params_type: str = "FULL"
    #: the model the task carried: the reference of a FULL result (None where there is none)
    base_path: Path | None = None
    #: the result's meta (e.g. NUM_STEPS_CURRENT_ROUND)
    meta: Mapping[str, Any] = field(default_factory=dict)


class Filter(Component):
    """Base of filters: :meth:`process` writes the filtered params of ``src`` to ``dst``."""

    def process(self, src: Path, dst: Path, ctx: FilterContext) -> bool:
        """Write ``src`` filtered to ``dst`` (same layout) and return True, or return False to leave it as is."""
        raise NotImplementedError


@dataclass(frozen=True)
class _Rule:
    tasks: frozenset[str]
    filters: tuple[tuple[str, Filter], ...]  # (label for messages, filter)

    def applies_to(self, task_name: str) -> bool:
        return "*" in self.tasks or task_name in self.tasks


class FilterChain:
    """The filters of one config key, in config order, by task name."""

    def __init__(self, key: str, rules: Sequence[_Rule] = ()) -> None:
        self.key = key
        self.rules = tuple(rules)

    def __bool__(self) -> bool:
        return any(rule.filters for rule in self.rules)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], key: str, *, where: str) -> FilterChain:
        """Build ``config[key]`` (FLARE's list of ``{tasks, filters}``); every filter must be a :class:`Filter`."""
        if key not in FILTER_KEYS:
            raise ValueError(f"unknown filter key {key!r}; expected one of {', '.join(FILTER_KEYS)}")
        entries = config.get(key) or []
        if not isinstance(entries, list):
            raise ConfigError(f"{where}: {key} must be a list of {{tasks, filters}} objects")
        rules = [cls._rule(entry, f"{key}[{i}]", where) for i, entry in enumerate(entries)]
        return cls(key, rules)

    @staticmethod
    def _rule(entry: object, trail: str, where: str) -> _Rule:
        if not isinstance(entry, Mapping) or set(entry) - {"tasks", "filters"}:
            raise ConfigError(f"{where}: {trail} must be an object with 'tasks' and 'filters'")
        tasks = entry.get("tasks", ["*"])
        if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) and t for t in tasks):
            raise ConfigError(f"{where}: {trail}.tasks must be a non-empty list of task names ('*': all)")
        specs = entry.get("filters") or []
        if not isinstance(specs, list):
            raise ConfigError(f"{where}: {trail}.filters must be a list of {{path, args}} objects")
        built: list[tuple[str, Filter]] = []
        for j, spec in enumerate(specs):
            label = f"{trail}.filters[{j}]"
            if not isinstance(spec, Mapping):
                raise ConfigError(f"{where}: {label} must be an object with path and args")
            _, obj = build_component({"id": label, **spec}, where=where)
            if not isinstance(obj, Filter):
                raise ConfigError(f"{where}: {label}: {spec.get('path')} is not a filter (fl.filters.Filter)")
            built.append((f"{label} ({type(obj).__name__})", obj))
        return _Rule(frozenset(tasks), tuple(built))

    def for_task(self, task_name: str) -> list[tuple[str, Filter]]:
        """The filters that apply to ``task_name``, in order."""
        return [f for rule in self.rules if rule.applies_to(task_name) for f in rule.filters]

    def apply(self, path: Path, ctx: FilterContext) -> Path:
        """Run the task's filters over ``path``; returns the final file (``path`` itself if none changed it).

        Intermediate files lie beside ``path`` and are removed; on error nothing of the filters is
        left and :class:`FilterError` says which filter failed on which task of which site.
        """
        current = path
        for step, (label, flt) in enumerate(self.for_task(ctx.task_name)):
            out = path.with_name(f"{path.name}.{self.key}{step}")
            try:
                changed = flt.process(current, out, ctx)
            except Exception as exc:  # a filter's failure refuses this result, never crashes the host
                out.unlink(missing_ok=True)
                if current != path:
                    current.unlink(missing_ok=True)
                raise FilterError(
                    f"{self.key} {label} failed on task {ctx.task_name!r} of site {ctx.site!r}: "
                    f"{type(exc).__name__}: {exc}"
                ) from None
            if changed:
                if current != path:
                    current.unlink(missing_ok=True)
                current = out
        return current


def replace_file(filtered: Path, target: Path) -> None:
    """Put a chain's output in place of ``target`` (no-op when the chain changed nothing)."""
    if filtered != target:
        os.replace(filtered, target)
