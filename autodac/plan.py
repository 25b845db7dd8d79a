"""Plans: what to do with each layer, keyed by dotted module name, saved as versioned JSON.

A plan is data, not objects: it can be saved, loaded, compared, and replayed on a fresh copy
of the same model with ``autodac.apply``. Loading checks the version and every field.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from autodac.budgets import KINDS as BUDGET_KINDS
from autodac.budgets import check_ratio
from autodac.errors import AutodacError, BudgetError, PlanError
from autodac.options import DistillOptions
from autodac.probes import OUTPUT_KINDS

__all__ = ["PLAN_VERSION", "READABLE_VERSIONS", "LayerChoice", "Plan", "structure_fingerprint"]

# 2: `structure` (every Conv/Linear layer of the model the plan was made for, and a fingerprint), checked by apply
# 3: Conv3d layers are among them (a version-2 record lists Conv1d/Conv2d/Linear only: apply checks it without the model's Conv3d)
PLAN_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)  # a version-1 plan loads with structure=None: apply replays it unchecked
DENSE = "dense"
WIDTH = "width"  # a block's hidden width planned as the consumer's rank: the only method with `channels` and `sliced`


@dataclass(frozen=True)
class LayerChoice:
    """What the plan does with one layer: keep it dense, or factorise it by ``method`` at ``rank``.

    ``flops_before``/``flops_after`` are fvcore-style multiply-adds at the plan's input shape;
    ``error`` is the predicted relative error the planner used (0 for a dense layer).
    """

    method: str
    rank: int | None
    weight_shape: tuple[int, ...]
    flops_before: int
    flops_after: int
    params_before: int
    params_after: int
    error: float = 0.0
    # "plain": SVD of the weight; "bn:NAME": output channels weighted by BatchNorm NAME;
    # "data" / "data+bn:NAME": also weighted by the covariance of the layer's inputs on the probe;
    # "implied" / "implied+bn:NAME": by the input moments the BatchNorms imply, without data (autodac.implied);
    # "seq+" before any of them: then re-fitted, in execution order, to the inputs the decomposed
    # layers before it produce (``autodac.sequential``; replayed by ``apply`` with the same data)
    fit: str = "plain"
    # How the factorised pair runs ("" = the method's plain form; DAC: "grouped" or "split"), and
    # the layer's measured latency in milliseconds on the planning device (latency budgets only).
    impl: str = ""
    latency_before: float | None = None
    latency_after: float | None = None
    # method "width" (a block's hidden width planned as its rank): the input channels kept, in keep
    # order, and the layers sliced with them (the producer, then BatchNorms / depthwise convs between)
    channels: tuple[int, ...] | None = None
    sliced: tuple[str, ...] | None = None

    @property
    def is_dense(self) -> bool:
        return self.method == DENSE


_LAYER_FIELDS = {"method", "rank", "weight_shape", "flops_before", "flops_after", "params_before", "params_after", "error", "fit"}
_OPTIONAL_LAYER_FIELDS = {"impl", "latency_before", "latency_after", "channels", "sliced"}
_PLAN_FIELDS = {
    "format", "_version", "budget", "input_shapes", "input_assumed", "original_flops", "flops",
    "layers", "skipped", "metrics", "notes", "probe", "structure", "runtime", "distilled",
}


def structure_fingerprint(layers: dict[str, str], input_shapes: list[list[int]]) -> str:
    """``sha256:`` and 16 hex digits of the layers' names and descriptions (in order) and the input shapes.

    Two models get the same fingerprint when every Conv/Linear layer has the same name, type and
    shape, in the same order, and the plan was made at the same input shapes.
    """
    text = json.dumps({"layers": [[name, kind] for name, kind in layers.items()], "input_shapes": input_shapes}, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _check_structure(data: Any, input_shapes: list[list[int]]) -> dict[str, Any] | None:
    """The plan's ``structure`` record, checked: ``{"fingerprint": str, "layers": {name: description}}`` whose
    fingerprint is that of its layers and the plan's input shapes (a hand-edited record is refused)."""
    if data is None:
        return None
    rule = "a plan's `structure` must be an object {'fingerprint': 'sha256:...', 'layers': {name: description}}"
    if not isinstance(data, dict) or set(data) != {"fingerprint", "layers"} or not isinstance(data["layers"], dict):
        raise PlanError(f"{rule}, but got {data!r:.200}")
    layers = data["layers"]
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in layers.items()):
        raise PlanError(f"{rule} with string descriptions, but got {layers!r:.200}")
    expected = structure_fingerprint(layers, input_shapes)
    if data["fingerprint"] != expected:
        raise PlanError(
            f"a plan's structure fingerprint must be that of its recorded layers and input shapes, {expected}, "
            f"but got fingerprint={data['fingerprint']!r} (was the plan edited by hand?)"
        )
    return {"fingerprint": expected, "layers": dict(layers)}


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _check_width(name: str, entry: dict[str, Any]) -> tuple[tuple[int, ...] | None, tuple[str, ...] | None]:
    """A layer's ``channels`` and ``sliced``: present on a width choice, absent on every other.

    A width keeps ``rank`` distinct input channels of its layer (indices below ``weight_shape[1]``,
    in keep order) and slices the modules named in ``sliced`` (the producer first) with them.
    """
    method, channels, sliced = entry["method"], entry.get("channels"), entry.get("sliced")
    if method != WIDTH:
        if channels is not None or sliced is not None:
            raise PlanError(
                f"layer {name!r}: `channels` and `sliced` belong to width choices only, but got method={method!r} "
                f"with channels={channels!r:.100} and sliced={sliced!r:.100}"
            )
        return None, None
    rule = f"layer {name!r}: a width choice's `channels` must be a list of distinct channel indices (ints >= 0)"
    if not isinstance(channels, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in channels):
        raise PlanError(f"{rule}, but got channels={channels!r:.200}")
    negative = [c for c in channels if c < 0]
    if negative:
        raise PlanError(f"{rule}, but got channels={channels!r:.200} ({negative[0]} is negative)")
    repeated = sorted({c for c in channels if channels.count(c) > 1})
    if repeated:
        raise PlanError(f"{rule}, but got channels={channels!r:.200} ({repeated[0]} is repeated)")
    shape = entry["weight_shape"]
    if isinstance(shape, list) and len(shape) >= 2 and isinstance(shape[1], int) and not isinstance(shape[1], bool):
        beyond = [c for c in channels if c >= shape[1]]
        if beyond:
            raise PlanError(
                f"layer {name!r}: a width choice's `channels` must be below the layer's input width weight_shape[1]={shape[1]}, "
                f"but got channel {beyond[0]} in channels={channels!r:.200}"
            )
    if entry["rank"] != len(channels):
        raise PlanError(
            f"layer {name!r}: a width choice's `rank` must equal len(channels)={len(channels)} (the channels it keeps), "
            f"but got rank={entry['rank']!r}"
        )
    if (not isinstance(sliced, list) or not sliced or not all(isinstance(m, str) and m for m in sliced)
            or len(set(sliced)) != len(sliced)):
        raise PlanError(
            f"layer {name!r}: a width choice's `sliced` must be a non-empty list of distinct module names (strings, "
            f"the producer first), but got sliced={sliced!r:.200}"
        )
    return tuple(channels), tuple(sliced)


