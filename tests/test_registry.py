"""The registry of factorisations: each method's class owns its sizes, modules and colour; a new one is one registration.

Every registered method's closed-form parameter count must equal the count of the pair
``build_factorized`` builds, at every rank and implementation. A toy method registered here
(a renamed low-rank split) must reach ``optimize``, the CLI's help and the pictures without
any other edit, and is unregistered afterwards so other tests never see it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autodac
from autodac.api import _params_after
from autodac.cli import build_parser
from autodac.cost import count_params
from autodac.errors import AutodacError
from autodac.factorize import METHODS, LowRank, get_method, register_method, unregister_method
from autodac.layers import IMPLEMENTATIONS, build_factorized
from autodac.plots import METHOD_COLORS
from autodac.testing import SmallConvNet, conv_configs, linear_configs, method_cases

_CONFIGS = conv_configs() + linear_configs()


@pytest.mark.parametrize("index,method", [(i, m) for i, m, _ in method_cases(_CONFIGS)], ids=[t for _, _, t in method_cases(_CONFIGS)])
def test_params_at_every_rank_equal_the_built_pair(index, method):
    module = _CONFIGS[index].module
    factorization = METHODS[method]
    shape = tuple(module.weight.shape)
    decomposition = factorization.decompose(module.weight)
    impls = factorization.implementations if not isinstance(module, nn.Linear) else ("",)
    for rank in range(1, factorization.max_rank(shape) + 1):
        expected = factorization.params(shape, rank, module.bias is not None)
        assert _params_after(module, method, rank) == expected
        for impl in impls:
            built = build_factorized(module, method, rank, decomposition, impl)
            assert count_params(built) == expected, (rank, impl)
            assert [name for name, _ in built.named_children()] == list(factorization.part_names)


def test_registry_tables_are_read_from_the_methods():
    assert list(IMPLEMENTATIONS) == list(METHODS)
    assert IMPLEMENTATIONS["dac"] == ("grouped", "split") and IMPLEMENTATIONS["lowrank"] == ("",)
    assert dict(METHOD_COLORS) == {
        "dac": "#1f77b4", "tdac": "#9467bd", "spatial": "#ff7f0e", "lowrank": "#2ca02c", "width": "#d62728", "dense": "#b0b0b0",
    }


def test_unknown_method_is_refused_by_name():
    conv = nn.Conv2d(3, 4, 3)
    for call in (lambda: _params_after(conv, "svd", 2), lambda: build_factorized(conv, "svd", 2), lambda: get_method("svd")):
        with pytest.raises(AutodacError, match=r"`method` must be one of \[.*'dac'.*\], but got method='svd'"):
            call()
    with pytest.raises(AutodacError, match="registered once.*'lowrank' is already LowRank"):
        register_method(LowRank())  # name "lowrank" is taken
    with pytest.raises(AutodacError, match="identifier other than.*'width'"):
        register_method(type("Width", (LowRank,), {"name": "width"})())


class Toy(LowRank):
    """A renamed low-rank split: its whole definition is this class and the one registration below."""

    name = "toy"
    color = "#123456"


@pytest.fixture
def toy():
    method = register_method(Toy())
    try:
        yield method
    finally:
        unregister_method("toy")
    assert "toy" not in METHODS


def test_a_registered_method_reaches_optimize_help_and_plots(toy, tmp_path):
    model = SmallConvNet().eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    result = autodac.optimize(model, flops_budget=0.7, example_inputs=x, progress=False, methods=["toy"], widths=False)
    methods = {choice.method for choice in result.plan.layers.values() if not choice.is_dense}
    assert methods == {"toy"}
    layers = [m for m in result.model.modules() if isinstance(m, autodac.layers.FactorizedLayer)]
    assert layers and all(m.method == "toy" and [n for n, _ in m.named_children()] == ["reduce", "expand"] for m in layers)
    for name, choice in result.plan.layers.items():  # the plan's counts are the toy's own (inherited) formula
        if not choice.is_dense:
            assert count_params(result.model.get_submodule(name)) == choice.params_after

    commands = build_parser()._subparsers._group_actions[0].choices
    for command in ("optimize", "profile"):
        assert "dac,tdac,spatial,lowrank,toy" in " ".join(commands[command].format_help().split())

    assert METHOD_COLORS["toy"] == "#123456" and list(METHOD_COLORS)[-3:] == ["toy", "width", "dense"]
    assert IMPLEMENTATIONS["toy"] == ("",)
    pytest.importorskip("matplotlib")
    from autodac.plots import ranks_per_layer

    ranks_per_layer({"toy": result.plan}, tmp_path / "ranks.png")
    assert (tmp_path / "ranks.png").stat().st_size > 0
