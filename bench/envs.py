"""Per-anchor virtual environments for the benchmark.

Each anchor framework (NVIDIA FLARE, Flower) runs in its own venv, cached in
``${FL_CACHE_DIR:-$HOME/.cache/fl}/bench-venvs/<name>-<version>/``.  A venv is built in a
temporary folder beside its final place and renamed into place only once everything is
installed and recorded, so a half-built venv is never taken for a complete one.

The venv holds the anchor, torch==2.14.1, torchvision==0.29.1 and psutil.  pip is used with
this machine's configuration untouched.  ``bench-env.json`` inside the venv records the exact
versions installed; its presence marks the venv complete.

If installing an anchor fails, :func:`ensure_env` returns an :class:`AnchorEnv` whose ``error``
says why (and the pip log's tail), so the benchmark can record that and go on.

Command line::

    python -m bench.envs [nvflare|flower ...] [--rebuild] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

TORCH_VERSION = "2.14.1"
TORCHVISION_VERSION = "0.29.1"

# name -> (pip distribution, pinned version, pip extras, extra requirements)
# The versions are the newest of the series the project compares against (nvflare 2.9.x,
# flwr 1.42.x).  Override with FL_BENCH_NVFLARE_VERSION / FL_BENCH_FLOWER_VERSION.
ANCHORS: dict[str, dict[str, object]] = {
    "nvflare": {
        "dist": "nvflare",
        "version": "2.9.0",
        "extras": "",
        "requires": [],
        "import": "nvflare",
    },
    "flower": {
        "dist": "flwr",
        "version": "1.42.0",
        # flwr's simulation engine (run_simulation / `flwr run` with a local simulation
        # federation) needs the Ray backend from the "simulation" extra.
        "extras": "[simulation]",
        "requires": [],
        "import": "flwr",
    },
}

MARKER = "bench-env.json"
# Distributions whose versions are recorded in the marker.
RECORDED = ["nvflare", "flwr", "ray", "torch", "torchvision", "numpy", "psutil", "grpcio", "protobuf"]


@dataclasses.dataclass
class AnchorEnv:
    name: str
    version: str
    path: Path
    ok: bool
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    error: str | None = None
    built_now: bool = False
    build_seconds: float | None = None

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    def as_dict(self) -> dict[str, object]:
        d = dataclasses.asdict(self)
        d["path"] = str(self.path)
        d["python"] = str(self.python)
        return d


def cache_root() -> Path:
    base = os.environ.get("FL_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fl")
    return Path(base) / "bench-venvs"


def anchor_version(name: str) -> str:
    spec = ANCHORS[name]
    return os.environ.get(f"FL_BENCH_{name.upper()}_VERSION") or str(spec["version"])


def env_path(name: str, version: str | None = None) -> Path:
    return cache_root() / f"{name}-{version or anchor_version(name)}"


def _read_marker(path: Path) -> dict[str, object] | None:
    try:
        data = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not data.get("complete"):
        return None
    if not (path / "bin" / "python").exists():
        return None
    return data


def _fix_scripts(tmp: Path, final: Path) -> None:
    """Point the console scripts' shebangs (and activate scripts) at the final location."""
    old, new = str(tmp).encode(), str(final).encode()
    for f in (tmp / "bin").iterdir():
        if f.is_symlink() or not f.is_file():
            continue
        try:
            data = f.read_bytes()
        except OSError:
            continue
        if old in data[:4096] or (f.name.startswith("activate") and old in data):
            mode = f.stat().st_mode
            f.write_bytes(data.replace(old, new))
            os.chmod(f, mode)
    cfg = tmp / "pyvenv.cfg"
    if cfg.exists():
        cfg.write_bytes(cfg.read_bytes().replace(old, new))


def _tail(path: Path, n: int = 3000) -> str:
    try:
        data = path.read_text(errors="replace")
    except OSError:
        return ""
    return data[-n:]


def _query_versions(python: Path) -> dict[str, str]:
    code = (
        "import json, importlib.metadata as m\n"
        f"names = {RECORDED!r}\n"
        "out = {}\n"
        "for n in names:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: pass\n"
        "import sys; out['python'] = sys.version.split()[0]\n"
        "print(json.dumps(out))\n"
    )
    r = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"could not read versions: {r.stderr[-2000:]}")
    return dict(json.loads(r.stdout.strip().splitlines()[-1]))


