"""Models for integration tests."""

import torch
from torch import nn


class FlatModel(nn.Module):
    """One float32 parameter of ``numel`` zeros: a model of any size, cheap to build."""

    def __init__(self, numel: int = 16):
        super().__init__()
        self.numel = numel
        self.weight = nn.Parameter(torch.zeros(numel))


class TwoPartModel(nn.Module):
    """Two float32 parameters of zeros, ``weight`` and ``bias``: for tests that treat tensors differently."""

    def __init__(self, numel: int = 16):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(numel))
        self.bias = nn.Parameter(torch.zeros(4))
