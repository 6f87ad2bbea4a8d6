"""FLARE's client-side names: each client-side entry of NVFLARE_ALIASES names a real fl object."""

from __future__ import annotations

import importlib

import pytest

from fl.aliases import NVFLARE_ALIASES
from fl.client.constants import DataKind, ExchangeFormat, NPConstants, TransferType
from fl.client.model import ParamsType

CLIENT_SIDE = (
    "fl.client.",
    "fl.components.np_persistor.",
    "fl.components.mlflow_receiver.",
    "fl.components.wandb_receiver.",
)


@pytest.mark.parametrize("flare_path", sorted(k for k, v in NVFLARE_ALIASES.items() if v.startswith(CLIENT_SIDE)))
def test_every_client_alias_names_an_fl_object(flare_path):
    if flare_path.startswith("nvflare.client.lightning"):
        pytest.importorskip("pytorch_lightning")
    target = NVFLARE_ALIASES[flare_path]
    module, name = target.rsplit(".", 1)
    obj = getattr(importlib.import_module(module), name)
    assert obj.__name__ == flare_path.rsplit(".", 1)[1] or flare_path.endswith("MetaKey")


def test_flare_values_that_scripts_compare_against():
    assert NPConstants.NUMPY_KEY == "numpy_key"
    assert TransferType.DIFF == "DIFF" and TransferType.FULL.value == ParamsType.FULL.value
    assert ExchangeFormat.NUMPY == "numpy" and ExchangeFormat.PYTORCH == "pytorch"
    assert DataKind.WEIGHT_DIFF == "WEIGHT_DIFF"
