"""Job configs: reading ``config_fed_server.json`` / ``config_fed_client.json`` and building components.

A component is ``{"id": ..., "path": "module.Class", "args": {...}}``. Paths resolve only to fl's
own component classes (``fl.*`` subclasses of :class:`~fl.components.base.Component` or
:class:`~fl.workflows.base.Controller`), or to NVIDIA FLARE's names for the same components, which
are mapped onto fl's. A job's own code (``allow_custom=True``) is importable only in the processes
that run it: the site's training script and the child process that builds the initial model.
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "NVFLARE_ALIASES",
    "ConfigError",
    "build_component",
    "instantiate",
    "load_config",
    "resolve_class",
]

#: NVIDIA FLARE component paths and the fl classes that do the same job.
NVFLARE_ALIASES: dict[str, str] = {
    "nvflare.app_common.workflows.fedavg.FedAvg": "fl.workflows.fedavg.FedAvg",
    "nvflare.app_common.widgets.validation_json_generator.ValidationJsonGenerator": (
        "fl.components.validation_json.ValidationJsonGenerator"
    ),
    "nvflare.app_common.widgets.intime_model_selector.IntimeModelSelector": (
        "fl.components.model_selector.IntimeModelSelector"
    ),
    "nvflare.app_opt.tracking.tb.tb_receiver.TBAnalyticsReceiver": "fl.components.tb_receiver.TBAnalyticsReceiver",
    "nvflare.app_opt.pt.file_model_persistor.PTFileModelPersistor": "fl.components.persistor.PTFileModelPersistor",
    "nvflare.app_opt.pt.file_model_locator.PTFileModelLocator": "fl.components.model_locator.PTFileModelLocator",
    "nvflare.app_common.executors.script_executor.ScriptExecutor": "fl.components.script_executor.ScriptExecutor",
    "nvflare.app_opt.pt.client_api_launcher_executor.PTClientAPILauncherExecutor": (
        "fl.components.script_executor.ScriptExecutor"
    ),
    "nvflare.app_common.widgets.convert_to_fed_event.ConvertToFedEvent": (
        "fl.components.convert_to_fed_event.ConvertToFedEvent"
    ),
}

MAX_CONFIG_BYTES = 4 * 1024 * 1024


class ConfigError(ValueError):
    """A job config that cannot be used; the message says which file, component and argument."""


def load_config(path: Path) -> dict[str, Any]:
    """Read a config JSON file with size and shape checks."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ConfigError(f"missing config file {path}") from None
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: config larger than {MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: the config must be a JSON object")
    version = config.get("format_version", 2)
    if version != 2:
        raise ConfigError(f"{path}: format_version {version!r} is not supported (use 2)")
    return config


def resolve_class(path: str, *, allow_custom: bool = False) -> type:
    """The class a component path names, if it is allowed (see the module docstring)."""
    if not isinstance(path, str) or "." not in path:
        raise ConfigError(f"component path must be 'module.Class', got {path!r}")
    path = NVFLARE_ALIASES.get(path, path)
    if path.startswith("nvflare."):
        raise ConfigError(
            f"{path}: this NVIDIA FLARE component has no fl equivalent; supported: {', '.join(sorted(NVFLARE_ALIASES))}"
        )
    own = path.startswith("fl.")
    if not own and not allow_custom:
        raise ConfigError(
            f"{path}: not allowed here. Server components come from fl (fl.*); a job's own code runs only "
            "in its training script and in the child process that builds the initial model"
        )
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{path}: cannot import module {module_name!r}: {exc}") from None
    cls = getattr(module, attr, None)
    if not inspect.isclass(cls):
        raise ConfigError(f"{path}: {module_name} has no class {attr!r}")
    if own:
        from fl.components.base import Component
        from fl.workflows.base import Controller

        if not issubclass(cls, Component | Controller):
            raise ConfigError(f"{path}: not a component or workflow class")
    return cls


def instantiate(spec: Mapping[str, Any], *, allow_custom: bool = False, recursive: bool = False) -> Any:
    """Build ``spec`` (``{"path", "args"}``); with ``recursive``, nested specs in args are built too."""
    if not isinstance(spec, Mapping) or "path" not in spec:
        raise ConfigError(f"a component needs a 'path', got {spec!r}")
    cls = resolve_class(spec["path"], allow_custom=allow_custom)
    args = spec.get("args") or {}
    if not isinstance(args, Mapping):
        raise ConfigError(f"{spec['path']}: 'args' must be an object")
    if recursive:
        args = {k: _maybe_build(v, allow_custom) for k, v in args.items()}
    try:
        inspect.signature(cls).bind(**args)
    except TypeError as exc:
        accepted = [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
        raise ConfigError(f"{spec['path']}: {exc}; accepted arguments: {', '.join(accepted)}") from None
    try:
        return cls(**args)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{spec['path']}: {exc}") from None


def _maybe_build(value: Any, allow_custom: bool) -> Any:
    if isinstance(value, Mapping) and "path" in value and set(value) <= {"path", "args"}:
        return instantiate(value, allow_custom=allow_custom, recursive=True)
    return value


def build_component(entry: Mapping[str, Any], *, where: str) -> tuple[str, Any]:
    """``(id, instance)`` of a server or site config's component entry."""
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: each component must be an object with id, path and args")
    cid = entry.get("id")
    if not isinstance(cid, str) or not cid:
        raise ConfigError(f"{where}: a component lacks its 'id'")
    try:
        return cid, instantiate(entry)
    except ConfigError as exc:
        raise ConfigError(f"{where}: component {cid!r}: {exc}") from None
