"""The Job API: describe a federated job in Python, export it as a job folder, or simulate it.

job = FedJob(name="hello-pt", min_clients=2)
job.to(FedAvg(num_clients=2, num_rounds=2), "server")
job.to(SimpleNetwork(), "server")            # adds the PyTorch persistor and model locator
for i in range(2):
    job.to(ScriptRunner("src/hello-pt_cifar10_fl.py"), f"site-{i + 1}")
job.export_job("/tmp/jobs")                  # /tmp/jobs/hello-pt/{meta.json, app_server, app_site-1, ...}
job.simulator_run("/tmp/workspace", n_clients=2)
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl.components.base import Component
from fl.components.convert_to_fed_event import ConvertToFedEvent
from fl.components.model_locator import PTFileModelLocator
from fl.components.model_selector import IntimeModelSelector
from fl.components.persistor import CHECKPOINT_SUFFIX, TORCH_SUFFIXES, PTFileModelPersistor, convert_checkpoint
from fl.components.script_executor import ScriptExecutor
from fl.components.tb_receiver import TBAnalyticsReceiver
from fl.components.validation_json import ValidationJsonGenerator
from fl.filters.base import Filter
from fl.server.jobstore import ALL_SITES, SITE_NAME
from fl.workflows.base import Controller

__all__ = ["FedJob", "FilterType", "FrameworkType", "JobConfigError", "PTModel", "ScriptRunner"]

SERVER = "server"
_SERVER_APP = "app_server"  # the server's app folder in an exported job
# What a script's folder contributes to a job's code: sources and small config files.
CODE_SUFFIXES = {".py", ".json", ".yaml", ".yml", ".toml", ".cfg", ".ini", ".txt", ".sh"}
MAX_CODE_BYTES = 100 * 1024 * 1024


class JobConfigError(ValueError):
    """A job that cannot be exported as described; the message says what to change."""


class FrameworkType:
    """FLARE's ``FrameworkType``: what the training script's params are (``ScriptRunner(framework=...)``)."""

    PYTORCH = "pytorch"
    NUMPY = "numpy"
    RAW = "raw"
    TENSORFLOW = "tensorflow"


class FilterType:
    """FLARE's ``FilterType``: which chain ``job.to(filter, target, filter_type=...)`` adds a filter to."""

    TASK_RESULT = "TASK_RESULT"
    TASK_DATA = "TASK_DATA"


#: FilterType value -> the config key of its chain (FLARE's names).
FILTER_CHAINS = {FilterType.TASK_DATA: "task_data_filters", FilterType.TASK_RESULT: "task_result_filters"}

#: FLARE's default interpreter command; fl runs the site's own Python instead (same flags).
FLARE_DEFAULT_COMMAND = "python3 -u"


@dataclass
class ScriptRunner:
    """Run ``script`` on a site as the job's training script (in a process of its own).

    Parameters
    ----------
    script:
        Path of the script (relative to the current folder, or absolute). Its folder's code is
        shipped with the job, so sibling modules import as usual.
    script_args:
        Command-line arguments for the script.
    launch_external_process:
        FLARE's choice between an in-process and a launched script; fl always launches it (a crash
        or OOM in training never takes the site down), so both values run the same way.
    command:
        Interpreter command; default (and FLARE's default ``"python3 -u"``): the site's Python, unbuffered.
    framework:
        ``FrameworkType.PYTORCH`` (params arrive as torch tensors), ``NUMPY`` or ``RAW`` (NumPy arrays).
    params_transfer_type:
        ``"FULL"`` or ``"DIFF"`` (FLARE's ``TransferType``); see :class:`~fl.components.script_executor.ScriptExecutor`.
    server_expected_format:
        ``"numpy"`` or ``"pytorch"`` (FLARE's ``ExchangeFormat``); fl's server keeps arrays either way.
    launch_once:
        FLARE's: True runs the script once for the whole job, False once per task (its in-memory state
        does not survive between tasks: see ``flare.get_state()``); None (fl's default) lets the site
        decide (a site daemon launches once; the simulator runs per task when sites outnumber threads).
    """

    script: str
    script_args: str = ""
    launch_external_process: bool = False
    command: str | None = None
    framework: str = FrameworkType.PYTORCH
    params_transfer_type: str = "FULL"
    server_expected_format: str = "numpy"
    launch_once: bool | None = None

    def __post_init__(self) -> None:
        from fl.components.script_executor import EXCHANGE_FORMATS

        # FLARE's constants may be str enums: their values are what the config holds.
        self.framework = getattr(self.framework, "value", self.framework)
        self.params_transfer_type = getattr(self.params_transfer_type, "value", self.params_transfer_type)
        self.server_expected_format = getattr(self.server_expected_format, "value", self.server_expected_format)
        if self.framework not in EXCHANGE_FORMATS:
            raise JobConfigError(
                f"ScriptRunner framework must be one of FrameworkType.PYTORCH, NUMPY, RAW "
                f"({', '.join(EXCHANGE_FORMATS)}), got {self.framework!r}"
            )
        if self.command == FLARE_DEFAULT_COMMAND:
            self.command = None
        try:
            ScriptExecutor(
                task_script_path=self.script,
                params_transfer_type=self.params_transfer_type,
                server_expected_format=self.server_expected_format,
            )
        except ValueError as exc:
            raise JobConfigError(f"ScriptRunner: {exc}") from None


