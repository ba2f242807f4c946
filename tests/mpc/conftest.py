"""Fixtures for the SMPC tests: party sets and a seeded in-process dealer."""

import pytest
import torch

from veil.mpc.providers import LocalDealer

PARTY_SETS = {2: ("alice", "bob"), 3: ("alice", "bob", "charlie")}


@pytest.fixture(params=[2, 3], ids=["2party", "3party"])
def parties(request):
    return PARTY_SETS[request.param]


@pytest.fixture
def dealer():
    return LocalDealer(seed=1234)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(99)
