"""Shared fixtures for the HE tests: small keys, built once per session."""

from __future__ import annotations

import os

import pytest

from veil.he import ckks, paillier


def pytest_collection_modifyitems(config, items):
    # Slow tests run only on request (VEIL_SLOW=1 or an explicit -m expression).
    if os.environ.get("VEIL_SLOW") == "1" or config.getoption("-m"):
        return
    skip = pytest.mark.skip(reason="slow: set VEIL_SLOW=1 or pass -m slow")
    for item in items:
        if "slow" in item.keywords and "tests/he" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def paillier_keys():
    return paillier.keygen(n_length=512)


@pytest.fixture(scope="session")
def other_paillier_keys():
    return paillier.keygen(n_length=512)


@pytest.fixture(scope="session")
def ckks_ctx():
    return ckks.context(poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40, 60], global_scale=2**40)


@pytest.fixture(scope="session")
def small_ckks_ctx():
    """No Galois keys: cheap to build, enough for elementwise ops."""
    return ckks.context(galois_keys=False)
