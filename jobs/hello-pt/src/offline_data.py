"""An offline stand-in for CIFAR10: ten classes of shapes, generated, learnable, never downloaded.

Each image is 3x32x32, normalized like the tutorial's CIFAR10 transform (to [-1, 1]). A class is a
shape (circle, square, triangle, plus, ring, diamond, bar, column, X, frame) drawn in a random
colour, size and position over a random dark background with noise, so a CNN has to learn shape,
not colour; accuracy rises over a few epochs rather than jumping to 100% at once. Each site gets
its own samples (seeded by site name and split), the same ones on every run.
"""

from __future__ import annotations

import hashlib

import torch
from torch.utils.data import TensorDataset

# Difficulty: per-pixel noise, shape size range (pixels) and background brightness. Tuned so that
# the tutorial CNN reaches ~55% after 2 epochs of 2000 samples and keeps improving after that.
NOISE = 0.12
SIZE_RANGE = (5.0, 9.5)
BACKGROUND = 0.4
CLASSES = ("circle", "square", "triangle", "plus", "ring", "diamond", "bar", "column", "x", "frame")
_SPLITS = ("train", "test")


def _seed(site_name: str, split: str) -> int:
    return int.from_bytes(hashlib.sha256(f"fl-offline:{site_name}:{split}".encode()).digest()[:8], "big") % (2**63 - 1)


def _shape(label: int, dx: torch.Tensor, dy: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The mask of class ``label`` for offsets ``dx``, ``dy`` from the centre and size ``s``."""
    adx, ady = dx.abs(), dy.abs()
    if label == 0:  # circle
        return dx * dx + dy * dy <= s * s
    if label == 1:  # square
        return (adx <= s) & (ady <= s)
    if label == 2:  # triangle
        return (dy >= -s) & (dy <= s) & (adx <= (dy + s) / 2)
    if label == 3:  # plus
        return ((adx <= s / 3) & (ady <= s)) | ((ady <= s / 3) & (adx <= s))
    if label == 4:  # ring
        r2 = dx * dx + dy * dy
        return (r2 <= s * s) & (r2 >= (s * 0.55) ** 2)
    if label == 5:  # diamond
        return (adx + ady) <= s
    if label == 6:  # horizontal bar
        return (ady <= s / 3) & (adx <= s)
    if label == 7:  # vertical column
        return (adx <= s / 3) & (ady <= s)
    if label == 8:  # X
        return ((adx - ady).abs() <= s / 4) & (adx <= s)
    # frame
    return (adx <= s) & (ady <= s) & ~((adx <= s * 0.55) & (ady <= s * 0.55))


def make_dataset(site_name: str, split: str, size: int) -> TensorDataset:
    """``size`` normalized images (N, 3, 32, 32) with int64 labels 0-9 for one site and split."""
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    g = torch.Generator().manual_seed(_seed(site_name, split))
    labels = torch.arange(size) % len(CLASSES)
    labels = labels[torch.randperm(size, generator=g)]
    coords = torch.arange(32, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    cx = torch.empty(size, 1, 1).uniform_(9, 23, generator=g)
    cy = torch.empty(size, 1, 1).uniform_(9, 23, generator=g)
    shape_size = torch.empty(size, 1, 1).uniform_(*SIZE_RANGE, generator=g)
    dx, dy = xx - cx, yy - cy  # (N, 32, 32) offsets from each image's shape centre
    mask = torch.zeros(size, 32, 32)
    for label in range(len(CLASSES)):
        idx = (labels == label).nonzero().squeeze(1)
        mask[idx] = _shape(label, dx[idx], dy[idx], shape_size[idx]).float()
    mask = mask.unsqueeze(1)  # (N, 1, 32, 32)
    background = torch.rand(size, 3, 1, 1, generator=g) * BACKGROUND
    colour = 0.45 + torch.rand(size, 3, 1, 1, generator=g) * 0.55
    images = background * (1 - mask) + colour * mask
    images = images + torch.randn(size, 3, 32, 32, generator=g) * NOISE
    images = (images.clamp(0, 1) - 0.5) / 0.5
    return TensorDataset(images, labels.long())
