"""Pure tensor math of each factorisation, one file per method, behind one small interface."""

from __future__ import annotations

from autodac.errors import AutodacError
from autodac.factorize.base import Decomposition, Factorization, Factors, Geometry, output_matching_weight
from autodac.factorize.dac import DAC
from autodac.factorize.lowrank import LowRank
from autodac.factorize.spatial import Spatial
from autodac.factorize.transposed_dac import TransposedDAC

__all__ = [
    "METHODS", "Decomposition", "Factorization", "Factors", "Geometry", "get_method", "DAC", "TransposedDAC", "Spatial", "LowRank",
    "output_matching_weight",
]

METHODS: dict[str, Factorization] = {method.name: method for method in (DAC(), TransposedDAC(), Spatial(), LowRank())}


def get_method(name: str) -> Factorization:
    """The factorisation registered under ``name``; a clear error for an unknown one."""
    try:
        return METHODS[name]
    except KeyError:
        raise AutodacError(f"`method` must be one of {sorted(METHODS)}, but got method={name!r}") from None
