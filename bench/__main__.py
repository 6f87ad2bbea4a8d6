"""``python -m bench``: the benchmark against NVIDIA FLARE and Flower (see bench/run.py)."""

import sys

from bench.run import main

sys.exit(main())
