"""Task data and task result filters (FLARE's ``task_data_filters`` / ``task_result_filters``)."""

from fl.filters.base import Filter, FilterChain, FilterContext, FilterError, replace_file
from fl.filters.builtin import ExcludeVars, PercentilePrivacy

__all__ = [
    "ExcludeVars",
    "Filter",
    "FilterChain",
    "FilterContext",
    "FilterError",
    "PercentilePrivacy",
    "replace_file",
]
