"""Anchor frameworks (NVIDIA FLARE, Flower) doing the benchmark's scenarios; see README.md.

These modules run inside the anchors' own venvs (bench/envs.py), so they must import nothing
from ``fl`` and nothing beyond the standard library, psutil and torch/torchvision.
"""
