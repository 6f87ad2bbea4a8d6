"""The one place that says how fl starts a Python child process (simulated sites, the model-building
child, a job's training script).

fl's own children run a module of fl. ``python -m MODULE`` puts the working directory first on
``sys.path``, so any folder there named ``fl`` (even an empty one: a namespace package) would be
imported instead of fl. :func:`module_command` keeps the working directory off ``sys.path``
(``-P`` on Python 3.11+, a two-line bootstrap on 3.10). A training script runs as
``python -u script.py``: its own folder comes first, so it imports the job's modules next to it.
"""

from __future__ import annotations

import os
import sys

__all__ = ["module_command", "script_command"]

#: Python 3.11+ has ``-P``: do not prepend the working directory (or the script's folder) to sys.path.
SAFE_PATH_FLAG = sys.version_info >= (3, 11)

# For Python 3.10: ``-c`` puts '' (the working directory) first; drop it, then run the module as -m would.
_BOOTSTRAP = (
    "import runpy, sys\n"
    "if sys.path and sys.path[0] == '': del sys.path[0]\n"
    "module = sys.argv.pop(1)\n"
    "runpy.run_module(module, run_name='__main__', alter_sys=True)\n"
)


def module_command(module: str, *args: str) -> list[str]:
    """argv that runs ``python -m module args`` with this interpreter, the working directory off sys.path."""
    if SAFE_PATH_FLAG:
        return [sys.executable, "-P", "-m", module, *args]
    return [sys.executable, "-c", _BOOTSTRAP, module, *args]


def script_command(script: str | os.PathLike[str], *args: str) -> list[str]:
    """argv that runs a user's script unbuffered with this interpreter (its own folder first on sys.path)."""
    return [sys.executable, "-u", os.fspath(script), *args]
