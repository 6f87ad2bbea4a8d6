"""NVIDIA FLARE training script (Client API), as in FLARE's examples/hello-world/hello-pt/client.py.

The loop is bench/anchors/client_loop.py, the same for fl, whose Client API is FLARE's.
"""

import nvflare.client as flare

from bench.anchors.client_loop import run

if __name__ == "__main__":
    run(flare)
