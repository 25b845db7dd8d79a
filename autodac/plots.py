"""Pictures of plans and sensitivity profiles, saved as PNG files (``autodac report`` and ``autodac profile`` draw them).

matplotlib is an optional dependency (``pip install autodac[plots]``), imported only when a
picture is drawn. Figures are built with ``matplotlib.figure.Figure``, never through pyplot,
so drawing here neither changes the caller's backend nor leaves figures open in a notebook.
"""

from __future__ import annotations

import math
import os
import textwrap
from typing import Mapping, Sequence

from autodac.errors import AutodacError
from autodac.factorize import get_method, method_table
from autodac.plan import Plan

__all__ = [
    "flops_vs_quality", "ranks_per_layer", "flops_per_layer", "sensitivity_heatmap", "plan_quality", "pareto_titles",
    "METHOD_COLORS",
]

# Each registered method's own ``color`` (read live from the registry), then the plan entries that are not methods.
METHOD_COLORS = method_table("color", {"width": "#d62728", "dense": "#b0b0b0"})
_DPI = 130


def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise AutodacError("pictures need matplotlib, which is not installed: pip install autodac[plots]") from None
    return Figure(figsize=(width, height), layout="constrained")


def _save(fig, path: str | os.PathLike) -> None:
    fig.savefig(path, dpi=_DPI)


def plan_quality(plans: Mapping[str, Plan]) -> tuple[str, dict[str, float], bool]:
    """``(axis label, {title: value}, higher_is_better)``: the quality the plans can be ranked by.

    The measured probe metric (``metrics["probe"]``) where plans carry it; only when none does,
    the summed predicted error of the layers (what the data-free planner minimises).
    """
    measured = {title: plan.metrics["probe"] for title, plan in plans.items() if "probe" in plan.metrics}
    if measured:
        names = {note.removeprefix("probe metric: ") for p in plans.values() for note in p.notes if note.startswith("probe metric: ")}
        name = names.pop().split(" on ")[0] if len(names) == 1 else "probe metric"
        return f"{name} (probe, held-out half)", measured, True
    errors = {title: sum(c.error for c in plan.layers.values()) for title, plan in plans.items()}
    return "predicted error, summed over layers (lower is better)", errors, False


def pareto_titles(points: Mapping[str, tuple[float, float]], higher_is_better: bool = True) -> list[str]:
    """Titles of the points no other point beats on both cost (x, lower is better) and quality (y), cheapest first."""
    sign = 1.0 if higher_is_better else -1.0
    front, best = [], -math.inf
    for title, (cost, quality) in sorted(points.items(), key=lambda item: (item[1][0], -sign * item[1][1])):
        if sign * quality > best:
            front.append(title)
            best = sign * quality
    return front


