"""The ``fl`` command: simulator, daemons, admin commands, provisioning, probes.

Exit codes: 0 success; 1 the job failed or was aborted; 2 bad usage or input; 3 cannot reach or
authenticate to the server; 4 timed out. See docs/operations.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from fl import __version__
from fl.cli.options import CommandParser, add_alias

__all__ = ["main"]

EXIT_OK, EXIT_JOB_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_TIMEOUT = 0, 1, 2, 3, 4
INSECURE_HELP = "no TLS, loopback only (env FL_INSECURE=1)"


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name, default)


def _env_port() -> int:
    """FL_PORT if it is a port number. Kubernetes injects FL_PORT=tcp://... for a Service named
    "fl" (service links); that is not ours, so it is ignored rather than fatal."""
    value = os.environ.get("FL_PORT", "")
    return int(value) if value.isdigit() else 8002


def _add_connection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default=_env("FL_SERVER"), help="HOST:PORT of the fl server (env FL_SERVER)")
    p.add_argument("--tls", default=_env("FL_TLS_DIR"), help="TLS folder: ca.crt, tls.crt, tls.key (env FL_TLS_DIR)")
    p.add_argument("--insecure", action="store_true", default=_env("FL_INSECURE") == "1", help=INSECURE_HELP)
    p.add_argument(
        "--server-name",
        default=_env("FL_SERVER_NAME"),
        help="name to verify in the server's certificate (env FL_SERVER_NAME; default: the host of --server)",
    )


def _add_logging(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=_env("FL_LOG_FORMAT", "text"),
        help="one event a line as text, or JSON lines (env FL_LOG_FORMAT)",
    )
    p.add_argument(
        "--log-level", default=_env("FL_LOG_LEVEL", "INFO"), help="DEBUG, INFO, WARNING or ERROR (env FL_LOG_LEVEL)"
    )


def _positive_gib(value: str) -> float:
    """A memory size in GiB for ``--site-memory-gib``: a positive number."""
    try:
        gib = float(value)
    except ValueError:
        gib = 0.0
    if not 0 < gib < float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive number of GiB")
    return gib


def _port_number(value: str) -> int:
    """A TCP port (0 = off) for ``--metrics-port``; anything else is a usage error that names the value."""
    if not value.isdigit() or int(value) > 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number (0-65535; 0 = no metrics)")
    return int(value)


def _rank_count(value: str) -> int:
    """``--nproc-per-node``: a whole number >= 1."""
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of ranks (a whole number >= 1)")
    return int(value)


def _add_metrics(p: argparse.ArgumentParser, host_default: str) -> None:
    p.add_argument(
        "--metrics-port",
        type=_port_number,
        default=_env("FL_METRICS_PORT", "0"),
        help="serve Prometheus metrics on http://HOST:PORT/metrics; 0 = off (env FL_METRICS_PORT)",
    )
    p.add_argument(
        "--metrics-host",
        default=_env("FL_METRICS_HOST"),
        help=f"address for the metrics endpoint (env FL_METRICS_HOST; default: {host_default})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="fl", description="fl: federated learning for PyTorch")
    parser.add_argument("--version", action="version", version=f"fl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "simulate",
        help="run an exported job with a server and N sites on this machine",
        description="Run an exported job with a real fl server and N site agents on loopback.",
        epilog="NVIDIA FLARE's simulator spellings work too: "
        "-n/--n_clients N, -c/--clients NAMES, -t/--threads T, -w/--workspace DIR, -gpu/--gpu IDS.",
    )
    p.add_argument("job_dir", help="an exported job folder (FedJob.export_job)")
    n_sites = p.add_argument(
        "-n", "--n-sites", type=int, metavar="N", help="number of sites (also --n_clients; default: the job's sites)"
    )
    add_alias(p, n_sites, "--n-clients", "--n_clients")
    sites = p.add_argument(
        "--sites", metavar="NAMES", help="comma-separated site names (also -c/--clients; default: the job's sites)"
    )
    add_alias(p, sites, "-c", "--clients")
    p.add_argument("-w", "--workspace", default="/tmp/fl/simulate", help="simulation workspace")
    p.add_argument(
        "-t",
        "--threads",
        type=int,
        help="sites training at the same time (default: all, or four a core when all would not fit in memory)",
    )
    p.add_argument(
        "--site-memory-gib",
        type=_positive_gib,
        metavar="GIB",
        help="memory one site's script needs while it trains, for the run's memory estimate (default 0.25)",
    )
    p.add_argument(
        "--fresh-processes",
        action="store_true",
        help="when scripts run per task: fork a process for each run rather than reuse worker processes "
        "(slower; for scripts whose libraries keep state that fl cannot reset between runs)",
    )
    gpu = p.add_argument("--gpu", metavar="IDS", help="comma-separated GPU ids, assigned to sites in turn (also -gpu)")
    add_alias(p, gpu, "-gpu")
    job_timeout = p.add_argument(
        "--job-timeout",
        type=float,
        metavar="SECONDS",
        help="abort the job if it has not finished after this many seconds (also --timeout; default: no limit)",
    )
    add_alias(p, job_timeout, "--timeout")
    p.add_argument(
        "--status-interval", type=float, help="seconds between 'still waiting for' lines in a round (default: 30)"
    )
    _add_logging(p)

    p = sub.add_parser("server", help="run the fl server daemon")
    p.add_argument("--workspace", default=_env("FL_WORKSPACE"), help="server workspace (env FL_WORKSPACE)")
    p.add_argument("--host", default=_env("FL_HOST", "0.0.0.0"), help="address to listen on (env FL_HOST)")
    p.add_argument("--port", type=int, default=_env_port(), help="port to listen on; 0 picks a free one (env FL_PORT)")
    p.add_argument("--tls", default=_env("FL_TLS_DIR"), help="server TLS folder (env FL_TLS_DIR)")
    p.add_argument("--insecure", action="store_true", default=_env("FL_INSECURE") == "1", help=INSECURE_HELP)
    p.add_argument("--heartbeat-interval", type=float, default=5.0, help="seconds between site heartbeats")
    p.add_argument(
        "--heartbeat-timeout", type=float, default=30.0, help="seconds without heartbeat before a site is lost"
    )
    p.add_argument(
        "--site-wait-timeout", type=float, default=600.0, help="seconds a job waits for its sites to connect"
    )
    p.add_argument(
        "--crl",
        default=_env("FL_CRL"),
        help="revocation list (PEM CRL) to enforce (default: crl.pem in the TLS folder)",
    )
    p.add_argument(
        "--crl-refresh",
        type=float,
        default=60.0,
        help="seconds between re-reads of the revocation list (and on SIGHUP)",
    )
    p.add_argument(
        "--allowed-sites", default=_env("FL_ALLOWED_SITES"), help="comma-separated: only these sites may join"
    )
    p.add_argument(
        "--status-interval",
        type=float,
        default=_env("FL_STATUS_INTERVAL"),
        help="seconds between 'still waiting for' lines while a round waits (default: 60; env FL_STATUS_INTERVAL)",
    )
    p.add_argument(
        "--no-custom-code",
        action="store_true",
        default=_env("FL_NO_CUSTOM_CODE") == "1",
        help="run no job code on the server host: initial models come from shipped weights or checkpoints",
    )
    p.add_argument(
        "--data-root",
        action="append",
        metavar="DIR",
        help="a folder that absolute file paths in job configs (checkpoints) may point into; repeatable "
        "(env FL_DATA_ROOTS, separated by ':')",
    )
    p.add_argument("--max-running-jobs", type=int, default=1, help="jobs that run at the same time")
    p.add_argument(
        "--rpc-workers",
        type=int,
        default=_env("FL_RPC_WORKERS"),
        help="threads serving RPCs (default 256; env FL_RPC_WORKERS). A site's waiting poll holds one, up to all "
        "but an eighth (8 to 64) kept for heartbeats, uploads and admin calls; past that, sites poll with a "
        "back-off. Give about the number of sites plus 64 for every site's directive to arrive at once",
    )
    p.add_argument(
        "--max-log-bytes",
        type=int,
        help="bytes of log a site may forward per job (default 32 MiB); later lines are dropped and counted",
    )
    _add_metrics(p, "the --host")
    _add_logging(p)

    p = sub.add_parser("site", help="run a site daemon")
    p.add_argument("--name", default=_env("FL_SITE_NAME"), help="site name (env FL_SITE_NAME)")
    p.add_argument("--workspace", default=_env("FL_WORKSPACE"), help="site workspace (env FL_WORKSPACE)")
    p.add_argument(
        "--exchange-dir",
        default=_env("FL_EXCHANGE_DIR"),
        help="where models pass to and from training scripts (default: the workspace; /dev/shm is faster)",
    )
    p.add_argument(
        "--no-custom-code",
        action="store_true",
        default=_env("FL_NO_CUSTOM_CODE") == "1",
        help="refuse jobs that carry custom code",
    )
    p.add_argument(
        "--launcher",
        choices=("process", "kubernetes"),
        default=_env("FL_LAUNCHER") or "process",
        help="where job scripts run: a local process, or a Kubernetes pod per run (env FL_LAUNCHER)",
    )
    p.add_argument(
        "--launcher-config",
        default=_env("FL_LAUNCHER_CONFIG"),
        help="JSON file describing the job pods (--launcher kubernetes; docs/operations.md)",
    )
    p.add_argument(
        "--nproc-per-node",
        type=_rank_count,
        default=_env("FL_NPROC_PER_NODE", "1"),
        metavar="N",
        help="run each job's script as N ranks of torch.distributed.run (one per GPU) unless the job's command "
        "names its own launcher (env FL_NPROC_PER_NODE; default 1)",
    )
    _add_metrics(p, "127.0.0.1")
    _add_connection(p)
    _add_logging(p)

    p = sub.add_parser("health", help="probe: exit 0 when the server serves / the site is registered")
    _add_connection(p)
    p.add_argument("--site-workspace", help="check a site's status file instead of the server")
    p.add_argument("--max-age", type=float, default=60.0, help="seconds: a site status older than this fails the probe")
    rpc_timeout = p.add_argument(
        "--rpc-timeout", type=float, default=5.0, metavar="SECONDS", help="deadline of the health call (also --timeout)"
    )
    add_alias(p, rpc_timeout, "--timeout")

    from fl.cli import admin

    admin.add_commands(sub, _add_connection)

    p = sub.add_parser("provision", help="make a project CA and certificates for server, sites and admins")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--server-name", default="server", help="the server's certificate name (CN)")
    p.add_argument("--server-dns", action="append", default=[], help="a DNS name of the server (repeatable)")
    p.add_argument("--sites", default="", help="comma-separated site names")
    p.add_argument("--admins", default="", help="comma-separated admin names")
    p.add_argument("--project", default="fl", help="project name (in the CA's subject)")
    p.add_argument("--days", type=int, default=825, help="certificate validity in days")
    p.add_argument("--revoke", default="", help="comma-separated participants whose certificates to revoke")
    p.add_argument(
        "--revoke-cert",
        action="append",
        default=[],
        help="a certificate file to revoke (repeatable; e.g. from a Secret)",
    )
    p.add_argument("--crl-days", type=int, default=365, help="validity of the revocation list (renewed on every run)")
    p.add_argument(
        "--helm-values",
        metavar="DIR",
        default="",
        help="also write, per participant, the charts/fl values file and TLS Secret manifest its cluster needs",
    )
    p.add_argument(
        "--helm-server-address",
        metavar="HOST:PORT",
        default="",
        help="the address sites dial in the --helm-values files (default: the first --server-dns, port 8002)",
    )

    p = sub.add_parser(
        "convert-checkpoint",
        help="convert your own torch checkpoint (.pt) to safetensors, the only format a job may carry",
        description=(
            "Convert a torch checkpoint (a state dict, or {'model': state_dict}) to safetensors. This loads "
            "the file with torch.load(weights_only=True), which unpickles it: run it only on your own "
            "checkpoints, on your own machine. Servers and sites never unpickle a job's files."
        ),
    )
    p.add_argument("source", metavar="IN.pt", help="your torch checkpoint")
    p.add_argument("target", metavar="OUT.safetensors", help="the safetensors file to write")

    sub.add_parser("version", help="print the version")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if args.command == "version":
        print(f"fl {__version__}")
        return EXIT_OK
    from fl.cli import commands

    handler = getattr(commands, f"cmd_{args.command.replace('-', '_')}", None)
    if handler is None:
        from fl.cli import admin

        handler = getattr(admin, f"cmd_{args.command}")
    try:
        return int(handler(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