@dataclass
class PTModel:
    """An initial PyTorch model for the server (``job.to(PTModel(net), "server")``; a bare module works too)."""

    model: Any
    persistor_args: dict[str, Any] = field(default_factory=dict)


@dataclass
class _App:
    components: list[dict[str, Any]] = field(default_factory=list)
    workflows: list[dict[str, Any]] = field(default_factory=list)
    executors: list[dict[str, Any]] = field(default_factory=list)
    code: dict[str, Path] = field(default_factory=dict)  # path inside custom/ -> source file
    initial_models: list[tuple[dict[str, Any], Any]] = field(default_factory=list)  # (model config, module)
    checkpoints: dict[str, Path] = field(default_factory=dict)  # path in the job folder -> the user's .pt
    #: config key -> FLARE's ``[{"tasks": [...], "filters": [{"path", "args"}, ...]}, ...]``
    filters: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: {key: [] for key in FILTER_CHAINS.values()}
    )

    def ids(self) -> set[str]:
        return {c["id"] for c in self.components} | {w["id"] for w in self.workflows}


def _jsonable(value: Any, where: str) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        raise JobConfigError(f"{where}: {value!r} cannot be written to a JSON config") from None
    return value


def _class_path(cls: type) -> str:
    module = cls.__module__
    if module == "__main__":
        raise JobConfigError(
            f"{cls.__name__} is defined in the job script itself; put it in a module of its own "
            "(e.g. src/model.py) so that the server and sites can import it"
        )
    return f"{module}.{cls.__qualname__}"


def _component_config(obj: Any, cid: str) -> dict[str, Any]:
    args = getattr(obj, "_init_args", None)
    if args is None:
        raise JobConfigError(f"{type(obj).__name__}: not an fl component (no recorded arguments)")
    return {
        "id": cid,
        "path": _class_path(type(obj)),
        "args": {k: _jsonable(v, f"{cid}.{k}") for k, v in args.items()},
    }


def _model_config(model: Any) -> dict[str, Any]:
    """``{"path", "args"}`` of a torch module, from its constructor's parameters and attributes."""
    cls = type(model)
    args: dict[str, Any] = {}
    for name, param in inspect.signature(cls).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if hasattr(model, name):
            value = getattr(model, name)
            try:
                json.dumps(value)
            except (TypeError, ValueError):
                if param.default is param.empty:
                    raise JobConfigError(
                        f"{cls.__name__}({name}=...): the value is not JSON; pass "
                        f'model={{"path": ..., "args": ...}} to PTFileModelPersistor instead'
                    ) from None
                continue
            if param.default is param.empty or value != param.default:
                args[name] = value
        elif param.default is param.empty:
            raise JobConfigError(
                f"{cls.__name__}: cannot tell the value of its required argument {name!r} "
                f"(store it as self.{name}, or give the persistor an explicit model config)"
            )
    return {"path": _class_path(cls), "args": args}


