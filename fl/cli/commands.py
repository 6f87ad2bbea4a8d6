"""``fl simulate | server | site | health | provision | convert-checkpoint``."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from fl.log import adapter, setup_logging

EXIT_OK, EXIT_JOB_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_TIMEOUT = 0, 1, 2, 3, 4
log = adapter("fl.cli")


def _fail(message: str, code: int = EXIT_USAGE) -> int:
    print(f"fl: {message}", file=sys.stderr)
    return code


def _tls_or_insecure(args: argparse.Namespace, who: str) -> tuple[object, int | None]:
    """The TLS config from --tls, or None with --insecure; an exit code when neither is given."""
    from fl.transport import TLSConfig

    if args.tls:
        try:
            return TLSConfig.load(args.tls), None
        except FileNotFoundError as exc:
            return None, _fail(str(exc))
    if args.insecure:
        log.warning("INSECURE: %s runs without TLS; use this only on loopback or for tests", who)
        return None, None
    return None, _fail(f"{who}: give --tls DIR (made by `fl provision`) or --insecure")


def _on_signals(stop: threading.Event) -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def cmd_simulate(args: argparse.Namespace) -> int:
    from fl.simulator import simulate

    setup_logging(args.log_format, args.log_level)
    if not Path(args.job_dir).is_dir():
        return _fail(f"{args.job_dir}: no such job folder")
    sites = [c.strip() for c in args.sites.split(",") if c.strip()] if args.sites else None
    return simulate(
        args.job_dir,
        args.workspace,
        n_clients=args.n_sites,
        threads=args.threads,
        clients=sites,
        gpu=args.gpu,
        timeout=args.job_timeout,
        status_interval=args.status_interval,
        fresh_processes=args.fresh_processes,
        **_site_memory(args.site_memory_gib),
    )


def _site_memory(gib: float | None) -> dict[str, Any]:
    """simulate's ``site_memory`` from ``--site-memory-gib`` (nothing when not given: the default counts)."""
    return {} if gib is None else {"site_memory": int(gib * 1024**3)}


def _names(value: str | None) -> list[str]:
    return [n.strip() for n in (value or "").split(",") if n.strip()]


def cmd_server(args: argparse.Namespace) -> int:
    from fl.config import HostPolicy
    from fl.fsutil import LockHeld
    from fl.server.admission import RevocationListError
    from fl.server.app import DEFAULT_RPC_WORKERS, FLServer, reserved_rpc_workers
    from fl.server.jobs import DEFAULT_MAX_LOG_BYTES

    setup_logging(args.log_format, args.log_level)
    if not args.workspace:
        return _fail("fl server: give --workspace DIR (or FL_WORKSPACE)")
    max_log_bytes = DEFAULT_MAX_LOG_BYTES if args.max_log_bytes is None else args.max_log_bytes
    if max_log_bytes < 4096 or args.max_running_jobs < 1:
        return _fail("fl server: --max-log-bytes must be at least 4096 and --max-running-jobs at least 1")
    try:
        rpc_workers = DEFAULT_RPC_WORKERS if args.rpc_workers is None else int(args.rpc_workers)
        reserved_rpc_workers(rpc_workers)
    except ValueError as exc:
        return _fail(f"fl server: --rpc-workers {args.rpc_workers}: {exc}")
    tls, error = _tls_or_insecure(args, "fl server")
    if error is not None:
        return error
    given = args.data_root if args.data_root is not None else os.environ.get("FL_DATA_ROOTS", "").split(os.pathsep)
    data_roots = tuple(Path(d) for d in given if d)
    missing = [str(d) for d in data_roots if not d.is_dir()]
    if missing:
        return _fail(f"fl server: --data-root {', '.join(missing)}: no such folder")
    if not args.crl_refresh > 0:
        return _fail(f"fl server: --crl-refresh {args.crl_refresh} must be a positive number of seconds")
    try:
        server = FLServer(
            Path(args.workspace),
            host=args.host,
            port=args.port,
            tls=tls,  # type: ignore[arg-type]
            heartbeat_interval=args.heartbeat_interval,
            lost_after=args.heartbeat_timeout,
            site_wait_timeout=args.site_wait_timeout,
            max_running_jobs=args.max_running_jobs,
            max_log_bytes=max_log_bytes,
            crl_path=Path(args.crl) if args.crl else None,
            crl_refresh=args.crl_refresh,
            allowed_sites=_names(args.allowed_sites) or None,
            policy=HostPolicy(job_code=not args.no_custom_code, data_roots=data_roots),
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            max_workers=rpc_workers,
            **({} if args.status_interval is None else {"status_interval": args.status_interval}),
        )
    except LockHeld as exc:
        return _fail(f"fl server: another fl server uses the workspace: {exc}")
    except ValueError as exc:
        return _fail(f"fl server: {exc}")
    signal.signal(signal.SIGHUP, lambda signum, frame: server.reload_revocations())
    try:
        server.start()
    except RevocationListError as exc:
        return _fail(f"fl server: {exc}")
    except OSError as exc:
        return _fail(f"fl server: {exc}", EXIT_UNREACHABLE)
    stop = threading.Event()
    _on_signals(stop)
    stop.wait()
    server.stop()
    return EXIT_OK


