"""NVIDIA FLARE's client-side names that training scripts use, as fl's own objects.

The FLARE paths these answer to are entries of the one alias table (``fl.aliases.NVFLARE_ALIASES``),
which serves ``from fl.app_common.np.constants import NPConstants`` after a user's nvflare→fl
replacement, and the same names in exported configs.
"""

from __future__ import annotations

from enum import Enum

from fl.client.model import FLMetaKey, ParamsType

__all__ = [
    "ConfigKey",
    "DataKind",
    "ExchangeFormat",
    "FLMetaKey",
    "FLModelConst",
    "NPConstants",
    "ParamsType",
    "ReturnCode",
    "TransferType",
]


class NPConstants:
    """The key of the single array in a NumPy model's params (``params[NPConstants.NUMPY_KEY]``)."""

    NUMPY_KEY = "numpy_key"


class TransferType(str, Enum):
    """What a site sends back: the full params or their difference to the params received."""

    FULL = "FULL"
    DIFF = "DIFF"


class ExchangeFormat(str, Enum):
    """How params reach the script: torch tensors (``pytorch``) or numpy arrays (``numpy``)."""

    RAW = "raw"
    PYTORCH = "pytorch"
    NUMPY = "numpy"


class DataKind(str, Enum):
    """FLARE's kinds of exchanged data (``nvflare.apis.dxo.DataKind``); fl sends weights and diffs."""

    FL_MODEL = "FL_MODEL"
    WEIGHTS = "WEIGHTS"
    WEIGHT_DIFF = "WEIGHT_DIFF"
    METRICS = "METRICS"
    ANALYTIC = "ANALYTIC"
    COLLECTION = "COLLECTION"
    STATISTICS = "STATISTICS"
    APP_DEFINED = "APP_DEFINED"


class FLModelConst:
    """The names of FLModel's fields, as FLARE spells them."""

    PARAMS_TYPE = "params_type"
    PARAMS = "params"
    OPTIMIZER_PARAMS = "optimizer_params"
    METRICS = "metrics"
    CURRENT_ROUND = "current_round"
    START_ROUND = "start_round"
    TOTAL_ROUNDS = "total_rounds"
    META = "meta"


class ConfigKey:
    """Keys of the Client API's config (``flare.get_config()``), as FLARE names them."""

    EXCHANGE_FORMAT = "exchange_format"
    SERVER_EXPECTED_FORMAT = "server_expected_format"
    TRANSFER_TYPE = "transfer_type"
    TRAIN_WITH_EVAL = "train_with_eval"
    TRAIN_TASK_NAME = "train_task_name"
    EVAL_TASK_NAME = "eval_task_name"
    SUBMIT_MODEL_TASK_NAME = "submit_model_task_name"


class ReturnCode:
    """FLARE's return codes that scripts compare against (``nvflare.apis.fl_constant.ReturnCode``)."""

    OK = "OK"
    ERROR = "ERROR"
    TIMEOUT = "TIMEOUT"
    EXECUTION_EXCEPTION = "EXECUTION_EXCEPTION"
    TASK_ABORTED = "TASK_ABORTED"
    TASK_UNKNOWN = "TASK_UNKNOWN"
    BAD_TASK_DATA = "BAD_TASK_DATA"


#: FLARE paths (module.name) of the client-side objects and components, and the fl objects they are.
