"""Child process: build a job's initial model and write its state dict as safetensors.

Run by :class:`fl.components.persistor.PTFileModelPersistor`, so that the server process itself
never imports a job's code. The model class resolves through :func:`fl.config.resolve_class` like
every class a config names: fl's, or the job's own code inside ``--custom-dir`` (none: the server's
policy runs no job code, and only a checkpoint is converted).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _state_dict_from_checkpoint(path: Path) -> dict[str, Any]:
    """A job's checkpoint, safetensors only: a file from a job folder is never unpickled."""
    from fl.components.persistor import checkpoint_refusal
    from fl.tensors import load_torch

    refusal = checkpoint_refusal(str(path))
    if refusal is not None:
        raise ValueError(refusal)
    return load_torch(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fl.components.model_init")
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", help='{"path": "module.Class", "args": {...}}')
    parser.add_argument("--checkpoint")
    parser.add_argument("--custom-dir", help="the job's custom folder, where its model class may come from")
    args = parser.parse_args(argv)
    custom_dir = Path(args.custom_dir) if args.custom_dir else None
    if custom_dir is not None:
        sys.path.append(str(custom_dir))  # after fl and installed modules: for the job's own sibling imports

    from fl.config import instantiate
    from fl.tensors import write_tensors

    state: dict[str, Any]
    if args.checkpoint:
        state = _state_dict_from_checkpoint(Path(args.checkpoint))
        if args.model:
            model = instantiate(json.loads(args.model), custom_dir=custom_dir, recursive=True)
            model.load_state_dict(state)
            state = model.state_dict()
    else:
        model = instantiate(json.loads(args.model), custom_dir=custom_dir, recursive=True)
        if not hasattr(model, "state_dict"):
            raise TypeError(f"{type(model).__name__} has no state_dict(); the persistor needs a torch.nn.Module")
        state = model.state_dict()
    layout = write_tensors(args.out, state)
    print(f"{len(layout.tensors)} tensors, {layout.data_bytes} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
