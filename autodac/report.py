"""Readable tables of plans (tabulate does the layout): one plan, or several side by side."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from tabulate import TableFormat, tabulate, tabulate_formats

from autodac.errors import AutodacError
from autodac.plan import Plan

__all__ = ["plan_table", "compare", "layer_names", "sliced_by", "models_of"]


def _check_tablefmt(tablefmt: Any) -> None:
    """Refuse a table format tabulate does not know (tabulate itself falls back to ``simple`` without a word)."""
    if not isinstance(tablefmt, TableFormat) and not (isinstance(tablefmt, str) and tablefmt in tabulate_formats):
        raise AutodacError(f"`tablefmt` must be one of tabulate's formats {list(tabulate_formats)}, but got tablefmt={tablefmt!r}")


def plan_table(plan: Plan, tablefmt: str = "simple") -> str:
    """One row per candidate layer: shape, method, rank, FLOPs before/after and the predicted error."""
    if not isinstance(plan, Plan):
        raise AutodacError(f"`plan` must be an autodac.Plan, but got {type(plan).__name__}")
    _check_tablefmt(tablefmt)
    timed = any(c.latency_before is not None for c in plan.layers.values())
    rows = []
    for name, choice in plan.layers.items():
        row = [
            name, "x".join(map(str, choice.weight_shape)), choice.method, "" if choice.rank is None else choice.rank,
            f"{choice.flops_before:,}", f"{choice.flops_after:,}", f"{choice.flops_after / choice.flops_before:.3f}",
            f"{choice.error:.4f}",
        ]
        if timed:
            row += [choice.impl, *(("", "") if choice.latency_before is None else (
                f"{choice.latency_before:.3f}", f"{choice.latency_after:.3f}"))]
        rows.append(row)
    for name, reason in plan.skipped.items():
        rows.append([name, "", "skipped", "", "", "", "", reason] + (["", "", ""] if timed else []))
    headers = ["layer", "weight", "method", "rank", "FLOPs before", "FLOPs after", "ratio", "pred. error"]
    if timed:
        headers += ["impl", "ms before", "ms after"]
    return tabulate(rows, headers=headers, tablefmt=tablefmt, disable_numparse=True)


def _cell(plan: Plan, layer: str) -> str:
    choice = plan.layers.get(layer)
    if choice is None:
        by = sliced_by(plan, layer)
        if by is not None:
            return f"sliced ({by})"
        return "skipped" if layer in plan.skipped else "-"
    if choice.is_dense:
        return "dense"
    cell = f"{choice.method} r{choice.rank} ({choice.flops_after / choice.flops_before:.2f}"
    if choice.latency_before:  # measured: the layer's latency ratio beside its FLOPs ratio
        cell += f", latency {choice.latency_after / choice.latency_before:.2f}"
    return cell + ")"


def layer_names(plans: list[Plan]) -> list[str]:
    """Every layer any of ``plans`` lists (planned, sliced by a width choice, or skipped), in model order."""
    return _merged_order([[*_listed(plan), *plan.skipped] for plan in plans])


def sliced_by(plan: Plan, layer: str) -> str | None:
    """The width choice of ``plan`` that slices ``layer`` as its producer, if any."""
    return next((name for name, c in plan.layers.items() if c.sliced and c.sliced[0] == layer), None)


def _listed(plan: Plan) -> list[str]:
    """The plan's layers in order, each width choice preceded by the producer it slices."""
    names: list[str] = []
    for name, choice in plan.layers.items():
        if choice.sliced and choice.sliced[0] not in plan.layers:
            names.append(choice.sliced[0])
        names.append(name)
    return names


def _merged_order(sequences: list[list[str]]) -> list[str]:
    """All names, each new one placed right after the name before it in the sequence it comes from
    (so layers one plan lists and another does not still appear in model order)."""
    merged: list[str] = []
    for sequence in sequences:
        for i, name in enumerate(sequence):
            if name in merged:
                continue
            before = next((sequence[j] for j in range(i - 1, -1, -1) if sequence[j] in merged), None)
            merged.insert(0 if before is None else merged.index(before) + 1, name)
    return merged


def _runtime_cell(plan: Plan) -> str:
    if not plan.runtime:
        return ""
    return f"{plan.runtime.get('name', '?')} {plan.runtime.get('version', '')}".strip()


def _distilled_cell(plan: Plan) -> str:
    if not plan.distilled:
        return ""
    return f"epoch {plan.distilled['epoch']} of {plan.distilled['epochs']} (lr {plan.distilled['lr']:g})"


