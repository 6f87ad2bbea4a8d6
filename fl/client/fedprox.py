"""FedProx's site side: the proximal term ``mu / 2 * ||w - w_global||^2`` added to a training loss.

The server side of FedProx is FedAvg. Same interface as NVIDIA FLARE's ``PTFedProxLoss``::

    global_model = copy.deepcopy(model)          # the model as received this round
    loss = criterion(model(x), y) + fedprox(model, global_model)
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["PTFedProxLoss"]


class PTFedProxLoss(nn.Module):
    """FedProx's proximal term (Li et al. 2020) over the models' named parameters."""

    def __init__(self, mu: float = 0.01) -> None:
        super().__init__()
        if isinstance(mu, bool) or not isinstance(mu, int | float) or not math.isfinite(mu) or mu < 0:
            raise ValueError(f"FedProx: mu must be a finite number >= 0, got {mu!r}")
        self.mu = float(mu)

    def forward(self, input: nn.Module, target: nn.Module) -> torch.Tensor:
        """``mu / 2 * sum ||p - p_global||^2`` over ``input``'s parameters and ``target``'s of the same name."""
        reference = dict(target.named_parameters())
        terms = []
        for name, param in input.named_parameters():
            ref = reference.get(name)
            if ref is None or ref.shape != param.shape:
                got = "missing" if ref is None else f"shape {tuple(ref.shape)}"
                raise ValueError(f"FedProx: the global model's {name!r} is {got}, the local one {tuple(param.shape)}")
            terms.append(torch.sum((param - ref.detach()) ** 2))
        if not terms:
            return torch.zeros(())
        return (self.mu / 2) * torch.stack(terms).sum()
