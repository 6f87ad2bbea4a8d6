"""The fl server: site registry, job manager, transfers and the gRPC services on one port."""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection
from pathlib import Path

from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fl.config import HostPolicy
from fl.log import adapter
from fl.memory import tune_malloc
from fl.metrics import ServerMetrics
from fl.proto import federation_pb2_grpc as pb_grpc
from fl.provision import CRL_FILE
from fl.server.admission import Admission
from fl.server.jobs import DEFAULT_MAX_LOG_BYTES, JobManager
from fl.server.service import AdminServicer, BulkServicer, FederationServicer
from fl.server.sites import SiteRegistry
from fl.server.tasks import STATUS_INTERVAL_S, TaskBroker
from fl.server.transfers import BlobStore, UploadManager
from fl.transport import TLSConfig, is_loopback, make_server
from fl.transport.bulk import bulk_handler

__all__ = ["DEFAULT_RPC_WORKERS", "FLServer", "reserved_rpc_workers", "rpc_workers_for"]

log = adapter("fl.server", site="server")
SERVICE_NAME = "fl.v1.Federation"
#: RPCs a server serves at once by default (make_server's): sites' long polls plus transfers and admin calls.
DEFAULT_RPC_WORKERS = 256
#: RPC workers that sites' waiting polls may never take (an eighth of them, within these bounds): kept
#: for heartbeats, uploads, downloads and admin calls, however many sites wait for directives.
MIN_RESERVED_RPC_WORKERS = 8
MAX_RESERVED_RPC_WORKERS = 64


