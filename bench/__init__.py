"""Benchmarks: fl against NVIDIA FLARE and Flower (see bench/anchors/README.md)."""
