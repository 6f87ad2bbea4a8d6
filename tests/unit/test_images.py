"""Static checks of the container images' Dockerfiles (images/server, images/site), without building.

hadolint must find nothing; the files must keep the shape the chart and the e2e suite rely on: an
ARG-selected base pinned by tag (the site's CUDA "-base-" image matching torch's default wheels),
build stages ordered so that a code change rebuilds only the last small layer (dependencies first,
then fl with --no-deps, pip's downloads in a cache mount), a final stage that copies only the venv and
fl, OCI labels, a fixed non-root uid, commented ENVs, a build-time smoke test, and `tini -- fl` as the
entrypoint (the chart passes only arguments).

hadolint comes from `bash tools/install-tools.sh` (the cache folder it prints) or PATH.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest

from tests.tools import find_tool

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "images"
DOCKERFILES = sorted(IMAGES.glob("*/Dockerfile"))
IMAGE_NAMES = [p.parent.name for p in DOCKERFILES]
UID_GID = "10001:10001"
VENV = "/opt/fl/venv"
APP = "/opt/fl/app"
STAGES = ["runtime", "requirements", "deps", "builder"]
PIP_CACHE_MOUNT = "--mount=type=cache,target=/root/.cache/pip"
TORCH_DEFAULT = "torch==2.14.1"
CUDA_OF_TORCH_DEFAULT = "13.0"  # torch 2.14.1's default PyPI wheels: torch.version.cuda == "13.0"


@dataclass
class Instruction:
    keyword: str
    args: str
    comments: list[str]
    stage: int


@dataclass
class Dockerfile:
    global_args: dict[str, str] = field(default_factory=dict)
    stages: list[tuple[str, str]] = field(default_factory=list)  # (base, name)
    instructions: list[Instruction] = field(default_factory=list)

    def final(self) -> list[Instruction]:
        last = len(self.stages) - 1
        return [i for i in self.instructions if i.stage == last]

    def stage(self, name: str) -> list[Instruction]:
        index = [s[1] for s in self.stages].index(name)
        return [i for i in self.instructions if i.stage == index]


def parse(path: Path) -> Dockerfile:
    """Instructions with continuation lines joined and the comment lines right above each."""
    out = Dockerfile()
    comments: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            comments = [*comments, line.lstrip("# ")] if line else []
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        pending = f"{pending} {line[:-1].strip()}" if line.endswith("\\") else f"{pending} {line}"
        if line.endswith("\\"):
            continue
        keyword, _, args = pending.strip().partition(" ")
        keyword = keyword.upper()
        pending = ""
        if keyword == "FROM":
            base, _, name = args.partition(" AS ")
            out.stages.append((base.strip(), name.strip()))
        elif keyword == "ARG" and not out.stages:
            name, _, default = args.partition("=")
            out.global_args[name] = default
        out.instructions.append(Instruction(keyword, args.strip(), comments, len(out.stages) - 1))
        comments = []
    return out


@pytest.fixture(params=DOCKERFILES, ids=IMAGE_NAMES)
def dockerfile(request: pytest.FixtureRequest) -> Path:
    return request.param  # type: ignore[no-any-return]


def test_both_images_exist() -> None:
    assert IMAGE_NAMES == ["server", "site"]


def test_hadolint_finds_nothing(dockerfile: Path) -> None:
    hadolint = find_tool("hadolint")
    proc = subprocess.run(
        [hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_base_image_is_an_arg_pinned_by_tag(dockerfile: Path) -> None:
    df = parse(dockerfile)
    base = df.global_args.get("BASE_IMAGE", "")
    assert re.fullmatch(r"[\w./-]+:[\w.-]+(@sha256:[0-9a-f]{64})?", base), f"BASE_IMAGE={base!r} is not pinned"
    assert not base.endswith(":latest")
    assert df.stages[0][0] == "${BASE_IMAGE}"


def test_site_base_is_the_cuda_base_image_that_matches_torch_default_wheels() -> None:
    """torch's wheels bring the CUDA libraries: the "-base-" image, not the gigabytes of "-runtime-"."""
    base = parse(IMAGES / "site" / "Dockerfile").global_args["BASE_IMAGE"]
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-base-[a-z]+[\d.]+", base)
    assert match, base
    assert f"{match.group(1)}.{match.group(2)}" == CUDA_OF_TORCH_DEFAULT


