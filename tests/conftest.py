"""Shared fixtures: tiny random VAEs and CPU worker pools (gloo), started once per test session."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bagel_vae_pp.autoencoder import random_autoencoder  # noqa: E402
from bagel_vae_pp.pool import PoolSpec, get_pool, shutdown_all  # noqa: E402


@pytest.fixture(scope="session")
def tiny_vae():
    return random_autoencoder("tiny", seed=1)


@pytest.fixture(scope="session")
def tiny_sd_vae():
    return random_autoencoder("tiny-sd", seed=2)


@pytest.fixture(scope="session")
def cpu_pool():
    """Returns pools by worker count; all are shut down at the end of the session."""
    yield lambda workers: get_pool(PoolSpec.parse(f"cpu:{workers}", "fp32", 60))
    shutdown_all()
