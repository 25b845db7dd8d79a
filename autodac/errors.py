"""One exception tree for everything autodac refuses."""

from __future__ import annotations

__all__ = ["AutodacError", "BudgetError", "PlanError", "ModelError"]


class AutodacError(ValueError):
    """Base class: a rule was broken; the message names the rule and the value."""


class BudgetError(AutodacError):
    """The budget is malformed or cannot be reached on this model (the message names the minimum)."""


class PlanError(AutodacError):
    """A plan does not fit the model it is applied to, or its JSON is not a plan."""


class ModelError(AutodacError):
    """The model cannot be run on the example inputs or has nothing to decompose."""
