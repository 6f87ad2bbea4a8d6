"""``fl submit | jobs | status | logs | download | abort | sites``: the admin commands."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fl.cli.options import add_alias

EXIT_OK, EXIT_JOB_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_TIMEOUT = 0, 1, 2, 3, 4


def add_commands(sub: Any, add_connection: Callable[[argparse.ArgumentParser], None]) -> None:
    def command(name: str, help: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help)
        add_connection(p)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        return p

    job_id_help = "the job's id (as `fl submit` and `fl jobs` print it)"
    p = command("submit", "submit a job folder")
    p.add_argument("job_dir", help="an exported job folder (FedJob.export_job)")
    p.add_argument("--wait", action="store_true", help="wait for the job to end; exit 0 only if it finished")
    wait_timeout = p.add_argument(
        "--wait-timeout",
        type=float,
        metavar="SECONDS",
        help="with --wait: stop waiting after this many seconds and exit 4; the job goes on "
        "(also --timeout; default: no limit)",
    )
    add_alias(p, wait_timeout, "--timeout")
    command("jobs", "list jobs")
    p = command("status", "show a job")
    p.add_argument("job_id", help=job_id_help)
    p = command("logs", "show a job's logs")
    p.add_argument("job_id", help=job_id_help)
    p.add_argument("--site", default="", help="only this site (or 'server'; default: all)")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    p = command("download", "fetch a job's results (models, metrics, TensorBoard events, logs)")
    p.add_argument("job_id", help=job_id_help)
    p.add_argument("-o", "--out", required=True, help="folder to write the results into")
    p = command("abort", "abort a job")
    p.add_argument("job_id", help=job_id_help)
    command("sites", "list sites and their last heartbeat")


def _client(args: argparse.Namespace) -> Any:
    from fl.admin import AdminClient
    from fl.transport import TLSConfig

    if not args.server:
        raise SystemExit(_fail("give --server HOST:PORT (or FL_SERVER)", EXIT_USAGE))
    if not args.tls and not args.insecure:
        raise SystemExit(_fail("give --tls DIR (an admin's folder from `fl provision`) or --insecure", EXIT_USAGE))
    try:
        tls = TLSConfig.load(args.tls) if args.tls else None
    except FileNotFoundError as exc:
        raise SystemExit(_fail(str(exc), EXIT_USAGE)) from None
    return AdminClient(args.server, tls=tls, server_name=args.server_name)


def _fail(message: str, code: int) -> int:
    print(f"fl: {message}", file=sys.stderr)
    return code


def _run(args: argparse.Namespace, body: Callable[[Any], int]) -> int:
    from fl.admin import AdminError
    from fl.server.jobstore import JobError

    try:
        with _client(args) as client:
            return body(client)
    except AdminError as exc:
        return _fail(str(exc), EXIT_UNREACHABLE if exc.unreachable else EXIT_USAGE)
    except JobError as exc:
        return _fail(f"job refused: {exc}", EXIT_USAGE)


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _print_job(info: dict[str, Any]) -> None:
    print(f"job      {info['job_id']}")
    print(f"name     {info['name']}")
    print(f"status   {info['status']}" + (f": {info['message']}" if info["message"] else ""))
    rnd = min(info["round"] + 1, info["num_rounds"]) if info["num_rounds"] else info["round"]
    print(f"round    {rnd}/{info['num_rounds']}")
    print(f"sites    {', '.join(info['sites']) or '-'}")
    print(
        f"times    submitted {_when(info['submitted'])}, started {_when(info['started'])}, ended {_when(info['ended'])}"
    )


def _exit_for(status: str) -> int:
    return EXIT_OK if status == "finished" else EXIT_JOB_FAILED


def cmd_submit(args: argparse.Namespace) -> int:
    from fl.admin import job_info_dict

    def body(client: Any) -> int:
        info = client.submit(Path(args.job_dir))
        if not args.json:
            print(f"submitted job {info.job_id} ({info.name})", flush=True)
        if not args.wait:
            if args.json:
                print(json.dumps(job_info_dict(info)))
            return EXIT_OK
        final = client.wait(info.job_id, args.wait_timeout)
        data = job_info_dict(final)
        if args.json:
            print(json.dumps(data))
        else:
            _print_job(data)
        if final.status not in ("finished", "failed", "aborted"):
            return _fail(f"job {info.job_id} still {final.status} after {args.wait_timeout:.0f} s", EXIT_TIMEOUT)
        return _exit_for(final.status)

    return _run(args, body)


def cmd_jobs(args: argparse.Namespace) -> int:
    from fl.admin import job_info_dict

    def body(client: Any) -> int:
        jobs = [job_info_dict(j) for j in client.jobs()]
        if args.json:
            print(json.dumps(jobs))
            return EXIT_OK
        print(f"{'JOB':<38} {'NAME':<20} {'STATUS':<10} {'ROUND':<7} SUBMITTED")
        for j in jobs:
            rnd = f"{min(j['round'] + 1, j['num_rounds'])}/{j['num_rounds']}" if j["num_rounds"] else "-"
            print(f"{j['job_id']:<38} {j['name']:<20} {j['status']:<10} {rnd:<7} {_when(j['submitted'])}")
        return EXIT_OK

    return _run(args, body)


def cmd_status(args: argparse.Namespace) -> int:
    from fl.admin import job_info_dict

    def body(client: Any) -> int:
        data = job_info_dict(client.job(args.job_id))
        if args.json:
            print(json.dumps(data))
        else:
            _print_job(data)
        return EXIT_OK

    return _run(args, body)


def cmd_logs(args: argparse.Namespace) -> int:
    def body(client: Any) -> int:
        for line in client.logs(args.job_id, args.site, args.follow):
            if args.json:
                print(json.dumps({"site": line.site, "line": line.line}), flush=True)
            else:
                print(f"{line.site:<12} {line.line}", flush=True)
        return EXIT_OK

    return _run(args, body)


def cmd_download(args: argparse.Namespace) -> int:
    def body(client: Any) -> int:
        files = client.download(args.job_id, Path(args.out))
        if args.json:
            print(json.dumps({"out": args.out, "files": files}))
        else:
            for name in files:
                print(Path(args.out) / name)
        return EXIT_OK

    return _run(args, body)


def cmd_abort(args: argparse.Namespace) -> int:
    from fl.admin import job_info_dict

    def body(client: Any) -> int:
        data = job_info_dict(client.abort(args.job_id))
        print(json.dumps(data) if args.json else f"job {data['job_id']}: {data['status']}")
        return EXIT_OK

    return _run(args, body)


def cmd_sites(args: argparse.Namespace) -> int:
    def body(client: Any) -> int:
        sites = client.sites()
        if args.json:
            print(
                json.dumps(
                    [
                        {
                            "name": s.name,
                            "connected": s.connected,
                            "last_seen": s.last_seen,
                            "running_jobs": list(s.running_jobs),
                        }
                        for s in sites
                    ]
                )
            )
            return EXIT_OK
        print(f"{'SITE':<24} {'CONNECTED':<10} {'LAST HEARTBEAT':<20} JOBS")
        for s in sites:
            jobs = ", ".join(s.running_jobs) or "-"
            print(f"{s.name:<24} {'yes' if s.connected else 'no':<10} {_when(s.last_seen):<20} {jobs}")
        return EXIT_OK

    return _run(args, body)
