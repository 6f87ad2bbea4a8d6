"""fl training script (Client API) for the benchmark: the same loop as FLARE's client.

The loop is bench/anchors/client_loop.py; only the Client API module differs.
"""

import fl.client as flare
from bench.anchors.client_loop import run

if __name__ == "__main__":
    run(flare)