def _model_cell(plan: Plan) -> str:
    """The model a plan was made for, short: its structure fingerprint's first 12 digits (``?`` when it has none)."""
    fingerprint = (plan.structure or {}).get("fingerprint")
    return fingerprint.split(":")[-1][:12] if fingerprint else "?"


def models_of(plans: Iterable[Plan]) -> int:
    """How many models (at their input shapes) ``plans`` were made for: only plans of one have layers, costs and errors that line up."""
    return len({((p.structure or {}).get("fingerprint"), str(p.input_shapes)) for p in plans})


def _titled(plans: Any) -> dict[Any, Plan]:
    """``plans`` as ``{title: plan}``, or a refusal naming what was given instead of a mapping or list of plans."""
    rule = "`plans` must be a non-empty mapping of titles to autodac.Plan, or a list of them"
    if isinstance(plans, Plan):  # one plan is not a comparison: say how to get one anyway
        raise AutodacError(f"{rule}, but got a single Plan; pass [plan] for a one-column table (or use plan_table(plan))")
    if isinstance(plans, Mapping):
        titled, where = dict(plans), {title: f"plans[{title!r}]" for title in plans}
    elif isinstance(plans, Iterable) and not isinstance(plans, (str, bytes)):
        listed = list(plans)
        titled = {f"plan {i + 1}": plan for i, plan in enumerate(listed)}
        where = {f"plan {i + 1}": f"plans[{i}]" for i in range(len(listed))}
    else:
        raise AutodacError(f"{rule}, but got {type(plans).__name__}: {plans!r:.80}")
    if not titled:
        raise AutodacError(f"{rule}, but got an empty {type(plans).__name__}")
    for title, plan in titled.items():
        if not isinstance(plan, Plan):
            raise AutodacError(f"{rule}, but {where[title]} is {type(plan).__name__}, not a Plan")
    return titled


def compare(plans: Mapping[str, Plan] | list[Plan], tablefmt: str = "simple") -> str:
    """Plans side by side: a row per layer (method, rank, the layer's FLOPs ratio and, for plans timed
    under a latency budget, its measured latency ratio), then totals.

    Plans made for different models (or input shapes) are not refused, but the table then opens
    with each one's structure fingerprint and input shapes, so rows of layers that share a name
    across models are not read as one layer.

    ``plans`` maps a column title to a plan (a list gets titles ``plan 1``, ``plan 2``...;
    a single plan is refused: pass ``[plan]``). ``tablefmt`` is one of ``tabulate.tabulate_formats``. Totals
    are the FLOPs ratio, the parameters, the runtime a latency plan was timed on, the distillation
    kept (if any), and every
    measured figure the plans carry (``metrics``).
    """
    plans = _titled(plans)
    _check_tablefmt(tablefmt)
    titles = list(plans)
    layers = layer_names(list(plans.values()))
    rows = []
    if models_of(plans.values()) > 1:  # plans of other models (or inputs): say so before their layers mix
        rows.append(["model (structure)", *(_model_cell(plans[t]) for t in titles)])
        rows.append(["input shapes", *(" ".join("x".join(map(str, s)) for s in plans[t].input_shapes) for t in titles)])
    rows += [[name, *(_cell(plans[t], name) for t in titles)] for name in layers]
    rows.append(["FLOPs ratio", *(f"{plans[t].flops_ratio:.4f}" for t in titles)])
    rows.append(["FLOPs", *(f"{plans[t].flops:,}" for t in titles)])
    params = {t: sum(c.params_after - c.params_before for c in plans[t].layers.values()) for t in titles}
    rows.append(["parameters saved", *(f"{-params[t]:,}" for t in titles)])
    if any("params" in plans[t].budget for t in titles):  # the ratio itself is a metric (params_ratio), listed below
        rows.append(["params budget", *(f"{plans[t].budget['params']:g}" if "params" in plans[t].budget else "" for t in titles)])
    if any(plans[t].runtime for t in titles):  # where each latency plan was timed: ratios from different runtimes differ
        rows.append(["timed on", *(_runtime_cell(plans[t]) for t in titles)])
    if any(plans[t].distilled for t in titles):  # trained weights: the same plan, other quality
        rows.append(["distilled", *(_distilled_cell(plans[t]) for t in titles)])
    metric_names = list(dict.fromkeys(k for plan in plans.values() for k in plan.metrics))
    for key in metric_names:
        rows.append([key, *(f"{plans[t].metrics[key]:.4f}" if key in plans[t].metrics else "" for t in titles)])
    return tabulate(rows, headers=["layer", *titles], tablefmt=tablefmt, disable_numparse=True)
