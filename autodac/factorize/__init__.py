"""The registry of factorisations: one file per method, each owning its math, modules and sizes.

A method is a class with the ``Factorization`` interface (``base.py``; most subclass
``SVDFactorization``), in its own file here, made available by one call::

    register_method(MyMethod())

after which ``optimize(..., methods=[...])``, ``build_factorized``, the parameter counts, the
CLI's help and the pictures all know it: they read ``METHODS`` (or ``method_table``), never a
table of their own.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

from autodac.errors import AutodacError
from autodac.factorize.base import BaseFactorization, Decomposition, Factorization, Factors, Geometry, output_matching_weight
from autodac.factorize.dac import DAC
from autodac.factorize.lowrank import LowRank
from autodac.factorize.spatial import Spatial
from autodac.factorize.transposed_dac import TransposedDAC

__all__ = [
    "METHODS", "BaseFactorization", "Decomposition", "Factorization", "Factors", "Geometry", "get_method", "register_method",
    "unregister_method", "method_table", "DAC", "TransposedDAC", "Spatial", "LowRank", "output_matching_weight",
]

METHODS: dict[str, Factorization] = {}  # in registration order, which is the order of legends and help
# Names a plan already gives other meanings: a hidden width, a dense layer, a width unit's producer option.
_RESERVED = ("width", "dense")


def register_method(method: Factorization) -> Factorization:
    """Make ``method`` (an instance) available under ``method.name``; returns it. A name can be registered once."""
    name = getattr(method, "name", None)
    if not isinstance(name, str) or not name.isidentifier() or name in _RESERVED:
        raise AutodacError(f"a method's `name` must be an identifier other than {list(_RESERVED)}, but got name={name!r}")
    if name in METHODS:
        raise AutodacError(f"a method name can be registered once, but {name!r} is already {type(METHODS[name]).__name__}")
    missing = [a for a in ("part_names", "implementations", "color", "params", "modules", "cost", "truncate") if not hasattr(method, a)]
    if missing:
        raise AutodacError(f"a registered method must have the whole `Factorization` interface, but {name!r} lacks {missing}")
    METHODS[name] = method
    return method


def unregister_method(name: str) -> Factorization:
    """Remove the method registered under ``name`` (tests that register a toy method); returns it."""
    method = get_method(name)
    del METHODS[name]
    return method


def get_method(name: str) -> Factorization:
    """The factorisation registered under ``name``; a clear error for an unknown one."""
    try:
        return METHODS[name]
    except KeyError:
        raise AutodacError(f"`method` must be one of {sorted(METHODS)}, but got method={name!r}") from None


class _Table(Mapping):
    """A live, read-only view of one attribute of every registered method, then fixed ``extra`` entries."""

    def __init__(self, attribute: str, extra: Mapping[str, Any] | None = None) -> None:
        self._attribute = attribute
        self._extra = dict(extra or {})

    def __getitem__(self, name: str) -> Any:
        if name in METHODS:
            return getattr(METHODS[name], self._attribute)
        return self._extra[name]

    def __iter__(self) -> Iterator[str]:
        yield from METHODS
        yield from (name for name in self._extra if name not in METHODS)

    def __len__(self) -> int:
        return len(METHODS) + sum(name not in METHODS for name in self._extra)

    def __repr__(self) -> str:
        return repr(dict(self))


def method_table(attribute: str, extra: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
    """``{name: getattr(method, attribute)}`` over the registered methods, always current, then ``extra``'s entries."""
    return _Table(attribute, extra)


for _method in (DAC(), TransposedDAC(), Spatial(), LowRank()):
    register_method(_method)
del _method