def reserved_rpc_workers(max_workers: int) -> int:
    """The workers of ``max_workers`` that no long poll may hold (see the constants)."""
    if max_workers < MIN_RESERVED_RPC_WORKERS + 1:
        raise ValueError(
            f"max_workers {max_workers}: a server needs at least {MIN_RESERVED_RPC_WORKERS + 1} RPC workers "
            f"({MIN_RESERVED_RPC_WORKERS} kept from sites' long polls, one for a poll)"
        )
    return min(MAX_RESERVED_RPC_WORKERS, max(MIN_RESERVED_RPC_WORKERS, max_workers // 8))


def rpc_workers_for(sites: int) -> int:
    """Workers enough for ``sites`` sites' polls to wait at once beside the default's reserve."""
    return max(DEFAULT_RPC_WORKERS, sites + MAX_RESERVED_RPC_WORKERS)


class FLServer:
    """Everything the server runs, wired together; ``start`` binds the port, ``stop`` ends it."""

    def __init__(
        self,
        workspace: Path,
        *,
        host: str = "0.0.0.0",
        port: int = 8002,
        tls: TLSConfig | None = None,
        heartbeat_interval: float = 5.0,
        lost_after: float = 30.0,
        site_wait_timeout: float = 600.0,
        max_running_jobs: int = 1,
        site_env: Callable[[str, int], dict[str, str]] | None = None,
        crl_path: Path | None = None,
        crl_refresh: float = 60.0,
        allowed_sites: Collection[str] | None = None,
        status_interval: float = STATUS_INTERVAL_S,
        policy: HostPolicy | None = None,
        max_log_bytes: int = DEFAULT_MAX_LOG_BYTES,
        metrics_port: int = 0,
        metrics_host: str | None = None,
        max_workers: int = DEFAULT_RPC_WORKERS,
    ) -> None:
        """``max_workers``: RPCs served at once. A site's waiting long poll holds one; all but
        :func:`reserved_rpc_workers` of them may be so held, past that a poll is told to come back
        later (fl.server.sites), so heartbeats and uploads are served however many sites there are."""
        self.max_workers = max_workers
        parked = max_workers - reserved_rpc_workers(max_workers)
        self.workspace = Path(workspace)
        self.workspace.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.requested_port = port
        self.tls = tls
        #: Admin RPCs without TLS only when serving on loopback (the simulator, tests).
        self.allow_insecure_admin = tls is None and is_loopback(host)
        self.staging_dir = self.workspace / "staging"
        self.staging_dir.mkdir(exist_ok=True)
        self.registry = SiteRegistry(
            heartbeat_interval=heartbeat_interval, lost_after=lost_after, max_parked_polls=parked
        )
        self.blobs = BlobStore()
        self.uploads = UploadManager(self.workspace / "spool")
        self.broker = TaskBroker(self.registry, self.blobs, self.uploads)
        self.jobs = JobManager(
            self.workspace,
            self.registry,
            self.broker,
            self.blobs,
            site_wait_timeout=site_wait_timeout,
            max_running=max_running_jobs,
            site_env=site_env,
            status_interval=status_interval,
            policy=policy,
            max_log_bytes=max_log_bytes,
        )
        self.admission = self._admission(crl_path, crl_refresh, allowed_sites)
        self.metrics = ServerMetrics(self.registry.all_sessions, lambda: list(self.jobs.records.values()))
        self.jobs.on_job_event(self.metrics.job_event)
        #: 0: no metrics endpoint; else the port of ``/metrics`` (on ``metrics_host``, by default ``host``).
        self.metrics_port = metrics_port
        self.metrics_host = metrics_host or host
        self.health = health.HealthServicer()
        self._grpc = None
        self.port = 0
        self._stopped = threading.Event()

    def _admission(self, crl_path: Path | None, refresh: float, allowed_sites: Collection[str] | None) -> Admission:
        """Revocation list (``--crl``, by default the TLS folder's crl.pem) and site allow-list checks."""
        if self.tls is None:
            if crl_path is not None or allowed_sites:
                raise ValueError("a revocation list and an allow-list of sites need TLS (certificates name the sites)")
            return Admission(b"", Path(CRL_FILE))  # never consulted: without TLS there are no certificates
        return Admission(
            self.tls.ca_cert,
            crl_path or self.tls.folder / CRL_FILE,
            required=crl_path is not None,
            refresh=refresh,
            allowed_sites=allowed_sites,
            on_revoked=self.registry.expel,
        )

    def reload_revocations(self) -> None:
        """Re-read the revocation list soon (safe to call from a signal handler)."""
        self.admission.request_reload()

    def start(self) -> int:
        """Load the revocation list (a bad one raises RevocationListError), then serve."""
        tune_malloc()
        if self.tls is not None:
            self.admission.load_initial()
        if self.metrics_port:  # first: a port in use stops the start before anything else runs
            self.metrics_port = self.metrics.serve(self.metrics_host, self.metrics_port)
            log.info("metrics on http://%s:%d/metrics", self.metrics_host, self.metrics_port)
        server, port = make_server(f"{self.host}:{self.requested_port}", tls=self.tls, max_workers=self.max_workers)
        pb_grpc.add_FederationServicer_to_server(FederationServicer(self), server)
        pb_grpc.add_AdminServicer_to_server(AdminServicer(self), server)
        bulk = BulkServicer(self)
        server.add_generic_rpc_handlers((bulk_handler(bulk.download, bulk.upload),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        server.start()
        self._grpc = server
        self.port = port
        self.registry.start()
        self.jobs.start()
        if self.tls is not None:
            self.admission.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "fl server listening on %s:%d (%s), workspace %s%s",
            self.host,
            port,
            "mutual TLS" if self.tls else "INSECURE, no TLS",
            self.workspace,
            "" if self.jobs.policy.job_code else "; runs no job code (--no-custom-code)",
        )
        return port

    def stop(self, grace: float = 2.0) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.jobs.stop()
        self.admission.stop()
        self.registry.stop()
        if self._grpc is not None:
            self._grpc.stop(grace).wait(grace + 1)
        self.metrics.close()
        log.info("fl server stopped")

    def wait(self) -> None:
        self._stopped.wait()
