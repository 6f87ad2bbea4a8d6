"""Job configs: reading ``config_fed_server.json`` / ``config_fed_client.json`` and the one class resolver.

A class spec is any object with a ``"path"`` (``{"id": ..., "path": "module.Class", "args": {...}}``),
at any depth of a config: workflows, components, executors, filters, and specs nested in their
arguments or in lists. Every spec resolves through :func:`resolve_class`, against one allow-list:

* fl's own component and workflow classes (``fl.*`` subclasses of
  :class:`~fl.components.base.Component` or :class:`~fl.workflows.base.Controller`);
* NVIDIA FLARE's names for those classes (:data:`NVFLARE_ALIASES`), mapped onto fl's;
* the job's own code: modules whose files lie inside the job's ``custom`` folder, located there
  before anything is imported. torch, os, subprocess, ... are refused unless the job ships them.

A spec that is not inside another spec's arguments is built by the host process itself (the server
or site daemon), so it must be one of fl's; the job's code is allowed only nested in an fl
component's arguments, which builds it in a child process (the persistor's ``model``).
:func:`check_config` checks a whole config without importing any of the job's code (at submit).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import inspect
import json
import keyword
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = [
    "NVFLARE_ALIASES",
    "ClassRef",
    "ConfigError",
    "HostPolicy",
    "build_component",
    "check_config",
    "instantiate",
    "is_class_spec",
    "load_config",
    "locate_job_module",
    "resolve_class",
]

#: NVIDIA FLARE component paths and the fl classes that do the same job.
NVFLARE_ALIASES: dict[str, str] = {
    "nvflare.app_common.workflows.fedavg.FedAvg": "fl.workflows.fedavg.FedAvg",
    "nvflare.app_opt.pt.fedopt_ctl.FedOpt": "fl.workflows.fedopt.FedOpt",
    "nvflare.app_common.workflows.cyclic.Cyclic": "fl.workflows.cyclic.Cyclic",
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
    "nvflare.app_common.filters.exclude_vars.ExcludeVars": "fl.filters.builtin.ExcludeVars",
    "nvflare.app_common.filters.ExcludeVars": "fl.filters.builtin.ExcludeVars",
    "nvflare.app_common.filters.percentile_privacy.PercentilePrivacy": "fl.filters.builtin.PercentilePrivacy",
    "nvflare.app_common.filters.PercentilePrivacy": "fl.filters.builtin.PercentilePrivacy",
}

MAX_CONFIG_BYTES = 4 * 1024 * 1024
#: Nesting of objects and lists in a config beyond which it is refused (no real config comes close).
MAX_CONFIG_DEPTH = 64
SPEC_KEYS = frozenset({"id", "path", "args"})


class ConfigError(ValueError):
    """A job config that cannot be used; the message says which file, component and argument."""


@dataclass(frozen=True)
class HostPolicy:
    """What a host lets a job use: whether the job's own code may run on it, and where files may be.

    ``job_code`` False is ``fl server --no-custom-code``; ``data_roots`` are ``fl server --data-root``.
    """

    job_code: bool = True
    data_roots: tuple[Path, ...] = ()

    def resolve_path(self, value: object, job_folder: Path, *, what: str) -> Path:
        """The file a config names: relative to the job folder, or absolute under a data root."""
        if not isinstance(value, str) or not value or "\0" in value:
            raise ConfigError(f"{what}: expected a file path, got {value!r}")
        given = Path(value)
        roots = [r.resolve() for r in self.data_roots]
        if given.is_absolute():
            resolved, allowed = given.resolve(), roots
        else:
            resolved, allowed = (job_folder / given).resolve(), [job_folder.resolve()]
        if not any(_inside(resolved, root) for root in allowed):
            where = (
                f"the server's data roots ({', '.join(map(str, roots))})"
                if roots
                else "a data root (the server has none: fl server --data-root DIR)"
            )
            rule = (
                f"an absolute path must lie under {where}" if given.is_absolute() else "it must stay in the job folder"
            )
            raise ConfigError(f"{what}: {value!r} resolves to {resolved}, outside the places allowed: {rule}")
        if not resolved.is_file():
            raise ConfigError(f"{what}: {value!r} is not a file ({resolved})")
        return resolved


@dataclass(frozen=True)
class ClassRef:
    """One class spec found in a config: where it is and what it names."""

    component: str  # the id of the entry it belongs to (or its place, e.g. "workflows[0]")
    arg_path: str  # where inside that entry ("" for the entry itself, e.g. "args.model")
    path: str  # the class path as written
    job_code: bool  # True: the job's own code; False: one of fl's classes

    def describe(self, where: str) -> str:
        at = f": {self.arg_path}" if self.arg_path else ""
        return f"{where}: component {self.component!r}{at}: {self.path}"


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
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: the config must be a JSON object")
    version = config.get("format_version", 2)
    if version != 2:
        raise ConfigError(f"{path}: format_version {version!r} is not supported (use 2)")
    return config


def is_class_spec(value: object) -> bool:
    """Whether ``value`` names a class (an object with a ``"path"``): the one test, for checks and builds."""
    return isinstance(value, Mapping) and "path" in value


# ---------------------------------------------------------------------------------- the resolver
def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _allowed_name(path: object) -> str:
    """``path`` mapped through the FLARE aliases; refuses malformed and unmapped FLARE names."""
    if not isinstance(path, str) or "." not in path:
        raise ConfigError(f"a class path must be 'module.Class', got {path!r}")
    path = NVFLARE_ALIASES.get(path, path)
    if path.startswith("nvflare."):
        raise ConfigError(
            f"{path}: this NVIDIA FLARE component has no fl equivalent; supported: {', '.join(sorted(NVFLARE_ALIASES))}"
        )
    parts = path.split(".")
    if not all(p.isidentifier() and not keyword.iskeyword(p) for p in parts):
        raise ConfigError(f"{path!r} is not a dotted Python name 'module.Class'")
    return path


def _is_fl(path: str) -> bool:
    return path.split(".", 1)[0] == "fl"


def _not_allowed(path: str, custom_dir: Path | None) -> ConfigError:
    if custom_dir is None:
        return ConfigError(
            f"{path}: not allowed here: only fl's classes (fl.*) and the FLARE names fl maps onto them; "
            "a job's own code runs only inside an fl component's arguments (e.g. the persistor's model), "
            "built in a child process"
        )
    return ConfigError(
        f"{path}: not allowed: a class must be one of fl's (fl.*), a FLARE name fl maps onto them, or the "
        f"job's own code in its custom folder ({custom_dir.parent.name}/{custom_dir.name}/), and module "
        f"{path.rpartition('.')[0]} is not there"
    )


def locate_job_module(module_name: str, custom_dir: Path) -> importlib.machinery.ModuleSpec | None:
    """The spec of ``module_name`` if its file lies inside ``custom_dir``; imports nothing.

    Each dotted part is searched only in folders inside ``custom_dir`` (symbolic links resolved), so
    no parent package outside it is imported or even consulted. A top-level name of the standard
    library or fl is refused: those are always imported already, so the job's module never would be.
    """
    folder = custom_dir.resolve()
    if not folder.is_dir():
        return None
    search = [str(folder)]
    spec = None
    parts = module_name.split(".")
    for i in range(len(parts)):
        spec = importlib.machinery.PathFinder.find_spec(".".join(parts[: i + 1]), search)
        if spec is None:
            return None
        if spec.origin is not None and not _inside(Path(spec.origin).resolve(), folder):
            return None
        locations = [p for p in (spec.submodule_search_locations or []) if _inside(Path(p).resolve(), folder)]
        if i < len(parts) - 1 and not locations:
            return None
        search = locations
    top = module_name.split(".", 1)[0]
    if top == "fl" or top in sys.stdlib_module_names or top in sys.builtin_module_names:
        raise ConfigError(f"{module_name}: the job's module {top!r} has the name of a standard or fl module")
    return spec


def _module_inside(module: ModuleType, folder: Path) -> bool:
    file = getattr(module, "__file__", None)
    if file:
        return _inside(Path(file).resolve(), folder)
    return any(_inside(Path(p).resolve(), folder) for p in getattr(module, "__path__", []))


def _import_job_module(module_name: str, custom_dir: Path) -> ModuleType:
    """Import the job's module (located by the caller) from ``custom_dir`` itself, never from elsewhere on sys.path.

    A package of the same name already imported from elsewhere (e.g. the real torch, when the job
    ships a ``torch/`` folder) is refused rather than mixed with the job's files.
    """
    folder = custom_dir.resolve()
    parts = module_name.split(".")
    search = [str(folder)]
    module: ModuleType | None = None
    for i in range(len(parts)):
        name = ".".join(parts[: i + 1])
        module = sys.modules.get(name)
        if module is not None:
            if not _module_inside(module, folder):
                raise ConfigError(f"{module_name}: {name} is already imported from outside the job's code")
        else:
            spec = importlib.machinery.PathFinder.find_spec(name, search)
            if spec is None:
                raise ConfigError(f"{module_name}: cannot find {name} in the job's code")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                if spec.loader is not None:
                    spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(name, None)
                raise
            if i:
                setattr(sys.modules[".".join(parts[:i])], parts[i], module)
        search = [p for p in getattr(module, "__path__", []) if _inside(Path(p).resolve(), folder)]
    assert module is not None
    return module


def resolve_class(path: str, *, custom_dir: Path | None = None) -> type:
    """The class ``path`` names, if the allow-list has it (see the module docstring).

    ``custom_dir`` is the job's custom folder, where the job's own code may come from; None: fl only.
    """
    name = _allowed_name(path)
    module_name, _, attr = name.rpartition(".")
    if _is_fl(name):
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(f"{name}: cannot import module {module_name!r}: {exc}") from None
    elif custom_dir is None or locate_job_module(module_name, custom_dir) is None:
        raise _not_allowed(name, custom_dir)
    else:
        try:
            module = _import_job_module(module_name, custom_dir)
        except ImportError as exc:
            raise ConfigError(f"{name}: the job's module {module_name!r} failed to import: {exc}") from None
    cls = getattr(module, attr, None)
    if not inspect.isclass(cls):
        raise ConfigError(f"{name}: {module_name} has no class {attr!r}")
    if _is_fl(name):
        from fl.components.base import Component
        from fl.workflows.base import Controller

        if not issubclass(cls, Component | Controller):
            raise ConfigError(f"{name}: not a component or workflow class")
    else:
        assert custom_dir is not None
        home = sys.modules.get(cls.__module__)
        if home is None or not _module_inside(home, custom_dir.resolve()):
            raise ConfigError(
                f"{name}: the class is {cls.__module__}.{cls.__qualname__}, not defined in the job's code"
            )
    return cls


def instantiate(spec: Mapping[str, Any], *, custom_dir: Path | None = None, recursive: bool = False) -> Any:
    """Build ``spec`` (``{"path", "args"}``); with ``recursive``, the specs nested in its args are built too."""
    if not is_class_spec(spec):
        raise ConfigError(f"a component needs a 'path', got {spec!r}")
    extra = set(spec) - SPEC_KEYS
    if extra:
        raise ConfigError(f"{spec['path']}: unexpected keys {sorted(extra)} (a class spec has id, path, args)")
    cls = resolve_class(spec["path"], custom_dir=custom_dir)
    args = spec.get("args") or {}
    if not isinstance(args, Mapping):
        raise ConfigError(f"{spec['path']}: 'args' must be an object")
    if recursive:
        args = {k: _build_nested(v, custom_dir, 0) for k, v in args.items()}
    try:
        inspect.signature(cls).bind(**args)
    except TypeError as exc:
        accepted = [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
        raise ConfigError(f"{spec['path']}: {exc}; accepted arguments: {', '.join(accepted)}") from None
    try:
        return cls(**args)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{spec['path']}: {exc}") from None


def _build_nested(value: Any, custom_dir: Path | None, depth: int) -> Any:
    if depth > MAX_CONFIG_DEPTH:
        raise ConfigError(f"arguments nested deeper than {MAX_CONFIG_DEPTH} levels")
    if is_class_spec(value):
        return instantiate(value, custom_dir=custom_dir, recursive=True)
    if isinstance(value, Mapping):
        return {k: _build_nested(v, custom_dir, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_build_nested(v, custom_dir, depth + 1) for v in value]
    return value


def build_component(entry: Mapping[str, Any], *, where: str) -> tuple[str, Any]:
    """``(id, instance)`` of a server or site config's entry: one of fl's classes, built in this process."""
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: each component must be an object with id, path and args")
    cid = entry.get("id")
    if not isinstance(cid, str) or not cid:
        raise ConfigError(f"{where}: a component lacks its 'id'")
    try:
        return cid, instantiate(entry)
    except ConfigError as exc:
        raise ConfigError(f"{where}: component {cid!r}: {exc}") from None


# ---------------------------------------------------------------------------------- whole configs
def check_config(config: Mapping[str, Any], *, custom_dir: Path, where: str) -> list[ClassRef]:
    """Check every class spec in ``config`` against the allow-list, importing none of the job's code.

    Returns the specs found. fl's classes are imported (to check that they are components); the
    job's are only located in ``custom_dir``. Errors name the file, component, argument and class.
    """
    refs: list[ClassRef] = []
    for trail, owner, spec, nested in _specs(config, "", None, False, 0, where):
        ref = ClassRef(owner, trail, str(spec.get("path")), job_code=False)
        try:
            extra = set(spec) - SPEC_KEYS
            if extra:
                raise ConfigError(f"unexpected keys {sorted(extra)} (a class spec has id, path, args)")
            name = _allowed_name(spec["path"])
            if _is_fl(name):
                resolve_class(name)
            elif not nested:
                raise _not_allowed(name, None)
            elif locate_job_module(name.rpartition(".")[0], custom_dir) is None:
                raise _not_allowed(name, custom_dir)
            else:
                ref = ClassRef(owner, trail, name, job_code=True)
            if "args" in spec and not isinstance(spec["args"], Mapping):
                raise ConfigError("'args' must be an object")
        except ConfigError as exc:
            raise ConfigError(f"{ref.describe(where)}: {_strip_prefix(str(exc), ref.path)}") from None
        refs.append(ref)
    return refs


def _strip_prefix(message: str, path: str) -> str:
    """An error about ``path`` without ``path:`` in front (describe() already names it)."""
    for prefix in (f"{path}: ", f"{NVFLARE_ALIASES.get(path, path)}: "):
        if message.startswith(prefix):
            return message[len(prefix) :]
    return message


def _specs(
    value: Any, trail: str, owner: str | None, nested: bool, depth: int, where: str
) -> Iterator[tuple[str, str, Mapping[str, Any], bool]]:
    """(argument path, owning entry, spec, nested in another spec) of every class spec under ``value``."""
    if depth > MAX_CONFIG_DEPTH:
        raise ConfigError(f"{where}: {trail or 'the config'}: nested deeper than {MAX_CONFIG_DEPTH} levels")
    if is_class_spec(value):
        if owner is None:  # an entry the host builds itself: messages name it by its id
            cid = value.get("id")
            owner, trail = (cid if isinstance(cid, str) and cid else trail), ""
        yield trail, owner, value, nested
        args = value.get("args")
        if isinstance(args, Mapping):
            yield from _specs(args, _join(trail, "args"), owner, True, depth + 1, where)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _specs(item, _join(trail, str(key)), owner, nested, depth + 1, where)
    elif isinstance(value, Sequence) and not isinstance(value, str | bytes):
        for i, item in enumerate(value):
            yield from _specs(item, f"{trail}[{i}]", owner, nested, depth + 1, where)


def _join(trail: str, key: str) -> str:
    return f"{trail}.{key}" if trail else key
