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
    """The bundled 2D example (engine.io.examples.bundled_case_2d), read from disk once per session."""
    from engine.io.examples import bundled_case_2d

    return bundled_case_2d()


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny problems run fastest so, and on the shared 2-core machine OpenMP
    spin-waits make 2 threads slower. Modules opt in with pytestmark = usefixtures("one_thread")."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
