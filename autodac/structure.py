"""What a plan knows about its model: every Conv1d/Conv2d/Conv3d/Linear layer's name, type and shape.

``optimize`` records it in the plan (``Plan.structure``, with a fingerprint); ``apply`` compares
it with the model it is given and refuses a plan made for another model, naming the first layer
that differs. Read from the modules alone (no forward pass), so a model on any device, or one
``apply`` gets without inputs, is described the same way.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from autodac._logging import get_logger
from autodac.errors import PlanError
from autodac.layers import SUPPORTED_TYPES, FactorizedLayer
from autodac.plan import Plan, structure_fingerprint

__all__ = ["describe_layer", "model_layers", "model_structure", "check_structure"]

logger = get_logger(__name__)


def describe_layer(module: nn.Module) -> str:
    """One line naming the layer's type and every attribute that fixes its shape and cost.

    ``Linear(512->10)``, ``Conv2d(64->128, kernel=(3, 3), stride=(2, 2), padding=(1, 1), bias=False)``: kernel,
    stride and padding always; dilation, groups, padding mode and ``bias=False`` only when not the default.
    """
    kind = type(module).__name__
    bias = "" if getattr(module, "bias", None) is not None else ", bias=False"
    if isinstance(module, nn.Linear):
        return f"{kind}({module.in_features}->{module.out_features}{bias})"
    padding = module.padding if isinstance(module.padding, str) else tuple(module.padding)
    extra = ""
    if any(d != 1 for d in module.dilation):
        extra += f", dilation={tuple(module.dilation)}"
    if module.groups != 1:
        extra += f", groups={module.groups}"
    if module.padding_mode != "zeros":
        extra += f", padding_mode={module.padding_mode!r}"
    return (
        f"{kind}({module.in_channels}->{module.out_channels}, kernel={tuple(module.kernel_size)}, stride={tuple(module.stride)}, "
        f"padding={padding!r}{extra}{bias})"
    )


def model_layers(model: nn.Module) -> dict[str, str]:
    """``{dotted name: description}`` of every Conv1d/Conv2d/Conv3d/Linear, in module order (the layers autodac traces:
    those inside an already factorised layer are its parts, not layers of the model)."""
    factorized = [name for name, module in model.named_modules() if isinstance(module, FactorizedLayer)]
    return {
        name: describe_layer(module)
        for name, module in model.named_modules()
        if isinstance(module, SUPPORTED_TYPES) and not any(name.startswith(prefix + ".") for prefix in factorized)
    }


def model_structure(model: nn.Module, input_shapes: list[list[int]]) -> dict[str, Any]:
    """The plan's ``structure`` record: the model's layers and their fingerprint with ``input_shapes``."""
    layers = model_layers(model)
    return {"fingerprint": structure_fingerprint(layers, input_shapes), "layers": layers}


def _first_difference(planned: dict[str, str], found: dict[str, str]) -> str | None:
    """The first layer, in module order, where the model differs from the plan's record (None when they agree)."""
    plan_names, model_names = list(planned), list(found)
    for i in range(max(len(plan_names), len(model_names))):
        in_plan = plan_names[i] if i < len(plan_names) else None
        in_model = model_names[i] if i < len(model_names) else None
        if in_plan == in_model:
            if planned[in_plan] != found[in_model]:
                return f"layer {in_plan!r}: plan has {planned[in_plan]}, model has {found[in_model]}"
            continue
        if in_model is not None and in_model not in planned:
            return f"layer {in_model!r} is in the model but not in the plan"
        if in_plan is not None and in_plan not in found:
            return f"layer {in_plan!r} is in the plan but not in the model"
        return f"the layers come in another order: the plan has {in_plan!r} where the model has {in_model!r}"
    return None


def check_structure(model: nn.Module, plan: Plan) -> None:
    """Refuse (``PlanError``) a plan whose recorded structure is not ``model``'s, naming the first difference.

    A plan without a record (version 1, or built by hand) cannot be checked: it is let through
    with a logged note.
    """
    if plan.structure is None:
        logger.info("the plan records no model structure (plan version 1 or built by hand): it cannot be checked against the model")
        return
    planned = plan.structure["layers"]
    # a result (``result.model``, an applied plan) whose pairs stand where the plan saw plain layers
    decomposed = [name for name, module in model.named_modules() if isinstance(module, FactorizedLayer) and name in planned]
    if decomposed:
        raise PlanError(
            f"a plan must be applied to the model it was made for, not to a decomposed one, but {decomposed[0]!r} "
            f"is already factorised here ({len(decomposed)} such layers): apply the plan to the original model"
        )
    found = model_layers(model)
    if plan.structure.get("version") == 2:  # recorded before Conv3d layers were candidates: it names none of them
        found = {name: kind for name, kind in found.items() if not isinstance(model.get_submodule(name), nn.Conv3d)}
    difference = _first_difference(planned, found)
    if difference is not None:
        raise PlanError(
            f"a plan must be applied to the model it was made for (structure {plan.structure['fingerprint']}, "
            f"{len(planned)} Conv/Linear layers), but {difference} (the model has {len(found)} Conv/Linear layers)"
        )
