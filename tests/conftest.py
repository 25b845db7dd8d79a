"""Shared test settings: one thread (the machine is shared) and a fixed seed for every test."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fixed_seed() -> None:
    torch.manual_seed(0)


def pytest_configure(config: pytest.Config) -> None:
    # fvcore imports torch.jit.script, which torch 2.13 deprecates (a warning attributed to torch.jit).
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script` is deprecated:DeprecationWarning")