def _kubernetes_launcher(args: argparse.Namespace) -> tuple[Path | None, str]:
    """The launcher config of ``--launcher kubernetes`` (checked, stale job pods deleted), or why not."""
    if args.launcher != "kubernetes":
        return None, "--launcher-config is only for --launcher kubernetes" if args.launcher_config else ""
    if not args.launcher_config:
        return None, "--launcher kubernetes needs --launcher-config FILE (the job pods' settings)"
    from fl.site.kube_launch import KubePodApi, LauncherConfig, delete_stale_pods

    path = Path(args.launcher_config)
    try:
        config = LauncherConfig.load(path)
        api = KubePodApi(config.kubeconfig)
        delete_stale_pods(api, config.resolved_namespace(), args.name, labels=config.labels, log=log.info)
    except Exception as exc:  # a bad file, no API access, RBAC
        return None, f"kubernetes launcher ({path}): {exc}"
    return path, ""


def cmd_site(args: argparse.Namespace) -> int:
    from fl.site.agent import SiteAgent

    setup_logging(args.log_format, args.log_level)
    if not args.name or not args.server or not args.workspace:
        return _fail(
            "fl site: give --name, --server HOST:PORT and --workspace (or FL_SITE_NAME, FL_SERVER, FL_WORKSPACE)"
        )
    tls, error = _tls_or_insecure(args, "fl site")
    if error is not None:
        return error
    launcher_config, problem = _kubernetes_launcher(args)
    if problem:
        return _fail(f"fl site: {problem}")
    agent = SiteAgent(
        args.name,
        args.server,
        Path(args.workspace),
        tls=tls,  # type: ignore[arg-type]
        server_name=args.server_name,
        accepts_custom_code=not args.no_custom_code,
        exchange_root=Path(args.exchange_dir) if args.exchange_dir else None,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host or "127.0.0.1",
        launcher_config=launcher_config,
        nproc_per_node=args.nproc_per_node,
    )
    stop = threading.Event()
    _on_signals(stop)
    try:
        agent.start()
    except OSError as exc:  # the metrics port (the only thing start binds)
        agent.stop("site could not start")
        return _fail(f"fl site: {exc}", EXIT_UNREACHABLE)
    log.info("site %s started; connecting to %s", args.name, args.server)
    stop.wait()
    agent.stop("site daemon stopping")
    return EXIT_OK


