"""PyTorch pieces shared by the anchors' scenarios: models, data, the training loop, evaluation.

The same functions run under every framework, so that the frameworks differ only in how
they move models around.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[2]
OFFLINE_DATA = REPO_ROOT / "jobs" / "hello-pt" / "src" / "offline_data.py"
MiB = 1024**2
# offline_data.make_dataset's splits are "train" and "test"; "test" is each site's validation set.
VAL_SPLIT = "test"


class SimpleNetwork(nn.Module):
    """The CIFAR-10 tutorial CNN of hello-pt (and of Flower's quickstart-pytorch)."""

    def __init__(self, seed: int | None = 0) -> None:
        super().__init__()
        # A fixed seed gives every framework the same initial global model.
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            self.conv1 = nn.Conv2d(3, 6, 5)
            self.pool = nn.MaxPool2d(2, 2)
            self.conv2 = nn.Conv2d(6, 16, 5)
            self.fc1 = nn.Linear(16 * 5 * 5, 120)
            self.fc2 = nn.Linear(120, 84)
            self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class BigModel(nn.Module):
    """A model whose state dict is one float32 tensor of ``mib`` MiB, all zeros."""

    def __init__(self, mib: int = 100) -> None:
        super().__init__()
        self.mib = int(mib)  # kept, so that a job config can record how the model was built
        n = int(mib) * MiB // 4
        self.weight = nn.Parameter(torch.zeros(n, dtype=torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # never called
        return x


def big_state_dict(mib: int) -> dict[str, torch.Tensor]:
    return {"weight": torch.zeros(int(mib) * MiB // 4, dtype=torch.float32)}


def plus_one(params: dict[str, Any]) -> dict[str, Any]:
    """The large scenario's site work: every value + 1, no training (torch or numpy values)."""
    out = {}
    for k, v in params.items():
        out[k] = v + 1
    return out


def check_exact(values: Any, expected: float) -> dict[str, Any]:
    """True when every element equals ``expected`` exactly (chunked, so 1 GiB is fine)."""
    t = torch.as_tensor(values).reshape(-1)
    n = t.numel()
    ok = True
    mismatches = 0
    step = 16 * MiB
    for i in range(0, n, step):
        chunk = t[i : i + step]
        bad = int((chunk != expected).sum())
        if bad:
            ok = False
            mismatches += bad
    first = float(t[0]) if n else None
    return {
        "exact": ok,
        "elements": n,
        "mismatches": mismatches,
        "first_value": first,
        "expected_value": expected,
    }


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
_make_dataset: Callable[..., Any] | None = None
DATA_SOURCE = ""


def _standin_make_dataset(site_name: str, split: str, size: int) -> torch.utils.data.TensorDataset:
    """STAND-IN for jobs/hello-pt/src/offline_data.py::make_dataset, used only while that file
    does not exist.  Deterministic CIFAR-shaped data: ten fixed class prototypes plus noise,
    normalized, int64 labels 0-9; a site and split give the same samples on every call.
    """
    g_proto = torch.Generator().manual_seed(20240601)
    protos = torch.randn(10, 3, 32, 32, generator=g_proto)
    seed = _stable_seed(site_name, split)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (size,), generator=g, dtype=torch.int64)
    x = 0.6 * protos[labels] + torch.randn(size, 3, 32, 32, generator=g)
    x = (x - x.mean()) / x.std()
    return torch.utils.data.TensorDataset(x.float(), labels)


def _stable_seed(*parts: str) -> int:
    import zlib

    return zlib.crc32("/".join(parts).encode()) & 0x7FFFFFFF


def get_make_dataset() -> tuple[Callable[..., Any], str]:
    """The project's offline dataset if present, else the stand-in.  Returns (fn, source)."""
    global _make_dataset, DATA_SOURCE
    if _make_dataset is None:
        if OFFLINE_DATA.exists() and os.environ.get("FL_BENCH_STANDIN_DATA") != "1":
            spec = importlib.util.spec_from_file_location("fl_bench_offline_data", OFFLINE_DATA)
            assert spec and spec.loader
            mod = importlib.util.module_from_spec(spec)
            sys.modules["fl_bench_offline_data"] = mod
            spec.loader.exec_module(mod)
            _make_dataset = mod.make_dataset
            DATA_SOURCE = "jobs/hello-pt/src/offline_data.py"
        else:
            _make_dataset = _standin_make_dataset
            DATA_SOURCE = "stand-in (bench/anchors/pt.py; jobs/hello-pt/src/offline_data.py absent)"
    return _make_dataset, DATA_SOURCE


def make_dataset(site_name: str, split: str, size: int) -> torch.utils.data.TensorDataset:
    fn, _ = get_make_dataset()
    return fn(site_name, split, size)


# --------------------------------------------------------------------------------------------
# training and evaluation (hello-pt's loop: CrossEntropy, SGD with momentum)
# --------------------------------------------------------------------------------------------
def train(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    *,
    epochs: int = 1,
    batch_size: int = 4,
    lr: float = 0.001,
    momentum: float = 0.9,
    seed: int = 0,
    on_first_step: Callable[[], None] | None = None,
) -> dict[str, float]:
    """hello-pt's local training.  ``seed`` fixes the shuffling so all frameworks see the same
    batches; ``on_first_step`` is called right before the first optimizer step."""
    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=g)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    model.train()
    steps = 0
    running = 0.0
    for _ in range(epochs):
        for images, labels in loader:
            optimizer.zero_grad()
            loss = criterion(model(images), labels)
            loss.backward()
            if steps == 0 and on_first_step is not None:
                on_first_step()
            optimizer.step()
            running += float(loss.item())
            steps += 1
    return {"train_loss": running / max(steps, 1), "steps": steps, "num_examples": len(dataset)}


@torch.no_grad()
def evaluate(model: nn.Module, dataset: torch.utils.data.Dataset, batch_size: int = 256) -> dict[str, float]:
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    correct = total = 0
    for images, labels in loader:
        pred = model(images).argmax(dim=1)
        correct += int((pred == labels).sum())
        total += int(labels.numel())
    return {"accuracy": correct / max(total, 1), "n": total}


def evaluate_global(state_dict: dict[str, Any], sites: list[str], val_size: int) -> dict[str, Any]:
    """The common final evaluation: the global model on each site's validation split, averaged."""
    model = SimpleNetwork(seed=None)
    model.load_state_dict({k: torch.as_tensor(v) for k, v in state_dict.items()})
    per_site = {}
    for s in sites:
        per_site[s] = evaluate(model, make_dataset(s, VAL_SPLIT, val_size))["accuracy"]
    return {
        "final_accuracy": sum(per_site.values()) / len(per_site),
        "per_site_accuracy": per_site,
        "val_split": VAL_SPLIT,
        "val_size_per_site": val_size,
        "data_source": get_make_dataset()[1],
    }


def state_dict_checksum(sd: dict[str, Any]) -> float:
    return float(sum(float(torch.as_tensor(v).double().sum()) for v in sd.values()))


def check_saved_global(path: Path, scenario: str, args: Any, framework: str) -> dict[str, Any]:
    """The driver's check of a framework's saved ``FL_global_model.pt`` (a state dict, or FLARE's
    ``{"model": state dict, ...}``): exact values for the large scenario, accuracy for train."""
    if not path.exists():
        return {"final_check": None, "final_check_error": f"no {path.name} in {path.parent}"}
    saved = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    sd = saved.get("model", saved) if isinstance(saved, dict) else saved
    if scenario == "large":
        check = check_exact(sd["weight"], float(args.rounds))
        return {"final_check": check, "final_check_by": f"driver, on {framework}'s saved {path.name}"}
    if scenario == "train":
        sites = [f"site-{i}" for i in range(1, args.sites + 1)]
        return evaluate_global(sd, sites, args.val_size)
    return {}
