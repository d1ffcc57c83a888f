"""Shared pytest fixtures: seeded random generators and the bundled example (loaded once)."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture
def rng() -> np.random.Generator:
    """A fresh seeded NumPy generator per test, so every test is reproducible on its own."""
    return np.random.default_rng(20240619)


@pytest.fixture
def torch_gen() -> torch.Generator:
    """A fresh seeded CPU torch generator per test."""
    return torch.Generator().manual_seed(20240619)


@pytest.fixture(scope="session")
def bundled_2d() -> dict:
    """The bundled 2D example (engine.examples.bundled_case_2d), read from disk once per session."""
    from engine.examples import bundled_case_2d

    return bundled_case_2d()
