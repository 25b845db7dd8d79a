"""Quality signals for candidate layers. Data-free: relative reconstruction error from the spectra."""

from __future__ import annotations

import numpy as np
from torch import nn

from autodac.factorize import get_method

__all__ = ["reconstruction_errors"]


def reconstruction_errors(module: nn.Module, method: str) -> np.ndarray:
    """``errors[r - 1]``: relative squared error ``|W - W_r|^2 / |W|^2`` of ``method`` at rank ``r``.

    Relative errors make layers of very different sizes comparable: each is the fraction of
    the layer's weight energy that truncation discards.
    """
    return get_method(method).errors(module.weight).cpu().numpy()
