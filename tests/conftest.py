"""Seeded fixtures shared by the suite. Real-model fixtures are session-scoped: each loads once."""

from __future__ import annotations

import fcntl
import os
import random

import numpy as np
import pytest
import torch

from tests import helpers

_LOCK = None


def pytest_configure(config) -> None:
    """Serialize test sessions on one machine: two torch processes on 2 cores run ~10x slower."""
    global _LOCK
    _LOCK = open(os.environ.get("MECHICL_TEST_LOCK", "/tmp/mechicl-pytest.lock"), "w")
    fcntl.flock(_LOCK, fcntl.LOCK_EX)


def pytest_unconfigure(config) -> None:
    if _LOCK is not None:
        _LOCK.close()  # releases the lock


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny():
    return helpers.tiny_model()


@pytest.fixture(scope="session")
def toy():
    return helpers.toy_task()


@pytest.fixture(scope="session")
def real():
    """The embedded default model (Gemma-3-270M), loaded once per session."""
    from mechicl.models.loading import load_model
    from mechicl.models.registry import DEFAULT_MODEL

    return load_model(DEFAULT_MODEL)