def cmd_health(args: argparse.Namespace) -> int:
    if args.site_workspace:
        status_file = Path(args.site_workspace) / "site-status.json"
        try:
            status = json.loads(status_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return _fail(f"site not ready: no readable {status_file}", EXIT_UNREACHABLE)
        age = time.time() - float(status.get("updated", 0))
        if not status.get("registered"):
            return _fail(f"site not registered: {status.get('last_error') or 'connecting'}", EXIT_UNREACHABLE)
        if age > args.max_age:
            return _fail(f"site status is {age:.0f} s old (limit {args.max_age:.0f} s)", EXIT_UNREACHABLE)
        print(f"site {status.get('site')} registered with {status.get('server')}")
        return EXIT_OK
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from fl.transport import TLSConfig, make_channel

    if not args.server:
        return _fail("fl health: give --server HOST:PORT or --site-workspace DIR")
    tls = TLSConfig.load(args.tls) if args.tls else None
    channel = make_channel(args.server, tls=tls, server_name=args.server_name)
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=args.rpc_timeout
        )
    except grpc.RpcError as exc:
        return _fail(f"server not healthy: {exc.code().name}: {exc.details()}", EXIT_UNREACHABLE)
    finally:
        channel.close()
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return _fail(
            f"server status {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}", EXIT_UNREACHABLE
        )
    print("SERVING")
    return EXIT_OK


def cmd_provision(args: argparse.Namespace) -> int:
    from fl.provision import ProvisionError, check_helm_values, provision, write_helm_values

    sites, admins = _names(args.sites), _names(args.admins)
    if args.revoke or args.revoke_cert:
        if sites or admins:
            return _fail("fl provision: give either --sites/--admins (to issue) or --revoke/--revoke-cert, not both")
        return _revoke(args)
    try:
        helm_options = dict(
            server_name=args.server_name,
            sites=sites,
            admins=admins,
            external_names=args.server_dns,
            server_address=args.helm_server_address,
        )
        if args.helm_values:  # refused before any certificate is written
            check_helm_values(**helm_options)
        written = provision(
            Path(args.out),
            server_name=args.server_name,
            server_dns=args.server_dns,
            sites=sites,
            admins=admins,
            project=args.project,
            days=args.days,
            crl_days=args.crl_days,
        )
        helm_files = (
            write_helm_values(Path(args.out), Path(args.helm_values), **helm_options) if args.helm_values else []
        )
    except ProvisionError as exc:
        return _fail(str(exc))
    for name, folder, created in written:
        print(f"{'created' if created else 'kept   '} {name:<24} {folder}")
    for path in helm_files:
        print(f"helm    {path}")
    return EXIT_OK


def cmd_convert_checkpoint(args: argparse.Namespace) -> int:
    """Convert the user's own ``.pt`` checkpoint to safetensors (it is unpickled: local files only)."""
    from pickle import UnpicklingError

    from fl.components.persistor import CHECKPOINT_SUFFIX, convert_checkpoint

    source, target = Path(args.source), Path(args.target)
    if target.suffix != CHECKPOINT_SUFFIX:
        return _fail(f"convert-checkpoint: the output must end in {CHECKPOINT_SUFFIX}, got {target}")
    try:
        count = convert_checkpoint(source, target)
    except (OSError, ValueError, RuntimeError, UnpicklingError) as exc:  # torch.load's errors for a bad file
        return _fail(f"convert-checkpoint: cannot convert {source}: {exc}")
    print(f"wrote {target}: {count} tensors")
    return EXIT_OK


def _revoke(args: argparse.Namespace) -> int:
    """``fl provision --revoke``: add certificates to the project's CRL and say where it was written."""
    from fl.provision import CRL_FILE, ProvisionError, revoke

    out = Path(args.out)
    try:
        revoked = revoke(
            out,
            names=_names(args.revoke),
            cert_files=[Path(p) for p in args.revoke_cert],
            server_name=args.server_name,
            crl_days=args.crl_days,
        )
    except ProvisionError as exc:
        return _fail(str(exc))
    for name, serial, added in revoked:
        print(f"{'revoked' if added else 'already'} {name:<24} serial {serial:x}")
    written = [p for p in (out / "ca" / CRL_FILE, out / args.server_name / CRL_FILE) if p.exists()]
    print(f"revocation list: {', '.join(map(str, written))}")
    print("the server enforces it after a SIGHUP or its next --crl-refresh; in Kubernetes set tls.crl (charts/fl)")
    return EXIT_OK