def _is_whole(value: Any, minimum: int) -> bool:
    """A whole number (an integral float counts, a bool or a string does not) of at least ``minimum``."""
    whole = (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float) and value.is_integer())
    return whole and value >= minimum


def _flops_count(field_name: str, value: Any, minimum: int) -> int:
    """``value`` as an int when it is a whole number (an integral float counts) of at least ``minimum``; a PlanError otherwise."""
    if not _is_whole(value, minimum):
        kind = "a positive" if minimum == 1 else "a non-negative"
        raise PlanError(f"a plan's `{field_name}` must be {kind} integer (multiply-adds), but got {field_name}={value!r}")
    return int(value)


def _layer_counts(name: str, entry: dict) -> dict[str, Any]:
    """A layer's ``weight_shape`` (positive whole numbers) and FLOPs/parameter counts (non-negative), as ints; a PlanError naming
    the field otherwise (``int()`` would have read ``"12"`` or ``3.7`` as a count)."""
    counts = {}
    for field_name in ("flops_before", "flops_after", "params_before", "params_after"):
        value = entry[field_name]
        if not _is_whole(value, 0):
            raise PlanError(f"layer {name!r}: `{field_name}` must be a non-negative integer, but got {field_name}={value!r:.100}")
        counts[field_name] = int(value)
    shape = entry["weight_shape"]
    if not isinstance(shape, (list, tuple)) or not shape or not all(_is_whole(v, 1) for v in shape):
        raise PlanError(f"layer {name!r}: `weight_shape` must be a non-empty list of positive integers, but got weight_shape={shape!r:.100}")
    counts["weight_shape"] = tuple(int(v) for v in shape)
    return counts


