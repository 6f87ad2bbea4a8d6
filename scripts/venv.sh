# Sourced by the other scripts: makes sure a virtual environment with fl and its test extra exists.
#   FL_VENV   where it lives (default: .venv in the repository)
# Sets PY to its python. The full install runs only when pyproject.toml changed since the last one;
# the project itself is (re)installed in editable mode every time, which takes seconds.
set -euo pipefail
_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FL_VENV="${FL_VENV:-$_repo/.venv}"
PY="$FL_VENV/bin/python"
_stamp="$FL_VENV/.fl-installed"
_want="$(sha256sum "$_repo/pyproject.toml" | cut -d' ' -f1)"
if [[ ! -x "$PY" ]]; then
    echo "creating virtual environment $FL_VENV" >&2
    python3 -m venv "$FL_VENV"
fi
if [[ "$(cat "$_stamp" 2>/dev/null)" != "$_want" ]]; then
    echo "installing fl and its test dependencies into $FL_VENV (torch is large: this takes a few minutes once)" >&2
    "$PY" -m pip install --quiet --upgrade pip
    "$PY" -m pip install --quiet -e "$_repo[examples,test,e2e]"
    echo "$_want" > "$_stamp"
else
    "$PY" -m pip install --quiet --no-deps -e "$_repo"
fi
export PATH="$FL_VENV/bin:$PATH"
