"""Flower: the overhead scenario (see bench/anchors/README.md).  Run with the anchor venv's python."""

import sys

from runner import main

if __name__ == "__main__":
    sys.exit(main("overhead"))
