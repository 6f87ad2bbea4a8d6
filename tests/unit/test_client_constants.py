"""FLARE's client-side names: every FLARE path in CLIENT_ALIASES names a real fl object, with FLARE's values."""

from __future__ import annotations

import importlib

import pytest

from fl.client.constants import CLIENT_ALIASES, DataKind, ExchangeFormat, NPConstants, TransferType
from fl.client.model import ParamsType


@pytest.mark.parametrize("flare_path", sorted(CLIENT_ALIASES))
def test_every_client_alias_names_an_fl_object(flare_path):
    if flare_path.startswith("nvflare.client.lightning"):
        pytest.importorskip("pytorch_lightning")
    target = CLIENT_ALIASES[flare_path]
    module, name = target.rsplit(".", 1)
    obj = getattr(importlib.import_module(module), name)
    assert obj.__name__ == flare_path.rsplit(".", 1)[1] or flare_path.endswith("MetaKey")


def test_flare_values_that_scripts_compare_against():
    assert NPConstants.NUMPY_KEY == "numpy_key"
    assert TransferType.DIFF == "DIFF" and TransferType.FULL.value == ParamsType.FULL.value
    assert ExchangeFormat.NUMPY == "numpy" and ExchangeFormat.PYTORCH == "pytorch"
    assert DataKind.WEIGHT_DIFF == "WEIGHT_DIFF"
