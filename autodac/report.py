"""Readable tables of plans (tabulate does the layout)."""

from __future__ import annotations

from tabulate import tabulate

from autodac.plan import Plan

__all__ = ["plan_table"]


def plan_table(plan: Plan, tablefmt: str = "simple") -> str:
    """One row per candidate layer: shape, method, rank, FLOPs before/after and the predicted error."""
    rows = []
    for name, choice in plan.layers.items():
        rows.append([
            name, "x".join(map(str, choice.weight_shape)), choice.method, "" if choice.rank is None else choice.rank,
            f"{choice.flops_before:,}", f"{choice.flops_after:,}", f"{choice.flops_after / choice.flops_before:.3f}",
            f"{choice.error:.4f}",
        ])
    for name, reason in plan.skipped.items():
        rows.append([name, "", "skipped", "", "", "", "", reason])
    headers = ["layer", "weight", "method", "rank", "FLOPs before", "FLOPs after", "ratio", "pred. error"]
    return tabulate(rows, headers=headers, tablefmt=tablefmt, disable_numparse=True)