def flops_vs_quality(plans: Mapping[str, Plan], path: str | os.PathLike) -> list[str]:
    """Scatter of FLOPs ratio against quality, one point per plan, the Pareto front joined; returns the front's titles.

    Plans made with data are placed by their measured probe metric (the original model at ratio
    1.0 is drawn too when the plans carry it); without data by their summed predicted error.
    """
    label, quality, higher = plan_quality(plans)
    points = {title: (plans[title].flops_ratio, value) for title, value in quality.items()}
    front = pareto_titles(points, higher)
    fig = _figure(6.4, 4.4)
    ax = fig.add_subplot()
    for title, (x, y) in points.items():
        on_front = title in front
        ax.scatter([x], [y], s=46, zorder=3, color="#d62728" if on_front else "white", edgecolors="#d62728" if on_front else "#555555")
        ax.annotate(title, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.step([points[t][0] for t in front], [points[t][1] for t in front], where="post", color="#d62728", lw=1.2, zorder=2,
            label="Pareto front (no plan is both cheaper and better)")
    originals = [p.metrics["probe_original"] for p in plans.values() if "probe_original" in p.metrics and higher]
    if originals:
        ax.scatter([1.0], [originals[0]], marker="*", s=140, color="black", zorder=3, label="original model")
    if not higher:
        ax.invert_yaxis()  # better plans up, whatever the quantity
    ax.set_xlabel("FLOPs ratio (fvcore count of the plan / of the original)")
    ax.set_ylabel(label)
    ax.set_title("FLOPs against quality, one point per plan")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right" if higher else "upper right")
    _save(fig, path)
    return front


def _layers(plans: Mapping[str, Plan]) -> list[str]:
    return list(dict.fromkeys(name for plan in plans.values() for name in plan.layers))


def _short(name: str) -> str:
    return name.replace("layers.", "L").replace("features.", "f").replace("shortcut.", "sc")


def ranks_per_layer(plans: Mapping[str, Plan], path: str | os.PathLike) -> None:
    """One bar chart per plan: the share of each layer's full rank the plan keeps, coloured by method, rank written above.

    Full rank is where the factorisation is exact (it differs by method and layer shape), so
    the bars are comparable across layers; a dense layer is a grey bar at 1.
    """
    layers = _layers(plans)
    fig = _figure(max(6.4, 0.32 * len(layers) + 2), 1.0 + 2.1 * len(plans))
    axes = fig.subplots(len(plans), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (title, plan) in zip(axes, plans.items()):
        for x, name in enumerate(layers):
            choice = plan.layers.get(name)
            if choice is None:
                continue
            if choice.is_dense:
                ax.bar(x, 1.0, color=METHOD_COLORS["dense"], hatch="//", edgecolor="white")
                continue
            full = choice.weight_shape[1] if choice.method == "width" else get_method(choice.method).max_rank(tuple(choice.weight_shape))
            share = choice.rank / full  # a width: the share of the hidden channels kept
            ax.bar(x, share, color=METHOD_COLORS.get(choice.method, "#7f7f7f"))
            ax.text(x, share + 0.02, str(choice.rank), ha="center", va="bottom", fontsize=7)
        ax.set_ylim(0, 1.15)
        ax.set_ylabel("rank / full rank")
        ax.set_title(f"{title}: FLOPs ratio {plan.flops_ratio:.3f} (numbers: rank kept)", fontsize=9, loc="left")
        ax.grid(axis="y", alpha=0.3)
    axes[-1].set_xticks(range(len(layers)), [_short(n) for n in layers], rotation=90, fontsize=7)
    from matplotlib.patches import Patch

    used = {c.method for p in plans.values() for c in p.layers.values()}
    handles = [Patch(color=color, label=method) for method, color in METHOD_COLORS.items() if method in used]
    axes[0].legend(handles=handles, fontsize=7, ncol=len(handles), loc="upper right")
    _save(fig, path)


def flops_per_layer(plans: Mapping[str, Plan], path: str | os.PathLike) -> None:
    """Grouped bars per layer: its FLOPs in the original model (grey), then after each plan."""
    layers = _layers(plans)
    width = 0.8 / (len(plans) + 1)
    fig = _figure(min(13.0, max(6.4, 0.18 * len(layers) * (len(plans) + 1) + 2)), 4.6)
    ax = fig.add_subplot()
    before = {}
    for plan in plans.values():
        for name, choice in plan.layers.items():
            before.setdefault(name, choice.flops_before)
    ax.bar([x - 0.4 + width / 2 for x in range(len(layers))], [before[n] / 1e6 for n in layers], width, color="#b0b0b0", label="original")
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
    for k, (title, plan) in enumerate(plans.items(), start=1):
        values = [plan.layers[n].flops_after / 1e6 if n in plan.layers else 0.0 for n in layers]
        ax.bar([x - 0.4 + width * (k + 0.5) for x in range(len(layers))], values, width, color=colors[(k - 1) % len(colors)],
               label=f"{title} ({plan.flops_ratio:.3f})")
    ax.set_xticks(range(len(layers)), [_short(n) for n in layers], rotation=90, fontsize=7)
    ax.set_ylabel("multiply-adds per example (millions, fvcore)")
    ax.set_title("FLOPs per layer, before and after each plan (legend: whole-model ratio)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


def sensitivity_heatmap(
    losses: Mapping[str, Sequence[tuple[str, int, float, float]]], path: str | os.PathLike, samples: int | None = None,
    measure: str = "divergence",
) -> None:
    """Heat map of a sensitivity profile: a row per layer, its measured options cheapest first.

    ``losses[layer]`` lists ``(method, rank, share of the layer's parameters kept, divergence)``;
    each cell is coloured by the divergence (log scale) of the model's outputs from the
    original's with that layer alone factorised, and names the option. ``measure`` names the
    divergence (the profile's own: a KL for class scores, a relative squared error for values).
    """
    from matplotlib.colors import LogNorm

    layers = list(losses)
    columns = max((len(v) for v in losses.values()), default=0)
    if not layers or columns == 0:
        raise AutodacError("a sensitivity heat map needs at least one measured option, but the profile is empty")
    values = [[math.nan] * columns for _ in layers]
    for i, name in enumerate(layers):
        for j, (_, _, _, loss) in enumerate(sorted(losses[name], key=lambda o: o[2])):
            values[i][j] = loss
    finite = [v for row in values for v in row if v > 0 and math.isfinite(v)]
    low, high = (min(finite), max(finite)) if finite else (1e-6, 1.0)
    fig = _figure(2.2 + 1.35 * columns, 1.4 + 0.34 * len(layers))
    ax = fig.add_subplot()
    image = ax.imshow([[max(v, low) if math.isfinite(v) else math.nan for v in row] for row in values], cmap="magma_r",
                      norm=LogNorm(vmin=low, vmax=max(high, low * 1.0001)), aspect="auto")
    for i, name in enumerate(layers):
        for j, (method, rank, kept, loss) in enumerate(sorted(losses[name], key=lambda o: o[2])):
            dark = math.log(max(loss, low) / low) > 0.45 * math.log(max(high, low * 1.0001) / low)
            ax.text(j, i, f"{method} r{rank} ({kept:.0%})\n{loss:.3g}", ha="center", va="center", fontsize=6.5,
                    color="white" if dark else "black")
    ax.set_yticks(range(len(layers)), layers, fontsize=7)
    ax.set_xticks(range(columns), [f"option {j + 1}" for j in range(columns)], fontsize=8)
    ax.set_xlabel("measured options per layer, fewest parameters kept first")
    per = f" on {samples} probe examples" if samples else ""
    width = int(fig.get_figwidth() * 13)  # characters of a 9-point title a line holds: a narrow map wraps it, not cuts it
    title = textwrap.wrap(f"Sensitivity: {measure} from the original's outputs{per}, one layer factorised at a time", width)
    title += textwrap.wrap("cell: method, rank (share of the layer's parameters kept), divergence", width)
    ax.set_title("\n".join(title), fontsize=9)
    fig.colorbar(image, ax=ax, label="divergence (log scale)")
    _save(fig, path)