def _input_shapes(shapes: Any) -> list[list[int]]:
    """A plan's ``input_shapes``: a list of shapes, each a list of positive whole numbers."""
    if not isinstance(shapes, (list, tuple)) or not all(isinstance(s, (list, tuple)) and all(_is_whole(v, 1) for v in s) for s in shapes):
        raise PlanError(f"a plan's `input_shapes` must be a list of shapes, each a list of positive integers, but got input_shapes={shapes!r:.200}")
    return [[int(v) for v in s] for s in shapes]


def _check_budget(data: Any) -> dict[str, float]:
    """A plan's ``budget``: ``{kind: ratio}`` as ``optimize`` records it, each kind a budget's and each ratio in (0, 1]."""
    kinds = [kind.kind for kind in BUDGET_KINDS]
    if not isinstance(data, dict) or not set(data) <= set(kinds):
        raise PlanError(f"a plan's `budget` must be an object {{kind: ratio}} with kinds among {kinds}, but got budget={data!r:.200}")
    try:
        return {kind: check_ratio(f"budget[{kind!r}]", ratio) for kind, ratio in data.items()}
    except BudgetError as error:
        raise PlanError(f"a plan's {error}") from None


def _check_fit(name: str, fit: Any) -> str:
    own = fit.removeprefix("seq+") if isinstance(fit, str) else None
    base = own.removeprefix("data+").removeprefix("implied+") if own is not None else None
    if base is None or not (own in ("plain", "data", "implied") or (base.startswith("bn:") and len(base) > 3)):
        raise PlanError(
            f"layer {name!r}: `fit` must be 'plain', 'data', 'implied', 'bn:<BatchNorm name>', 'data+bn:<BatchNorm name>' "
            f"or 'implied+bn:<BatchNorm name>', optionally after 'seq+', but got fit={fit!r}"
        )
    return fit


def _check_distilled(data: Any) -> dict[str, Any]:
    """A plan's ``distilled`` record, checked: the distillation options, ``epoch`` (1..epochs), ``inputs`` and ``output_kind``."""
    if data is None or data == {}:
        return {}
    rule = ("a plan's `distilled` must be an object of the distillation options, `epoch` (1..epochs), `accepted` (one true/false per "
            "epoch up to it, the last true), `inputs` ('calibration' or 'probe') and optionally `output_kind` (how outputs were "
            f"compared: one of {sorted(OUTPUT_KINDS)}, or null)")
    if not isinstance(data, dict) or not {"epoch", "accepted", "inputs"} <= set(data):
        raise PlanError(f"{rule}, but got {data!r:.200}")
    options = {k: v for k, v in data.items() if k not in ("epoch", "accepted", "inputs", "output_kind")}
    try:
        settings = DistillOptions(**options)
    except TypeError:
        raise PlanError(f"{rule}, but got the fields {sorted(data)}") from None
    except AutodacError as error:
        raise PlanError(f"a plan's `distilled` options must be valid: {error}") from None
    epoch, accepted = data["epoch"], data["accepted"]
    if (isinstance(epoch, bool) or not isinstance(epoch, int) or not 1 <= epoch <= settings.epochs or data["inputs"] not in ("calibration", "probe")
            or not isinstance(accepted, list) or len(accepted) != epoch or not all(isinstance(a, bool) for a in accepted) or not accepted[-1]):
        raise PlanError(f"{rule}, but got epoch={epoch!r}, accepted={accepted!r:.100}, inputs={data['inputs']!r}")
    kind = data.get("output_kind")
    if kind is not None and kind not in OUTPUT_KINDS:
        raise PlanError(f"{rule}, but got output_kind={kind!r}")
    return {**settings.to_dict(), "epoch": epoch, "accepted": list(accepted), "inputs": data["inputs"],
            **({} if "output_kind" not in data else {"output_kind": kind})}  # plans from before it was recorded read back as they were


def _layer_dict(choice: LayerChoice) -> dict[str, Any]:
    entry = {**asdict(choice), "weight_shape": list(choice.weight_shape)}
    for key in ("channels", "sliced"):  # only width choices carry them; older readers never see them
        if entry[key] is None:
            del entry[key]
        else:
            entry[key] = list(entry[key])
    return entry


def _check_path(path: Any) -> None:
    """A plan file is named by a path (``str`` or ``os.PathLike``), never a number: ``open(3)`` would read and close descriptor 3."""
    if not isinstance(path, (str, os.PathLike)):
        raise PlanError(f"a plan file must be named by a path (str or os.PathLike), but got {type(path).__name__}: {path!r:.80}")


