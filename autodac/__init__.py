"""autodac: make trained CNNs cheaper without retraining, by per-layer factorisations chosen under a budget."""

from autodac._logging import set_verbosity
from autodac.api import Result, apply, decompose_conv, optimize
from autodac.budgets import Flops, Latency, Params
from autodac.deploy import export, plain_torch
from autodac.errors import AutodacError, BudgetError, ModelError, PlanError
from autodac.layers import FactorizedLayer
from autodac.options import DistillOptions, FitOptions, ProbeOptions, SearchOptions, StudyOptions
from autodac.plan import LayerChoice, Plan
from autodac.report import compare
from autodac.synthesis import synthesize_inputs

__version__ = "0.1.0"

__all__ = [
    "optimize", "Flops", "Latency", "Params", "FitOptions", "ProbeOptions", "SearchOptions", "StudyOptions", "DistillOptions",
    "apply", "export", "plain_torch", "decompose_conv", "compare", "synthesize_inputs", "Result", "Plan", "LayerChoice", "FactorizedLayer",
    "AutodacError", "BudgetError", "ModelError", "PlanError", "set_verbosity", "__version__",
]
