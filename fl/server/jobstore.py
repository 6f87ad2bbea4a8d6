"""Job folders: checking a submitted job, unpacking it safely, and packing apps for sites.

A job folder is what ``FedJob.export_job`` writes: ``meta.json`` (name, deploy_map, min_clients),
``app_server/config/config_fed_server.json`` and one app per site (or one ``app`` for all) with
``config/config_fed_client.json`` and the job's code under ``custom/``.
"""

from __future__ import annotations

import io
import json
import re
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from fl.config import ClassRef, ConfigError, HostPolicy, build_component, check_config, load_config
from fl.filters import server_result_filters

__all__ = [
    "MAX_JOB_BYTES",
    "JobError",
    "JobSpec",
    "extract_zip",
    "read_job",
    "zip_folder",
]

MAX_JOB_BYTES = 512 * 1024 * 1024
MAX_JOB_FILES = 20_000
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,62}$")
ALL_SITES = "@ALL"


class JobError(ValueError):
    """A job folder or archive that cannot run; the message says what is wrong."""


def zip_folder(folder: Path) -> bytes:
    """A deterministic zip of a folder (regular files only, no links)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder).as_posix()
            if "__pycache__" in path.parts or path.is_symlink():
                continue
            if path.is_file():
                info = zipfile.ZipInfo(rel, date_time=(2020, 1, 1, 0, 0, 0))
                info.external_attr = (stat.S_IFREG | 0o644) << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, path.read_bytes())
    return buf.getvalue()


def extract_zip(data: bytes | Path | BinaryIO, target: Path, *, max_bytes: int = MAX_JOB_BYTES) -> None:
    """Unpack an archive (bytes, a path or an open file), refusing absolute paths, '..', links and
    archives that expand too far."""
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        zf = zipfile.ZipFile(source)
    except zipfile.BadZipFile as exc:
        raise JobError(f"job archive is not a valid zip: {exc}") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_JOB_FILES:
            raise JobError(f"job archive holds {len(infos)} files (limit {MAX_JOB_FILES})")
        total = sum(i.file_size for i in infos)
        if total > max_bytes:
            raise JobError(f"job archive expands to {total} bytes (limit {max_bytes})")
        root = target.resolve()
        for info in infos:
            name = info.filename
            mode = info.external_attr >> 16
            if name.startswith(("/", "\\")) or ".." in Path(name).parts or ":" in name:
                raise JobError(f"job archive entry {name!r} points outside the job folder")
            if stat.S_ISLNK(mode):
                raise JobError(f"job archive entry {name!r} is a symbolic link")
            dest = (root / name).resolve()
            if root not in dest.parents and dest != root:
                raise JobError(f"job archive entry {name!r} points outside the job folder")
        target.mkdir(parents=True, exist_ok=True)
        for info in infos:
            if info.is_dir():
                (target / info.filename).mkdir(parents=True, exist_ok=True)
                continue
            dest = target / info.filename
            dest.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(dest, "wb") as out:
                remaining = info.file_size
                while chunk := src.read(1024 * 1024):
                    remaining -= len(chunk)
                    if remaining < 0:
                        raise JobError(f"job archive entry {info.filename!r} is larger than it says")
                    out.write(chunk)


@dataclass
class JobSpec:
    """A checked job folder."""

    folder: Path
    name: str
    deploy_map: dict[str, list[str]]
    min_clients: int
    server_config: dict[str, Any]
    num_rounds: int

    @property
    def named_sites(self) -> list[str]:
        return sorted({t for targets in self.deploy_map.values() for t in targets if t not in ("server", ALL_SITES)})

    @property
    def all_sites_app(self) -> str | None:
        for app, targets in self.deploy_map.items():
            if ALL_SITES in targets:
                return app
        return None

    def app_for(self, site: str) -> str | None:
        for app, targets in self.deploy_map.items():
            if site in targets:
                return app
        return self.all_sites_app

    @property
    def server_app(self) -> Path:
        for app, targets in self.deploy_map.items():
            if "server" in targets:
                return self.folder / app
        raise JobError("deploy_map deploys no app to the server")

    def has_custom_code(self, app: str) -> bool:
        custom = self.folder / app / "custom"
        return custom.is_dir() and any(p.is_file() for p in custom.rglob("*"))


def read_job(folder: Path, policy: HostPolicy | None = None) -> JobSpec:
    """Check a job folder: meta, deploy map, and every config against the server's ``policy``.

    Every class spec in every app's config must be allowed (:func:`fl.config.check_config`; none of
    the job's code is imported) and the server's components must build. With a ``policy``, their file
    arguments must lie in the job folder or a data root, and under ``--no-custom-code`` none may need
    the job's code; without one (the admin client's check before upload) the server checks those.
    """
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise JobError(f"{folder}: no meta.json; is this an exported job folder (FedJob.export_job)?")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise JobError(f"meta.json is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise JobError("meta.json must be a JSON object")
    name = meta.get("name") or folder.name
    if not isinstance(name, str) or not SITE_NAME.match(name):
        raise JobError(f"job name {name!r}: use letters, digits, '_', '.', '-' (at most 63)")
    deploy_map = meta.get("deploy_map")
    if not isinstance(deploy_map, dict) or not deploy_map:
        raise JobError('meta.json needs a deploy_map: {app folder: ["server" | site name | "@ALL", ...]}')
    for app, targets in deploy_map.items():
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise JobError(f"deploy_map[{app!r}] must be a list of names")
        if "/" in app or app.startswith(".") or not (folder / app).is_dir():
            raise JobError(f"deploy_map names app {app!r}, but the job has no such folder")
        for t in targets:
            if t not in ("server", ALL_SITES) and not SITE_NAME.match(t):
                raise JobError(f"deploy_map[{app!r}]: bad site name {t!r}")
        site_targets = [t for t in targets if t != "server"]
        if site_targets and not (folder / app / "config" / "config_fed_client.json").is_file():
            raise JobError(f"app {app!r} is deployed to sites but has no config/config_fed_client.json")
    servers = [app for app, targets in deploy_map.items() if "server" in targets]
    if len(servers) != 1:
        raise JobError(f"deploy_map must deploy exactly one app to the server, found {len(servers)}")
    try:
        for app, targets in deploy_map.items():
            if any(t != "server" for t in targets):
                _checked_config(folder, app, "config_fed_client.json")
        server_config, refs = _checked_config(folder, servers[0], "config_fed_server.json")
        num_rounds = _check_server_components(folder, servers[0], server_config, refs, policy)
    except ConfigError as exc:
        raise JobError(str(exc)) from None
    named = {t for targets in deploy_map.values() for t in targets if t not in ("server", ALL_SITES)}
    min_clients = meta.get("min_clients")
    if min_clients is None:
        min_clients = len(named) or 1
    if not isinstance(min_clients, int) or min_clients < 1:
        raise JobError(f"meta.json min_clients must be a positive integer, got {min_clients!r}")
    has_all = any(ALL_SITES in targets for targets in deploy_map.values())
    if not has_all and min_clients > len(named):
        raise JobError(f"min_clients is {min_clients} but the job deploys to {len(named)} sites")
    return JobSpec(folder, name, {k: list(v) for k, v in deploy_map.items()}, min_clients, server_config, num_rounds)


def _checked_config(folder: Path, app: str, name: str) -> tuple[dict[str, Any], list[ClassRef]]:
    """An app's config, read and checked against the allow-list; with the class specs it names."""
    path = folder / app / "config" / name
    config = load_config(path)
    return config, check_config(config, custom_dir=folder / app / "custom", where=f"{app}/config/{name}")


