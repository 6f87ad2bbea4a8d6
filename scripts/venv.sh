# Sourced by the other scripts: makes sure a virtual environment with fl and its test extra exists.
#   FL_VENV   where it lives (default: .venv in the repository)
# Sets PY to its python and puts its bin/ first on PATH. pip runs only when the stamp in the
# environment differs from this checkout's: on first use, when pyproject.toml (the project's
# metadata) changed, or when the environment holds another checkout's fl. Code changes need no
# reinstall (the install is editable: scripts/install-fl.sh).
set -euo pipefail
_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FL_VENV="${FL_VENV:-$_repo/.venv}"
PY="$FL_VENV/bin/python"
_stamp="$FL_VENV/.fl-installed"
_want="$(sha256sum "$_repo/pyproject.toml" | cut -d' ' -f1) editable-compat $_repo"
if [[ ! -x "$PY" ]]; then
    echo "creating virtual environment $FL_VENV" >&2
    python3 -m venv "$FL_VENV"
fi
if [[ "$(cat "$_stamp" 2>/dev/null)" != "$_want" ]]; then
    echo "installing fl and its test dependencies into $FL_VENV (torch is large: this takes a few minutes once)" >&2
    "$PY" -m pip install --quiet --disable-pip-version-check --upgrade pip
    bash "$_repo/scripts/install-fl.sh" "$PY" "[examples,test,e2e]"
    echo "$_want" > "$_stamp"
fi
export PATH="$FL_VENV/bin:$PATH"