@dataclass
class Plan:
    """Per-layer choices plus what they were planned for; ``metrics`` carries measured figures."""

    layers: dict[str, LayerChoice]
    original_flops: int
    budget: dict[str, float] = field(default_factory=dict)
    input_shapes: list[list[int]] = field(default_factory=list)
    input_assumed: bool = False
    skipped: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    probe: dict[str, Any] = field(default_factory=dict)  # where the probe came from: {"source": "data" | "synthetic", ...}
    # the model it was made for: {"fingerprint": "sha256:...", "layers": {name: "Conv2d(3->8, kernel=(3, 3), ...)"}}
    # (autodac.structure); None for a plan of version 1 or one built by hand, which apply cannot check
    structure: dict[str, Any] | None = None
    # where a latency budget was timed: {"name": "torch" | "onnxruntime", "version": ..., "device": ...}; empty without one
    runtime: dict[str, str] = field(default_factory=dict)
    # the distillation optimize kept (autodac.distill): its options, the epoch kept and what it trained on
    # ("calibration": the probe's calibration half; "probe": all of it); empty when there was none
    distilled: dict[str, Any] = field(default_factory=dict)

    @property
    def flops(self) -> int:
        """Planned multiply-adds of the whole model (fvcore's count of the original, minus what the plan saves)."""
        return self.original_flops - sum(c.flops_before - c.flops_after for c in self.layers.values())

    @property
    def flops_ratio(self) -> float:
        return self.flops / self.original_flops

    @property
    def factorized(self) -> dict[str, LayerChoice]:
        return {name: choice for name, choice in self.layers.items() if not choice.is_dense}

    def to_dict(self) -> dict[str, Any]:
        timed = {"runtime": dict(self.runtime)} if self.runtime else {}  # absent when empty: readers before it still load the plan
        return {
            "format": "autodac.plan",
            "_version": 2 if self.structure is not None and self.structure.get("version") == 2 else PLAN_VERSION,
            "budget": dict(self.budget),
            "input_shapes": [list(s) for s in self.input_shapes],
            "input_assumed": self.input_assumed,
            "original_flops": self.original_flops,
            "flops": self.flops,
            "layers": {name: _layer_dict(c) for name, c in self.layers.items()},
            "skipped": dict(self.skipped),
            "metrics": dict(self.metrics),
            "notes": list(self.notes),
            "probe": dict(self.probe),
            **({} if self.structure is None else {"structure": {"fingerprint": self.structure["fingerprint"], "layers": dict(self.structure["layers"])}}),
            **timed,
            **({"distilled": dict(self.distilled)} if self.distilled else {}),
        }

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Any) -> "Plan":
        if not isinstance(data, dict) or data.get("format") != "autodac.plan":
            found = f"format={data.get('format')!r}" if isinstance(data, dict) else f"a JSON {type(data).__name__}"
            raise PlanError(f"a plan must be a JSON object with format='autodac.plan', but got {found}")
        version = data.get("_version")
        if isinstance(version, bool) or not isinstance(version, int) or version not in READABLE_VERSIONS:
            raise PlanError(f"this autodac reads plan versions {list(READABLE_VERSIONS)}, but got _version={version!r}")
        unknown = set(data) - _PLAN_FIELDS
        if unknown:
            raise PlanError(f"a plan may only hold the fields {sorted(_PLAN_FIELDS)}, but got {sorted(unknown)}")
        if version < 2 and "structure" in data:
            raise PlanError(
                f"a version-{version} plan may only hold the fields {sorted(_PLAN_FIELDS - {'structure'})} (`structure` came with "
                f"version 2), but got _version={version} with a `structure`"
            )
        layers_data = data.get("layers")
        if not isinstance(layers_data, dict):
            raise PlanError("a plan's `layers` must be an object keyed by dotted module name")
        layers = {}
        for name, entry in layers_data.items():
            if not isinstance(entry, dict) or not _LAYER_FIELDS <= set(entry) <= _LAYER_FIELDS | _OPTIONAL_LAYER_FIELDS:
                raise PlanError(
                    f"layer {name!r} must have the fields {sorted(_LAYER_FIELDS)} (and optionally {sorted(_OPTIONAL_LAYER_FIELDS)}), "
                    f"but got {entry!r}"
                )
            rank = entry["rank"]
            if entry["method"] != DENSE and (isinstance(rank, bool) or not isinstance(rank, int)):
                raise PlanError(
                    f"layer {name!r}: `rank` must be an integer >= 1 for a factorised layer, but got rank={rank!r} ({type(rank).__name__})"
                )
            if entry["method"] != DENSE and rank < 1:
                raise PlanError(f"layer {name!r}: `rank >= 1` must hold for a factorised layer, but got rank={rank!r}")
            channels, sliced = _check_width(name, entry)
            try:  # a malformed field is a PlanError naming the layer, never a bare TypeError/ValueError
                error = entry["error"]
                if isinstance(error, bool) or not isinstance(error, numbers.Real) or not math.isfinite(error) or error < 0:
                    raise PlanError(f"layer {name!r}: `error` must be a finite number >= 0 (a relative output error), but got {error!r}")
                error = float(error)
                layers[name] = LayerChoice(
                    method=str(entry["method"]), rank=rank, **_layer_counts(name, entry), error=error,
                    fit=_check_fit(name, entry["fit"]), impl=str(entry.get("impl", "")),
                    latency_before=_optional_float(entry.get("latency_before")),
                    latency_after=_optional_float(entry.get("latency_after")),
                    channels=channels, sliced=sliced,
                )
            except (TypeError, ValueError) as problem:
                if isinstance(problem, PlanError):
                    raise
                raise PlanError(f"layer {name!r}: every field must have its type (numbers, a list of ints), but {problem}") from None
        original = _flops_count("original_flops", data.get("original_flops"), minimum=1)
        if "flops" in data:  # written for readers; what the layers imply is the figure, and the two must agree
            implied = original - sum(c.flops_before - c.flops_after for c in layers.values())
            if _flops_count("flops", data["flops"], minimum=0) != implied:
                raise PlanError(
                    f"a plan's `flops` must be what its layers imply, original_flops - their savings = {implied}, "
                    f"but got flops={data['flops']!r} (was the plan edited by hand?)"
                )
        if not isinstance(data.get("input_assumed", False), bool):
            raise PlanError(f"a plan's `input_assumed` must be true or false, but got input_assumed={data['input_assumed']!r}")
        notes = data.get("notes", [])
        if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
            raise PlanError(f"a plan's `notes` must be a list of strings, but got notes={notes!r:.200}")
        budget = _check_budget(data.get("budget", {}))
        input_shapes = _input_shapes(data.get("input_shapes", []))
        structure = _check_structure(data.get("structure"), input_shapes)
        if structure is not None and version == 2:  # recorded before Conv3d layers were: kept so, written back as version 2
            structure["version"] = 2
        try:
            return cls(
                layers=layers, original_flops=original, budget=budget, input_shapes=input_shapes,
                input_assumed=data.get("input_assumed", False), skipped=dict(data.get("skipped", {})),
                metrics={k: float(v) for k, v in dict(data.get("metrics", {})).items()}, notes=list(notes),
                probe=dict(data.get("probe", {})), structure=structure,
                runtime={str(k): str(v) for k, v in dict(data.get("runtime", {})).items()},
                distilled=_check_distilled(data.get("distilled")),
            )
        except (TypeError, ValueError) as problem:
            raise PlanError(
                f"a plan's `metrics` (an object of numbers), `skipped`, `probe` and `runtime` (objects) must have those types, but {problem}"
            ) from None

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        if not isinstance(text, (str, bytes, bytearray)):
            raise PlanError(f"a plan's JSON must be given as a str, but got {type(text).__name__}")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise PlanError(f"a plan must be valid JSON, but parsing failed: {error}") from None
        except UnicodeDecodeError as error:  # bytes that are not text
            raise PlanError(f"a plan's JSON must be UTF-8 text, but decoding failed: {error}") from None
        return cls.from_dict(data)

    def save(self, path) -> None:
        """Write the plan as JSON text to ``path`` (a file path); a PlanError naming the path when it cannot be written."""
        _check_path(path)
        text = self.to_json() + "\n"  # made before the file is opened: a plan that cannot be written leaves no empty file
        try:
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(text)
        except OSError as error:  # a folder, a missing folder, no permission
            raise PlanError(f"a plan file must be writable, but got path={str(path)!r}: {error}") from None

    @classmethod
    def load(cls, path) -> "Plan":
        """The plan saved at ``path``; a PlanError naming the path when it is missing, unreadable, not text or not a plan."""
        _check_path(path)
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except FileNotFoundError:
            raise PlanError(f"a plan file must exist, but got path={str(path)!r}, which does not") from None
        except UnicodeDecodeError as error:
            raise PlanError(f"a plan file must be UTF-8 JSON text, but got path={str(path)!r}, which is not ({error.reason} at byte {error.start})") from None
        except (OSError, TypeError) as error:  # a folder, no permission, a path that is no path
            raise PlanError(f"a plan file must be readable, but got path={str(path)!r}: {error}") from None
        try:
            return cls.from_json(text)
        except PlanError as error:
            raise PlanError(f"plan file {str(path)!r}: {error}") from None