def test_cuda_of_torch_default_agrees_with_the_installed_torch_when_it_is_that_release() -> None:
    """Cross-check CUDA_OF_TORCH_DEFAULT with the torch wheel in this venv, when it is 2.14.1."""
    try:
        version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        pytest.skip("torch is not installed here")
    if version != TORCH_DEFAULT.split("==")[1]:
        pytest.skip(f"torch {version} here, not {TORCH_DEFAULT}")
    runtime = [r for r in metadata.requires("torch") or [] if r.startswith(("cuda-toolkit", "nvidia-cuda-runtime"))]
    if not runtime:
        pytest.skip("this torch wheel does not name its CUDA runtime (a CPU build?)")
    found = re.search(r"==\s*(\d+\.\d+)", runtime[0])
    assert found and found.group(1) == CUDA_OF_TORCH_DEFAULT, runtime


def test_torch_and_variant_are_build_arguments(dockerfile: Path) -> None:
    df = parse(dockerfile)
    builder = {i.args.partition("=")[0]: i.args.partition("=")[2] for i in df.stage("deps") if i.keyword == "ARG"}
    assert builder["TORCH_SPEC"] == TORCH_DEFAULT
    assert builder["TORCHVISION_SPEC"] == "torchvision==0.29.1"
    assert builder["TORCH_INDEX_URL"] == ""
    assert builder["VARIANT"] == {"server": "cpu", "site": "cuda"}[dockerfile.parent.name]


def test_final_stage_copies_only_the_venv_and_fl_from_the_build_stages(dockerfile: Path) -> None:
    df = parse(dockerfile)
    names = [name for _, name in df.stages]
    assert names == [*STAGES, dockerfile.parent.name]
    bases = dict((name, base) for base, name in df.stages)
    assert bases == {"runtime": "${BASE_IMAGE}", "requirements": "runtime", "deps": "runtime", "builder": "deps",
                     dockerfile.parent.name: "runtime"}  # fmt: skip
    final = df.final()
    from_stages = [i.args for i in final if i.keyword == "COPY" and "--from" in i.args]
    # The dependencies' layer first (it changes only with them), then fl's small one.
    assert from_stages == [f"--from=deps {VENV} {VENV}", f"--from=builder {APP} {APP}"]
    for i in final:
        assert not re.search(r"\b(apt-get|apt|pip|pip3)\s+install\b", i.args), f"installs in the final stage: {i.args}"
    text = dockerfile.read_text()
    for tool in ("build-essential", "gcc", "g++", "python3-dev", "git "):
        assert tool not in text, f"{tool} in {dockerfile}"


def test_final_stage_runs_as_the_fixed_non_root_user(dockerfile: Path) -> None:
    df = parse(dockerfile)
    users = [i.args for i in df.final() if i.keyword == "USER"]
    assert users == [UID_GID]
    runtime = " ".join(i.args for i in df.stage("runtime") if i.keyword == "RUN")
    assert "groupadd --gid 10001" in runtime and "useradd --uid 10001 --gid 10001" in runtime


def test_every_env_is_commented_and_python_is_unbuffered(dockerfile: Path) -> None:
    df = parse(dockerfile)
    envs = [i for i in df.instructions if i.keyword == "ENV"]
    assert envs, "no ENV at all"
    for i in envs:
        assert any(c for c in i.comments), f"ENV {i.args} has no comment saying why"
    final_env = " ".join(i.args for i in df.final() if i.keyword == "ENV")
    assert "PYTHONUNBUFFERED=1" in final_env


def test_build_runs_a_smoke_test_as_the_runtime_user(dockerfile: Path) -> None:
    df = parse(dockerfile)
    final = df.final()
    user_at = next(n for n, i in enumerate(final) if i.keyword == "USER")
    smoke = [i.args for i in final[user_at:] if i.keyword == "RUN"]
    assert smoke, "no RUN after USER in the final stage"
    assert "import fl" in smoke[0] and "fl --version" in smoke[0]


def test_entrypoint_is_fl_under_tini(dockerfile: Path) -> None:
    df = parse(dockerfile)
    (entrypoint,) = [i.args for i in df.final() if i.keyword == "ENTRYPOINT"]
    assert entrypoint == '["tini", "--", "fl"]'


def test_server_image_ships_the_jobs_the_chart_submits() -> None:
    df = parse(IMAGES / "server" / "Dockerfile")
    assert "jobs /opt/fl/jobs" in [i.args for i in df.final() if i.keyword == "COPY"]
    assert (REPO / "jobs" / "hello-pt").is_dir()
    assert "EXPOSE" in {i.keyword for i in df.final()}


