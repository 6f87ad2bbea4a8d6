"""Recipes of FLARE's whose algorithm fl does not have yet: each refuses, naming what is missing."""

from __future__ import annotations

from typing import Any, NoReturn

__all__ = ["FedEvalRecipe"]


def _missing(recipe: str, algorithm: str) -> NoReturn:
    raise NotImplementedError(
        f"{recipe}: fl has no {algorithm} workflow yet, so this recipe cannot be built; "
        "FedAvgRecipe, FedProxRecipe, NumpyFedAvgRecipe, FedOptRecipe, CyclicRecipe and ScaffoldRecipe are available"
    )


class FedEvalRecipe:
    """FLARE's cross-site evaluation recipe."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _missing("FedEvalRecipe", "cross-site evaluation (CrossSiteModelEval)")
