"""Budgets as values: ``Flops(0.5)``, ``Latency(0.7)``, ``Params(0.4)``, given to ``optimize`` alone or as a list.

Each budget is a small frozen dataclass that checks its own ratio when made, so a bad value is
refused where it was written. ``gather`` turns what ``optimize`` was given (its second
positional argument and the ``flops_budget=`` / ``latency_budget=`` shorthands) into one
``Budgets`` holding at most one budget of each kind.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, ClassVar

from autodac.errors import BudgetError

__all__ = ["Budget", "Flops", "Latency", "Params", "Budgets", "gather", "check_ratio"]


def check_ratio(name: str, value: Any) -> float:
    """``value`` as a float in ``(0, 1]``; a ``BudgetError`` naming the rule and echoing the value otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise BudgetError(f"`{name}` must be a real number with 0 < {name} <= 1, but got {name}={value!r}")
    ratio = float(value)
    if not (math.isfinite(ratio) and 0.0 < ratio <= 1.0):
        shown = int(value) if isinstance(value, numbers.Integral) else ratio  # as typed: 0, not 0.0
        raise BudgetError(f"`0 < {name} <= 1` must hold, but got {name}={shown!r}")
    return ratio


class Budget:
    """What every budget kind has: a ``ratio`` of the original model's figure, and its ``kind``."""

    kind: ClassVar[str]
    ratio: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "ratio", check_ratio(f"{self.kind}_budget", self.ratio))


@dataclass(frozen=True)
class Flops(Budget):
    """At most ``ratio`` of the original's fvcore FLOPs (multiply-adds) at the example inputs' shape."""

    ratio: float
    kind: ClassVar[str] = "flops"


@dataclass(frozen=True)
class Params(Budget):
    """At most ``ratio`` of the original's parameter count (``autodac.cost.count_params``): the model's size."""

    ratio: float
    kind: ClassVar[str] = "params"


@dataclass(frozen=True)
class Latency(Budget):
    """At most ``ratio`` of the original's latency, measured on ``device`` (default: the model's) in ``runtime``.

    ``device`` and ``runtime`` left None take ``optimize``'s ``device=`` / ``runtime=``, else the
    model's device and ``"torch"``; given on both, they must agree.
    """

    ratio: float
    device: Any = None
    runtime: str | None = None
    kind: ClassVar[str] = "latency"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.runtime is not None and not isinstance(self.runtime, str):
            raise BudgetError(f"`Latency.runtime` must be a runtime's name ('torch' or 'onnxruntime'), but got runtime={self.runtime!r}")


KINDS = (Flops, Latency, Params)


@dataclass(frozen=True)
class Budgets:
    """At most one budget of each kind, as ``optimize`` plans under them."""

    flops: Flops | None = None
    latency: Latency | None = None
    params: Params | None = None

    def ratios(self) -> dict[str, float]:
        """``{kind: ratio}`` of the budgets given, as plans record them in ``plan.budget``."""
        return {b.kind: b.ratio for b in (self.flops, self.latency, self.params) if b is not None}


def gather(given: Any = None, *, latency_budget: Any = None, device: Any = None, runtime: str | None = None) -> Budgets:
    """One ``Budgets`` from ``optimize``'s second positional argument and its shorthands.

    ``given`` is None, a ratio (a FLOPs budget, as ``flops_budget=`` always was), a budget value
    or a list of them; ``latency_budget`` with ``device`` and ``runtime`` is the latency
    shorthand. Two budgets of one kind, an empty list and anything else are refused, as is a
    ``Latency`` value whose device or runtime disagrees with ``device=`` / ``runtime=``, and
    ``device=`` / ``runtime=`` with no latency budget to time (they would do nothing).
    """
    if isinstance(given, (list, tuple)):
        if not given:
            raise BudgetError(f"a list of budgets must hold at least one (e.g. [autodac.Flops(0.5), autodac.Params(0.4)]), but got {given!r}")
        values = list(given)
        for value in values:
            if not isinstance(value, Budget):
                raise BudgetError(
                    f"each budget in a list must be autodac.Flops, autodac.Latency or autodac.Params, but got {value!r} in {given!r}"
                )
    elif isinstance(given, Budget):
        values = [given]
    elif given is None:
        values = []
    elif isinstance(given, bool) or not isinstance(given, numbers.Real):
        raise BudgetError(
            f"`flops_budget` must be a real number with 0 < flops_budget <= 1 (or a budget: autodac.Flops, autodac.Latency, "
            f"autodac.Params, or a list of them), but got flops_budget={given!r}"
        )
    else:
        values = [Flops(given)]
    if latency_budget is not None:
        values.append(Latency(check_ratio("latency_budget", latency_budget), device=device, runtime=runtime or "torch"))
    else:  # optimize's device/runtime apply to a Latency value given without them
        values = [_timed_on(v, device, runtime) if isinstance(v, Latency) else v for v in values]
    if (device is not None or runtime is not None) and not any(isinstance(v, Latency) for v in values):
        raise BudgetError(  # they would be ignored: the search itself runs where the model is
            f"`device` and `runtime` say where a latency budget is timed, so they need one (latency_budget= or autodac.Latency), "
            f"but got device={device!r}, runtime={runtime!r} and no latency budget; move the model itself to run the search elsewhere"
        )
    chosen: dict[str, Budget] = {}
    for value in values:
        if value.kind in chosen:
            raise BudgetError(f"at most one budget of each kind must be given, but got two {value.kind} budgets: {chosen[value.kind]!r} and {value!r}")
        chosen[value.kind] = value
    if not chosen:
        raise BudgetError(
            "at least one budget must be given (flops_budget or latency_budget, each a ratio in (0, 1], or budget values "
            "such as autodac.Params(0.4)), but both were None"
        )
    return Budgets(**chosen)


def _timed_on(budget: Latency, device: Any, runtime: str | None) -> Latency:
    """``budget`` with ``optimize``'s ``device=`` / ``runtime=`` filled in (else the runtime ``"torch"``); refused where
    they disagree with its own."""
    if device is not None and budget.device is not None and str(device) != str(budget.device):
        raise BudgetError(f"a latency budget's device must be given once, but got device={device!r} and {budget!r}")
    if runtime is not None and budget.runtime is not None and runtime != budget.runtime:
        raise BudgetError(f"a latency budget's runtime must be given once, but got runtime={runtime!r} and {budget!r}")
    return Latency(budget.ratio, device=budget.device if budget.device is not None else device,
                   runtime=budget.runtime or runtime or "torch")
