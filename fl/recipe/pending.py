"""Recipes of FLARE's whose algorithm fl does not have yet: each refuses, naming what is missing."""

from __future__ import annotations

from typing import Any, NoReturn

__all__ = ["CyclicRecipe", "FedEvalRecipe", "FedOptRecipe", "ScaffoldRecipe"]


def _missing(recipe: str, algorithm: str) -> NoReturn:
    raise NotImplementedError(
        f"{recipe}: fl has no {algorithm} workflow yet, so this recipe cannot be built; "
        "FedAvgRecipe, FedProxRecipe and NumpyFedAvgRecipe are available"
    )


class ScaffoldRecipe:
    """FLARE's SCAFFOLD recipe (needs the SCAFFOLD workflow)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _missing("ScaffoldRecipe", "SCAFFOLD (control variates)")


class FedOptRecipe:
    """FLARE's FedOpt recipe (needs a server-optimizer workflow)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _missing("FedOptRecipe", "FedOpt (server optimizer)")


class CyclicRecipe:
    """FLARE's cyclic weight transfer recipe."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _missing("CyclicRecipe", "cyclic weight transfer")


class FedEvalRecipe:
    """FLARE's cross-site evaluation recipe."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _missing("FedEvalRecipe", "cross-site evaluation (CrossSiteModelEval)")
