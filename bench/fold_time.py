"""Time FedAvg's streaming fold of float32 updates from files: ``python -m bench.fold_time [MIB]``.

Prints the first fold (a copy), a later fold (the running-mean update) and finalize (the
non-finite check), each the fastest of a few runs, for one update of MIB MiB (default 256).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fl.tensors import Layout, describe, write_tensors
from fl.workflows.aggregation import WeightedAverage

REPEATS = 5


def main(mib: int) -> None:
    numel = mib * 2**20 // 4
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        paths = [Path(tmp) / f"u{i}.safetensors" for i in range(3)]
        for path in paths:
            write_tensors(path, {"w": rng.standard_normal(numel, dtype=np.float32)})
        avg = WeightedAverage(Layout.build([describe("w", np.zeros(numel, np.float32))]))
        avg.prefault()
        first, later, final = [], [], []
        for _ in range(REPEATS):
            avg.reset()
            t0 = time.perf_counter()
            avg.add_file(paths[0], 3.0)
            t1 = time.perf_counter()
            avg.add_file(paths[1], 5.0)
            avg.add_file(paths[2], 7.0)
            t2 = time.perf_counter()
            avg.finalize()
            t3 = time.perf_counter()
            first.append(t1 - t0)
            later.append((t2 - t1) / 2)
            final.append(t3 - t2)
    print(
        f"{mib} MiB float32: first fold {min(first):.3f} s, later fold {min(later):.3f} s, "
        f"finalize {min(final):.3f} s (fastest of {REPEATS})"
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 256)