def ensure_env(name: str, *, rebuild: bool = False, log=None, timeout: float = 3600) -> AnchorEnv:
    """Return the anchor's venv, building it if it is missing or incomplete."""
    if name not in ANCHORS:
        raise KeyError(f"unknown anchor {name!r}; known: {sorted(ANCHORS)}")
    spec = ANCHORS[name]
    version = anchor_version(name)
    final = env_path(name, version)
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))

    if not rebuild:
        marker = _read_marker(final)
        if marker is not None:
            return AnchorEnv(name, version, final, True, dict(marker.get("versions", {})))

    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{name}-{version}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    failed_log = root / f"{name}-{version}.failed.log"
    pip_log = root / f"{tmp.name}.log"
    t0 = time.monotonic()
    say(f"[bench.envs] building {name} {version} venv in {tmp} (log: {pip_log})")
    try:
        with open(pip_log, "w") as logf:
            subprocess.run([sys.executable, "-m", "venv", str(tmp)], check=True, stdout=logf, stderr=logf, timeout=600)
            py = tmp / "bin" / "python"
            reqs = [
                f"{spec['dist']}{spec['extras']}=={version}",
                f"torch=={TORCH_VERSION}",
                f"torchvision=={TORCHVISION_VERSION}",
                "psutil",
                *[str(r) for r in spec["requires"]],  # type: ignore[attr-defined]
            ]
            logf.write(f"$ pip install {' '.join(reqs)}\n")
            logf.flush()
            r = subprocess.run(
                [str(py), "-m", "pip", "install", "--no-input", *reqs],
                stdout=logf,
                stderr=subprocess.STDOUT,
                timeout=timeout,
            )
            if r.returncode != 0:
                raise RuntimeError(f"pip install exited {r.returncode}")
            # Import check: the anchor must at least import next to this torch.
            r = subprocess.run(
                [str(py), "-c", f"import {spec['import']}, torch, torchvision, psutil"],
                stdout=logf,
                stderr=subprocess.STDOUT,
                timeout=600,
            )
            if r.returncode != 0:
                raise RuntimeError(f"importing {spec['import']} failed (exit {r.returncode})")
        versions = _query_versions(py)
        _fix_scripts(tmp, final)
        marker = {
            "complete": True,
            "name": name,
            "anchor_version": version,
            "requirements": reqs,
            "versions": versions,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "build_seconds": round(time.monotonic() - t0, 1),
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if final.exists():
            # Stale or incomplete: move it aside first so the rename below is atomic.
            trash = root / f".trash-{name}-{version}-{os.getpid()}"
            final.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        tmp.rename(final)
        shutil.move(str(pip_log), str(final / "pip-install.log"))
        failed_log.unlink(missing_ok=True)
        say(f"[bench.envs] {name} ready at {final}: {versions}")
        return AnchorEnv(name, version, final, True, versions, built_now=True, build_seconds=marker["build_seconds"])  # type: ignore[arg-type]
    except (subprocess.SubprocessError, OSError, RuntimeError) as e:
        tail = _tail(pip_log)
        with contextlib.suppress(OSError):
            shutil.move(str(pip_log), str(failed_log))
        shutil.rmtree(tmp, ignore_errors=True)
        err = f"installing {spec['dist']}=={version} failed: {e}\n--- log tail ({failed_log}) ---\n{tail}"
        say(f"[bench.envs] {err}")
        return AnchorEnv(name, version, final, False, error=err, build_seconds=round(time.monotonic() - t0, 1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("anchors", nargs="*", default=list(ANCHORS), help="anchors to build (default: all)")
    ap.add_argument("--rebuild", action="store_true", help="rebuild even when a complete venv exists")
    ap.add_argument("--json", action="store_true", help="print one JSON object with the results")
    args = ap.parse_args(argv)
    results = {n: ensure_env(n, rebuild=args.rebuild) for n in args.anchors}
    if args.json:
        print(json.dumps({n: e.as_dict() for n, e in results.items()}))
    else:
        for n, e in results.items():
            status = "ok" if e.ok else "FAILED"
            print(f"{n:8s} {e.version:8s} {status:6s} {e.path}  {json.dumps(e.versions)}")
    return 0 if all(e.ok for e in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