def _check_model_config(config: dict[str, Any], model: Any) -> None:
    """Build ``config`` on torch's meta device (no memory) and compare it with ``model``.

    The server builds the initial model from the config when its weights are too large to ship
    with the job; a config that misses a constructor argument would silently build another model.
    """
    import torch

    from fl.config import ConfigError, instantiate

    try:
        with torch.device("meta"):
            built = instantiate(config, custom_dir=_code_root(type(model))[1], recursive=True)
    except (ConfigError, Exception) as exc:  # a model whose __init__ can't run on meta
        if _state_bytes(model) > _max_shipped_bytes():
            raise JobConfigError(
                f"cannot check that {config['path']}({config.get('args')}) builds this model: {exc}; pass "
                "PTModel(model, persistor_args={'model': {'path': ..., 'args': ...}})"
            ) from None
        return
    mine = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    theirs = {k: (tuple(v.shape), v.dtype) for k, v in built.state_dict().items()}
    if mine != theirs:
        diff = sorted(set(mine.items()) ^ set(theirs.items()))[:3]
        raise JobConfigError(
            f"{config['path']} with args {config.get('args')} builds a different model than the one given "
            f"(e.g. {diff}); store its constructor arguments as attributes of the same names, or pass "
            "PTModel(model, persistor_args={'model': {'path': ..., 'args': ...}})"
        )


def _shippable(model: Any) -> bool:
    """Whether the model's weights are small enough, and real (not on the meta device), to ship."""
    tensors = list(model.state_dict().values())
    return _state_bytes(model) <= _max_shipped_bytes() and not any(t.is_meta for t in tensors)


def _state_bytes(model: Any) -> int:
    return int(sum(t.numel() * t.element_size() for t in model.state_dict().values()))


def _max_shipped_bytes() -> int:
    from fl.components.persistor import INITIAL_WEIGHTS_MAX_BYTES

    return INITIAL_WEIGHTS_MAX_BYTES


def _code_root(cls: type) -> tuple[Path, Path]:
    """(source file of ``cls``'s module, the folder its import name is relative to: the job's ``custom/``)."""
    module = sys.modules.get(cls.__module__)
    file = getattr(module, "__file__", None)
    if not file:
        raise JobConfigError(f"cannot find the source file of {cls.__module__}")
    path = Path(file).resolve()
    depth = len(cls.__module__.split(".")) - 1 if path.name != "__init__.py" else len(cls.__module__.split("."))
    return path, (path.parents[depth] if depth else path.parent)


def _module_code(cls: type) -> dict[str, Path]:
    """The source files that define ``cls``: its module, or its whole top-level package."""
    path, root = _code_root(cls)
    parts = cls.__module__.split(".")
    if len(parts) == 1 and path.name != "__init__.py":
        return {path.name: path}
    return _collect_code(root / parts[0], root)


def _collect_code(folder: Path, root: Path) -> dict[str, Path]:
    """Source files under ``folder`` keyed by their path relative to ``root``."""
    found: dict[str, Path] = {}
    total = 0
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not d.startswith(".") and d != "__pycache__" and not (Path(dirpath) / d / "pyvenv.cfg").exists()
        )
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith(".") or path.suffix not in CODE_SUFFIXES or path.is_symlink():
                continue
            total += path.stat().st_size
            if total > MAX_CODE_BYTES:
                limit = MAX_CODE_BYTES // 2**20
                raise JobConfigError(
                    f"the job's code under {folder} exceeds {limit} MiB; keep data out of the code folder"
                )
            found[path.relative_to(root).as_posix()] = path
    return found