def test_copied_sources_exist_in_the_build_context(dockerfile: Path) -> None:
    for i in parse(dockerfile).instructions:
        if i.keyword == "COPY" and "--from" not in i.args:
            *sources, _dest = i.args.split()
            for source in sources:
                assert (REPO / source).exists(), f"{dockerfile}: COPY {source}: not in the repository"


def test_install_venv_script_is_valid_posix_sh() -> None:
    script = IMAGES / "scripts" / "install-venv.sh"
    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("no sh on PATH")
    proc = subprocess.run([sh, "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    shellcheck = shutil.which("shellcheck")
    if shellcheck:
        proc = subprocess.run([shellcheck, "-s", "sh", str(script)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout


def test_a_code_change_rebuilds_only_the_last_small_layer(dockerfile: Path) -> None:
    """The dependency stages never see fl/ (or README.md, or the rest of pyproject.toml): editing the
    code keeps the torch layer cached on the build machine and on every node that pulled it."""
    df = parse(dockerfile)
    copies = {stage: [i.args for i in df.stage(stage) if i.keyword == "COPY"] for stage in STAGES[1:]}
    assert copies["requirements"] == [
        "images/scripts/install-venv.sh /usr/local/bin/install-venv",
        "pyproject.toml /src/pyproject.toml",
    ]
    assert copies["deps"] == [
        "images/scripts/install-venv.sh /usr/local/bin/install-venv",
        "--from=requirements /requirements.txt /src/requirements.txt",
    ]
    assert copies["builder"] == ["pyproject.toml README.md /src/", "fl /src/fl"]
    runs = {stage: " ".join(i.args for i in df.stage(stage) if i.keyword == "RUN") for stage in STAGES[1:]}
    assert "install-venv requirements /src/pyproject.toml /requirements.txt" in runs["requirements"]
    assert f"install-venv deps {VENV} /src/requirements.txt {APP}" in runs["deps"]
    assert f"install-venv app {VENV} /src {APP}" in runs["builder"]


def test_pip_downloads_go_to_a_build_cache_mount(dockerfile: Path) -> None:
    df = parse(dockerfile)
    for stage in ("deps", "builder"):
        (run,) = [i.args for i in df.stage(stage) if i.keyword == "RUN" and "install-venv" in i.args]
        assert run.startswith(PIP_CACHE_MOUNT), (stage, run)
    assert "--no-cache-dir" not in (IMAGES / "scripts" / "install-venv.sh").read_text()


def test_final_stage_puts_fl_first_on_path(dockerfile: Path) -> None:
    final_env = " ".join(i.args for i in parse(dockerfile).final() if i.keyword == "ENV")
    assert f"PATH={APP}/bin:{VENV}/bin:" in final_env


def test_oci_labels_name_version_revision_and_source(dockerfile: Path) -> None:
    df = parse(dockerfile)
    final = df.final()
    args = {i.args.partition("=")[0]: i.args.partition("=")[2] for i in final if i.keyword == "ARG"}
    labels = " ".join(i.args for i in final if i.keyword == "LABEL")
    for label, arg in (("version", "VERSION"), ("revision", "REVISION"), ("source", "SOURCE")):
        assert f'org.opencontainers.image.{label}="${{{arg}}}"' in labels, label
        assert arg in args, f"ARG {arg} missing from the final stage"
    version = re.search(r'__version__ = "([^"]+)"', (REPO / "fl" / "__init__.py").read_text())
    chart = re.search(r'appVersion: "([^"]+)"', (REPO / "charts" / "fl" / "Chart.yaml").read_text())
    assert version and chart and args["VERSION"] == version.group(1) == chart.group(1)


def test_install_venv_requirements_are_the_runtime_dependencies_without_torch(tmp_path: Path) -> None:
    python3 = shutil.which("python3")
    if python3 is None:
        pytest.skip("no python3 on PATH")
    out = tmp_path / "requirements.txt"
    proc = subprocess.run(
        ["sh", str(IMAGES / "scripts" / "install-venv.sh"), "requirements", str(REPO / "pyproject.toml"), str(out)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if proc.returncode != 0 and "needs Python 3.11" in proc.stderr:
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 0, proc.stderr
    lines = out.read_text().splitlines()
    assert "grpcio>=1.85.1" in lines and "numpy>=1.24" in lines
    assert not [line for line in lines if line.startswith(("torch", "pytest", "ruff"))], lines