def _check_server_components(
    folder: Path, app: str, config: dict[str, Any], refs: list[ClassRef], policy: HostPolicy | None
) -> int:
    """Build the server's workflows and components (fl's own classes), check their file arguments and,
    under the policy, that none needs the job's code; returns the job's number of rounds."""
    where = f"{app}/config/config_fed_server.json"
    workflows = config.get("workflows")
    if not isinstance(workflows, list) or not workflows:
        raise ConfigError(f"{where}: needs at least one workflow")
    components = config.get("components", [])
    if not isinstance(components, list):
        raise ConfigError(f"{where}: 'components' must be a list")
    server_result_filters(config, where=where)  # bad filter arguments are refused at submit
    job_code = {r.component: r for r in refs if r.job_code}
    num_rounds = 0
    for entry in [*workflows, *components]:
        cid, obj = build_component(entry, where=where)
        num_rounds = max(num_rounds, int(getattr(obj, "num_rounds", 0) or 0))
        if policy is None:
            continue
        given = getattr(obj, "_init_args", {})
        for arg in getattr(obj, "file_args", ()):
            value = given.get(arg)
            if value is not None:
                policy.resolve_path(value, folder, what=f"{where}: component {cid!r}: args.{arg}")
        ref = job_code.get(cid)
        if ref is None or policy.job_code:
            continue
        needer = getattr(obj, "job_code_needed", None)
        reason = needer(folder / app) if needer else "its arguments name the job's code"
        if reason is not None:
            raise ConfigError(
                f"{ref.describe(where)}: refused: this server runs no job code (fl server --no-custom-code), "
                f"and {reason}"
            )
    return num_rounds