class FedJob:
    """A federated job: what runs on the server and on each site.

    Parameters
    ----------
    name:
        The job's name (letters, digits, '_', '.', '-').
    min_clients:
        Sites that must be connected for the job to start.
    key_metric:
        Metric the best-model selector compares (``None``: no selector).
    mandatory_clients:
        FLARE's sites-the-job-cannot-start-without; fl does not enforce it yet, so a non-empty list
        is refused rather than ignored (use ``min_clients``, or name the sites in the deploy map).
    meta_props:
        Extra meta.json entries (FLARE's argument).
    """

    def __init__(
        self,
        name: str = "fed_job",
        min_clients: int = 1,
        mandatory_clients: list[str] | None = None,
        key_metric: str | None = "accuracy",
        meta_props: dict[str, Any] | None = None,
    ) -> None:
        if not SITE_NAME.match(name):
            raise JobConfigError(f"job name {name!r}: use letters, digits, '_', '.', '-' (at most 63)")
        if min_clients < 1:
            raise JobConfigError(f"min_clients must be at least 1, got {min_clients}")
        self.name = name
        self.min_clients = min_clients
        self.key_metric = key_metric
        if mandatory_clients:
            raise JobConfigError(
                f"mandatory_clients={mandatory_clients!r}: fl does not enforce mandatory sites yet; "
                "use min_clients (every site in the job's deploy map must take part in each round it is sent)"
            )
        self.meta_props = dict(_jsonable(meta_props or {}, "meta_props"))
        self._apps: dict[str, _App] = {}
        self._base = Path.cwd()

    # ------------------------------------------------------------------ building
    def _app(self, target: str) -> _App:
        if target != SERVER and target != ALL_SITES and not SITE_NAME.match(target):
            raise JobConfigError(f"target {target!r}: 'server', '@ALL' or a site name")
        app = self._apps.get(target)
        if app is None:
            app = self._apps[target] = _App()
            if target == SERVER:
                self._add_server_widgets(app)
        return app

    def _add_server_widgets(self, app: _App) -> None:
        app.components.append(_component_config(ValidationJsonGenerator(), "json_generator"))
        if self.key_metric:
            selector = IntimeModelSelector(aggregation_weights={}, key_metric=self.key_metric)
            app.components.append(_component_config(selector, "model_selector"))
        app.components.append(_component_config(TBAnalyticsReceiver(events=["fed.analytix_log_stats"]), "receiver"))

    def _unique_id(self, app: _App, wanted: str) -> str:
        taken = app.ids()
        if wanted not in taken:
            return wanted
        i = 1
        while f"{wanted}_{i}" in taken:
            i += 1
        return f"{wanted}_{i}"

    def to(self, obj: Any, target: str, id: str | None = None, **kwargs: Any) -> str:
        """Add ``obj`` to ``target`` ("server", a site name, or "@ALL"); returns its component id.

        Accepts a workflow (e.g. FedAvg), a torch ``nn.Module``, :class:`PTModel` or a numpy ndarray (server: the
        initial model, with persistor and model locator), a :class:`ScriptRunner` (sites), any fl
        component, a filter (``filter_type=FilterType.TASK_RESULT`` or ``TASK_DATA``, as FLARE's), or a
        path to a file or folder of code to ship. ``tasks`` (FLARE's keyword) names the tasks a
        ScriptRunner runs or a filter applies to, default all.
        """
        tasks = kwargs.pop("tasks", None)
        filter_type = kwargs.pop("filter_type", None)
        if kwargs:
            raise JobConfigError(
                f"unexpected arguments to FedJob.to: {', '.join(kwargs)} (accepted: id, tasks, filter_type)"
            )
        if isinstance(obj, Filter):
            return self._add_filter(self._app(target), target, obj, filter_type, tasks)
        if filter_type is not None:
            raise JobConfigError(f"FedJob.to(filter_type=...) applies to a filter, not a {type(obj).__name__}")
        if tasks is not None and not isinstance(obj, ScriptRunner):
            raise JobConfigError(
                f"FedJob.to(tasks=...) applies to a ScriptRunner or a filter, not a {type(obj).__name__}"
            )
        app = self._app(target)
        if isinstance(obj, str | os.PathLike):
            path = (self._base / obj).resolve()
            if not path.exists():
                raise JobConfigError(f"{obj}: no such file or folder")
            app.code.update(_collect_code(path, path.parent) if path.is_dir() else {path.name: path})
            return str(obj)
        if isinstance(obj, Controller):
            if target != SERVER:
                raise JobConfigError("workflows run on the server: job.to(controller, 'server')")
            cid = self._unique_id(app, id or "controller")
            app.workflows.append(_component_config(obj, cid))
            return cid
        if isinstance(obj, ScriptRunner):
            if target == SERVER:
                raise JobConfigError("a ScriptRunner runs on sites: job.to(runner, 'site-1') or job.to_clients(runner)")
            return self._add_script(app, obj, tasks)
        if _is_numpy_array(obj):
            return self._add_numpy_model(app, target, obj, id)
        if isinstance(obj, PTModel) or _is_torch_module(obj):
            model, extra = (obj.model, dict(obj.persistor_args)) if isinstance(obj, PTModel) else (obj, {})
            if target != SERVER:
                raise JobConfigError("the initial model goes to the server: job.to(model, 'server')")
            self._ship_converted_checkpoint(app, extra)
            model_config = extra.pop("model", None) or _model_config(model)
            _check_model_config(model_config, model)
            persistor = PTFileModelPersistor(model=model_config, **extra)
            if _shippable(model):
                app.initial_models.append((model_config, model))
            pid = self._unique_id(app, id or "persistor")
            app.components.append(_component_config(persistor, pid))
            lid = self._unique_id(app, "model_locator")
            app.components.append(_component_config(PTFileModelLocator(pt_persistor_id=pid), lid))
            app.code.update(_module_code(type(model)))
            return pid
        if isinstance(obj, Component):
            cid = self._unique_id(app, id or type(obj).__name__.lower())
            app.components.append(_component_config(obj, cid))
            return cid
        raise JobConfigError(f"FedJob.to: don't know how to add a {type(obj).__name__}")

    def _add_filter(self, app: _App, target: str, obj: Filter, filter_type: Any, tasks: Any) -> str:
        """Add ``obj`` to ``target``'s task data or task result filters for ``tasks`` (FLARE's rules).

        Filters for the same task set run in the order added; a task set that overlaps another one
        (but is not equal to it) is refused, as FLARE's ``_add_task_filter`` does.
        """
        kind = getattr(filter_type, "value", filter_type)
        key = FILTER_CHAINS.get(kind) if isinstance(kind, str) else None
        if key is None:
            raise JobConfigError(
                f"FedJob.to({type(obj).__name__}, {target!r}): filter_type must be FilterType.TASK_RESULT or "
                f"FilterType.TASK_DATA, got {filter_type!r}"
            )
        if target == SERVER and key == "task_data_filters":
            raise JobConfigError(
                f"FedJob.to({type(obj).__name__}, 'server', filter_type=FilterType.TASK_DATA): fl's server does "
                "not filter task data (every site receives the global model as it is); put the filter on the "
                "sites: job.to(filter, 'site-1', filter_type=FilterType.TASK_DATA) or job.to_clients(...)"
            )
        wanted = ["*"] if tasks is None else tasks
        if not isinstance(wanted, list | tuple) or not wanted or not all(isinstance(t, str) and t for t in wanted):
            raise JobConfigError(f"FedJob.to({type(obj).__name__}, tasks=...): a list of task names, got {tasks!r}")
        config = _component_config(obj, key)
        if not config["path"].startswith("fl."):
            raise JobConfigError(
                f"FedJob.to({type(obj).__name__}, {target!r}): {config['path']} is the job's own code; filters run "
                "in the site agent and the server themselves, which never import a job's code: use fl's filters "
                "(fl.filters.ExcludeVars, fl.filters.PercentilePrivacy)"
            )
        spec = {"path": config["path"], "args": config["args"]}
        task_set = set(wanted)
        for entry in app.filters[key]:
            if set(entry["tasks"]) == task_set:
                entry["filters"].append(spec)
                return key
            if task_set & set(entry["tasks"]):
                raise JobConfigError(
                    f"FedJob.to({type(obj).__name__}, {target!r}): tasks {sorted(task_set)} overlap the tasks "
                    f"{entry['tasks']} that {key} has filters for; use the same task list or disjoint ones"
                )
        app.filters[key].append({"tasks": sorted(task_set), "filters": [spec]})
        return key

    def _add_numpy_model(self, app: _App, target: str, array: Any, id: str | None) -> str:
        """An ndarray initial model: the NumPy persistor holds it in the config (FLARE casts to float32)."""
        from fl.components.np_persistor import NPModelPersistor

        if target != SERVER:
            raise JobConfigError("the initial model goes to the server: job.to(array, 'server')")
        dtype = array.dtype.name if array.dtype.kind == "f" else "float32"
        persistor = NPModelPersistor(model=array.tolist(), dtype=dtype)
        pid = self._unique_id(app, id or "persistor")
        app.components.append(_component_config(persistor, pid))
        return pid

    def _ship_converted_checkpoint(self, app: _App, persistor_args: dict[str, Any]) -> None:
        """A local ``.pt`` initial checkpoint goes into the job as safetensors (converted at export, here).

        A job may carry only safetensors (the server never unpickles a job's files); this is the
        user's own file on the user's own machine, so it may be loaded with torch here.
        """
        given = persistor_args.get("source_ckpt_file_full_name")
        if not isinstance(given, str) or Path(given).suffix not in TORCH_SUFFIXES:
            return
        local = (self._base / given).resolve()
        if not local.is_file():
            return  # not here (e.g. a path on the server): the persistor refuses it, saying how to convert
        in_job = f"{_SERVER_APP}/initial_checkpoint/{local.stem}{CHECKPOINT_SUFFIX}"
        app.checkpoints[in_job] = local
        persistor_args["source_ckpt_file_full_name"] = in_job

    def to_server(self, obj: Any, id: str | None = None, **kwargs: Any) -> str:
        return self.to(obj, SERVER, id, **kwargs)

    def to_clients(self, obj: Any, id: str | None = None, **kwargs: Any) -> str:
        """Add ``obj`` to every site (the "@ALL" app)."""
        return self.to(obj, ALL_SITES, id, **kwargs)

    def _add_script(self, app: _App, runner: ScriptRunner, tasks: list[str] | None = None) -> str:
        script = (self._base / runner.script).resolve()
        if not script.is_file():
            raise JobConfigError(f"ScriptRunner: script {runner.script!r} not found (from {self._base})")
        try:
            rel_dir = script.parent.relative_to(self._base)
            root = self._base
        except ValueError:
            rel_dir = Path(script.parent.name)
            root = script.parent.parent
        if rel_dir == Path("."):
            code = {p.name: p for p in sorted(script.parent.glob("*")) if p.is_file() and p.suffix in CODE_SUFFIXES}
        else:
            code = _collect_code(script.parent, root)
        app.code.update(code)
        if app.executors:
            raise JobConfigError("a site runs one training script per job; this site already has one")
        settings: dict[str, Any] = {"command": runner.command} if runner.command else {}
        if runner.launch_once is not None:
            settings["launch_once"] = runner.launch_once
        executor = ScriptExecutor(
            task_script_path=script.relative_to(root).as_posix() if rel_dir != Path(".") else script.name,
            task_script_args=runner.script_args,
            params_exchange_format=runner.framework,
            params_transfer_type=runner.params_transfer_type,
            server_expected_format=runner.server_expected_format,
            **settings,
        )
        if tasks is not None and (not isinstance(tasks, list) or not all(isinstance(t, str) and t for t in tasks)):
            raise JobConfigError(f"FedJob.to(tasks=...): a list of task names, got {tasks!r}")
        config = _component_config(executor, "executor")
        app.executors.append({"tasks": tasks or ["*"], "executor": {"path": config["path"], "args": config["args"]}})
        if "event_to_fed" not in app.ids():
            convert = ConvertToFedEvent(events_to_convert=["analytix_log_stats"], fed_event_prefix="fed.")
            app.components.append(_component_config(convert, "event_to_fed"))
        return "executor"

    # ------------------------------------------------------------------ export
    @property
    def sites(self) -> list[str]:
        return sorted(t for t in self._apps if t not in (SERVER, ALL_SITES))

    @property
    def client_targets(self) -> list[str]:
        """The job's site apps: its named sites, and "@ALL" if something was added to every site."""
        return sorted(t for t in self._apps if t != SERVER)

    def _check(self) -> None:
        server = self._apps.get(SERVER)
        if server is None or not server.workflows:
            raise JobConfigError("the job has no workflow: job.to(FedAvg(...), 'server')")
        site_apps = [a for t, a in self._apps.items() if t != SERVER]
        if not site_apps:
            raise JobConfigError("the job has no sites: job.to(ScriptRunner(...), 'site-1') or job.to_clients(...)")
        for target, app in self._apps.items():
            if target != SERVER and not app.executors:
                raise JobConfigError(f"{target} has no training script: job.to(ScriptRunner(...), {target!r})")

    def export_job(self, job_root: str | os.PathLike[str]) -> Path:
        """Write the job folder ``job_root/<name>``; returns its path."""
        self._check()
        target = Path(job_root) / self.name
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.name}-", dir=target.parent))
        try:
            deploy_map: dict[str, list[str]] = {}
            for where, app in sorted(self._apps.items()):
                folder = _SERVER_APP if where == SERVER else ("app" if where == ALL_SITES else f"app_{where}")
                deploy_map[folder] = [where]
                config_dir = tmp / folder / "config"
                config_dir.mkdir(parents=True)
                if where == SERVER:
                    config = {
                        "format_version": 2,
                        "workflows": app.workflows,
                        "components": app.components,
                        **app.filters,
                    }
                    name = "config_fed_server.json"
                else:
                    config = {
                        "format_version": 2,
                        "executors": app.executors,
                        "components": app.components,
                        **app.filters,
                    }
                    name = "config_fed_client.json"
                (config_dir / name).write_text(json.dumps(config, indent=2) + "\n")
                for model_config, module in app.initial_models:
                    _write_initial_weights(tmp / folder, model_config, module)
                for in_job, local in sorted(app.checkpoints.items()):
                    _write_converted_checkpoint(local, tmp / in_job)
                for rel, source in sorted(app.code.items()):
                    dest = tmp / folder / "custom" / rel
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(source, dest)
            meta = {
                **self.meta_props,
                "name": self.name,
                "resource_spec": {},
                "min_clients": self.min_clients,
                "deploy_map": deploy_map,
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    # ------------------------------------------------------------------ simulation
    def simulator_run(
        self,
        workspace: str | os.PathLike[str],
        n_clients: int | None = None,
        threads: int | None = None,
        gpu: str | None = None,
        clients: list[str] | None = None,
        timeout: float | None = None,
    ) -> int:
        """Export the job and run it in the simulator; returns the exit code (0: finished).

        Earlier runs in ``workspace`` are kept (each is a job folder of its own; ``workspace/latest``
        is the newest); a run still going there makes this one refuse with exit code 2.
        ``timeout``: seconds the run may take, default no limit (see :mod:`fl.simulator`).
        """
        from fl.log import setup_logging
        from fl.simulator import WorkspaceBusy, log, logging_configured, simulate, workspace_lock

        workspace = Path(workspace).resolve()
        if clients is None and n_clients is None and self.sites:
            clients = self.sites
        if not logging_configured():
            setup_logging()
        try:
            # Held across the export too: a concurrent run must not rewrite job_config under this one.
            with workspace_lock(workspace):
                job_dir = self.export_job(workspace / "job_config")
                return simulate(
                    job_dir, workspace, n_clients=n_clients, threads=threads, clients=clients, gpu=gpu, timeout=timeout
                )
        except WorkspaceBusy as exc:
            log.error("%s", exc)
            return 2


def _write_initial_weights(app_dir: Path, model_config: dict[str, Any], module: Any) -> None:
    """Ship the initial weights of a small model with the job, so the server needn't build it.

    The persistor uses them only while they match its model config (see
    :func:`fl.components.persistor.initial_weights_path`); larger models are built on the server.
    """
    from fl.components.persistor import initial_weights_path, model_fingerprint
    from fl.tensors import write_tensors

    state = module.state_dict()
    path = initial_weights_path(app_dir, model_config)
    write_tensors(path, state, {"fl.model": model_fingerprint(model_config)})


def _write_converted_checkpoint(local: Path, target: Path) -> None:
    """Write the user's torch checkpoint ``local`` into the job folder as safetensors."""
    from pickle import UnpicklingError

    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        convert_checkpoint(local, target)
    except (OSError, ValueError, RuntimeError, UnpicklingError) as exc:
        raise JobConfigError(f"initial checkpoint {local}: cannot convert it to safetensors: {exc}") from None


def _is_numpy_array(obj: Any) -> bool:
    import numpy as np

    return isinstance(obj, np.ndarray)


def _is_torch_module(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)
