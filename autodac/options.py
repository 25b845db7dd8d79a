"""``optimize``'s options as values: each group a frozen dataclass owning its defaults, rules and help.

An option's default, the rule its value must follow and its one-line help are written once, in
a field here. ``autodac.optimize``'s flat keywords take their defaults from these classes, the CLI
its flags' defaults and help, the README its table of options (``markdown_table``) and a shared
search its fingerprint (the fields flagged ``fingerprint``). A new group is one dataclass listed
in ``GROUPS``, its keyword in ``optimize``'s signature and its field in ``api._Settings``.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable

import numpy as np

from autodac.errors import AutodacError
from autodac.factorize import METHODS, get_method
from autodac.probes import DEFAULT_PROBE_SIZE, OUTPUT_KIND_CHOICES

__all__ = [
    "ProbeOptions", "FitOptions", "SearchOptions", "StudyOptions", "DistillOptions", "GROUPS", "DEFAULT_METHODS", "Rule",
    "option_fields", "fingerprinted", "markdown_table",
]

# Transposed DAC ("tdac") is opt-in: it keeps more than DAC, but its pointwise-then-grouped pair runs
# slowly on CPUs, which made each probe evaluation of the search ~50% slower (ResNet-20: 68 s against 45 s).
DEFAULT_METHODS = ("dac", "spatial", "lowrank")


@dataclass(frozen=True)
class Rule:
    """What an option's value must satisfy: ``text`` for the docs, ``holds`` the test, ``refusal`` the error's opening."""

    text: str
    holds: Callable[[Any], bool]
    refusal: str  # formatted with the option's name; the error adds ", but got name=value"

    def check(self, name: str, value: Any) -> None:
        """Raise ``AutodacError`` naming the rule and the value when ``value`` breaks it."""
        if not self.holds(value):
            raise AutodacError(f"{self.refusal.format(name=name)}, but got {name}={value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # NumPy's integers too (stored as int)


def _plain_number(value: Any) -> Any:
    """NumPy's scalars as Python's ``int``/``float`` (what plans, studies and JSON take); anything else as it is."""
    if isinstance(value, bool) or type(value) in (int, float):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def at_least(low: int) -> Rule:
    """An integer ``>= low``."""
    return Rule(f"integer >= {low}", lambda v: _is_int(v) and v >= low, f"`{{name}} >= {low}` must hold (an integer)")


POSITIVE_ERROR = Rule("> 0", lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool) and v > 0,
                      "`{name} > 0` must hold (a relative output error)")
SYNTHESIS_COUNT = Rule("0 (off) or integer >= 2", lambda v: _is_int(v) and (v == 0 or v >= 2),
                       "`{name}` must be 0 (off) or an integer >= 2 (inputs to synthesise)")
POSITIVE = Rule("> 0 and finite", lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool) and 0 < v < float("inf"),
                "`{name}` must be a positive finite number")
NON_NEGATIVE = Rule(">= 0 and finite", lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool) and 0 <= v < float("inf"),
                    "`{name}` must be a finite number >= 0")
SEED = Rule("integer from 0 to 2**32 - 1", lambda v: _is_int(v) and 0 <= v < 2**32,
            "`{name}` must be an integer from 0 to 2**32 - 1 (what Optuna's and NumPy's generators take)")
OPTIONAL_POSITIVE = Rule("None or > 0 and finite", lambda v: v is None or POSITIVE.holds(v), "`{name}` must be None or a positive finite number")
OUTPUT_KIND = Rule(" or ".join(repr(k) for k in OUTPUT_KIND_CHOICES), lambda v: v in OUTPUT_KIND_CHOICES,
                   "`{name}` must be one of " + ", ".join(repr(k) for k in OUTPUT_KIND_CHOICES))
SWITCH = Rule("True or False", lambda v: isinstance(v, (bool, np.bool_)), "`{name}` must be True or False (a switch)")
WEIGHTINGS = Rule("'batchnorm' or 'none'", lambda v: v in ("batchnorm", "none"), "`{name}` must be 'batchnorm' or 'none'")


def _names(option: str, what: str, value: Any) -> tuple[str, ...]:
    """One string or an iterable of strings as a tuple; anything else refused naming ``option`` and the value."""
    if isinstance(value, str):
        return (value,)
    try:
        names = tuple(value)
    except TypeError:
        names = None
    if names is None or not all(isinstance(name, str) for name in names):
        raise AutodacError(f"`{option}` must be one {what} or a list of them (strings), but got {option}={value!r}")
    return names


def _switch(value: Any) -> Any:
    """NumPy's booleans as Python's (what plans, studies and JSON take); anything else as it is, for ``SWITCH`` to judge."""
    return bool(value) if isinstance(value, np.bool_) else value


def _methods(methods: Iterable[str] | str) -> tuple[str, ...]:
    """The factorisation names as a tuple in the registry's order, each one registered (the registry refuses an unknown name).

    They are a set: named in any order (or twice) they plan alike, and workers of one shared search
    that list them differently measure the same options.
    """
    methods = _names("methods", "factorisation name", methods)
    if not methods:
        raise AutodacError(f"`methods` must name at least one of {sorted(METHODS)}, but got methods={methods!r}")
    for name in methods:
        get_method(name)
    return tuple(name for name in METHODS if name in methods)


def _patterns(patterns: Iterable[str] | str) -> tuple[str, ...]:
    """One glob pattern or several, as a tuple."""
    return _names("exclude", "glob pattern of layer names", patterns)


def _option(default: Any, help: str, rule: Rule | None = None, *, fingerprint: bool = False,
            convert: Callable[[Any], Any] | None = None) -> Any:
    """A field whose metadata says what the option is for (``help``), what it must satisfy, and whether a study records it."""
    return field(default=default, metadata={"help": help, "rule": rule, "fingerprint": fingerprint, "convert": convert})


class _Options:
    """What every group shares: each field converted (``convert``) and checked (``rule``) when the group is made."""

    keyword: ClassVar[str]  # the keyword ``optimize`` takes the group by

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.metadata["convert"] is not None:
                value = f.metadata["convert"](value)
                object.__setattr__(self, f.name, value)
            if f.metadata["rule"] is not None:
                f.metadata["rule"].check(f.name, value)
                if _plain_number(value) is not value:
                    object.__setattr__(self, f.name, _plain_number(value))


@dataclass(frozen=True)
class FitOptions(_Options):
    """Which options each layer has and how their factors are fitted."""

    keyword: ClassVar[str] = "fit"
    methods: tuple[str, ...] = _option(
        DEFAULT_METHODS, "factorisations the planner may choose per layer",
        fingerprint=True, convert=_methods)
    exclude: tuple[str, ...] = _option(
        (), "glob patterns of layer names, or of modules holding them, to keep dense (one matching no layer is refused)",
        fingerprint=True, convert=_patterns,
    )
    weighting: str = _option("batchnorm", "weigh output channels by the BatchNorm that follows, or not", WEIGHTINGS, fingerprint=True)
    fit_to_data: bool = _option(True, "fit each layer to its probe inputs' covariance (output error, not weight error)", SWITCH,
                               fingerprint=True, convert=_switch)
    sequential_fit: bool = _option(
        True, "re-fit the chosen layers in execution order to the decomposed model's own inputs", SWITCH, fingerprint=True,
        convert=_switch)
    refit_candidates: int = _option(
        1, "re-fit the search's K best plans and keep the best on held-out probe examples", at_least(1), fingerprint=True)
    max_layer_error: float = _option(0.5, "cap on a layer's predicted relative output error, when the budget allows", POSITIVE_ERROR)
    widths: bool = _option(
        True, "also offer narrower hidden widths (channel chains) as options, whatever `methods` lists (`methods=[\"dac\"]` still "
        "narrows 1x1 chains); in a study's fingerprint when off", SWITCH, convert=_switch,
    )


@dataclass(frozen=True)
class ProbeOptions(_Options):
    """The probe: how much of the data is kept, how it is measured, or how it is synthesised without data."""

    keyword: ClassVar[str] = "probe"
    probe_size: int = _option(DEFAULT_PROBE_SIZE, "probe examples kept from `data` (at most)", at_least(2))
    profile_size: int = _option(
        128, "probe examples each sensitivity measurement runs on (at most the held-out half and what one 2 GiB recorded pass holds; "
        "a cap below a size asked is noted)", at_least(1), fingerprint=True,
    )
    profile_points: int = _option(4, "options measured per layer (the rest read off its loss curve)", at_least(1), fingerprint=True)
    synthesize: int = _option(0, "without data: plan on N inputs synthesised to match the model's BatchNorm statistics", SYNTHESIS_COUNT)
    reestimate_bn: bool = _option(
        True, "re-estimate BatchNorm statistics on the probe, kept only when held-out examples say it helps", SWITCH,
        fingerprint=True, convert=_switch)
    output_kind: str = _option(
        "auto", "what the model's outputs are, so the probe compares them fittingly: 'auto' reads it off them; 'scores' "
        "(softmax KL, top-1), 'distribution', 'probabilities' (Bernoulli KL) or 'values' (squared error, R^2); "
        "in a study's fingerprint when not 'auto'", OUTPUT_KIND)

    def check_combined(self) -> None:
        """Rules across fields, checked on the options ``optimize`` ends up with (flat and grouped merged), not on each part."""
        if self.synthesize > self.probe_size:  # a probe never holds more; a huge N would fill memory before a word
            raise AutodacError(
                f"`synthesize` must be at most `probe_size` (the most examples a probe holds), but got synthesize={self.synthesize} "
                f"and probe_size={self.probe_size}; raise probe_size too to synthesise more"
            )


@dataclass(frozen=True)
class SearchOptions(_Options):
    """The Optuna search that refines the allocation (with data, ``synthesize`` or ``evaluate``)."""

    keyword: ClassVar[str] = "search"
    n_trials: int = _option(16, "Optuna trials of the search", at_least(1))
    timeout: float | None = _option(None, "stop the search after this many seconds (None: no limit)", OPTIONAL_POSITIVE)
    seed: int = _option(
        0, "seed of the search, the synthesis and data-free fits; seeded runs without timeout repeat exactly at one thread count "
        "(another sums floats in another order: the last digits move)", SEED,
    )
    pareto: bool = _option(False, "two-objective search (FLOPs and the probe objective); `result.pareto` lists the front",
                           SWITCH, fingerprint=True, convert=_switch)


@dataclass(frozen=True)
class StudyOptions(_Options):
    """Where a shared search is kept: an Optuna storage and the study every worker names."""

    keyword: ClassVar[str] = "study"
    storage: Any = _option(None, "the Optuna storage (URL, .journal file or storage object) that keeps the search, instead of memory")
    study_name: str | None = _option(None, "the name of the search in `storage`, the same for every worker")


@dataclass(frozen=True)
class DistillOptions(_Options):
    """A short training of the decomposed model towards the original's outputs on the probe (``autodac.distill``), off unless asked.

    Given as ``optimize(..., distill=True)`` (these defaults) or ``distill=DistillOptions(epochs=4)``;
    its fields are not flat keywords of ``optimize``.
    """

    keyword: ClassVar[str] = "distill"
    epochs: int = _option(10, "passes over the probe's calibration half, each kept only if the held-out half scores it best so far", at_least(1))
    lr: float = _option(3e-4, "Adam's first peak learning rate (warm-up, cosine decay; divided by 3 at each epoch undone)", POSITIVE)
    batch_size: int = _option(0, "examples a step (0: at most 32, fewer for large inputs or layer outputs)", at_least(0))
    mixup: float = _option(0.5, "Beta parameter of the pair mixing of inputs (0: the inputs as they are)", NON_NEGATIVE)
    features: float = _option(1.0, "weight of matching the changed layers' outputs (0: the model's outputs only)", NON_NEGATIVE)
    seed: int = _option(0, "seed of the batch order and the mixing", SEED)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


# In the order a shared search's fingerprint records their flagged fields (that of the studies made before the groups).
GROUPS: tuple[type[_Options], ...] = (FitOptions, ProbeOptions, SearchOptions, StudyOptions)


def option_fields() -> dict[str, tuple[type[_Options], dataclasses.Field]]:
    """Every option by name: its group and its field (default, help, rule, fingerprint flag)."""
    return {f.name: (group, f) for group in GROUPS for f in dataclasses.fields(group)}


def fingerprinted(groups: Iterable[_Options]) -> dict[str, Any]:
    """The values of ``groups``' fields a shared search records (what makes one search another), in field order."""
    return {f.name: getattr(g, f.name) for g in groups for f in dataclasses.fields(g) if f.metadata["fingerprint"]}


def markdown_table() -> str:
    """The README's table of options, made from the fields (``tests/test_options.py`` checks the committed one)."""
    lines = ["| option | group | default | must be | in a study's fingerprint | what it does |", "|---|---|---|---|---|---|"]
    grouped_only = [(f"`{f.name}` (only in `distill=`)", DistillOptions, f) for f in dataclasses.fields(DistillOptions)]
    for name, group, f in [(f"`{name}`", group, f) for name, (group, f) in option_fields().items()] + grouped_only:
        rule = f.metadata["rule"].text if f.metadata["rule"] is not None else ""
        fingerprint = "yes" if f.metadata["fingerprint"] else ""
        lines.append(f"| {name} | `{group.__name__}` | `{f.default!r}` | {rule} | {fingerprint} | {f.metadata['help']} |")
    return "\n".join(lines)
