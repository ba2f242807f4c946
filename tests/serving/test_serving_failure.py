"""A worker that dies: queries fail with a clear error, never a wrong answer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from veil.serving import ServingError

from serving_helpers import client_for, new_cluster  # noqa: F401  (fixtures)


def test_party_failure_makes_queries_fail_clearly(hook, client_for):
    cluster = new_cluster().start()
    try:
        model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
        model.share(cluster, name="fragile")
        model.serve(background=True)
        client = client_for(cluster, (1, 4), (1, 2), name="fragile", timeout=20)
        assert client.query_model(torch.ones(1, 4)).shape == (1, 2)
        cluster.process(cluster.parties[1].id).kill()
        # Unreachable party, failed request or closed service, depending on who notices first.
        with pytest.raises(ServingError, match="unreachable|failed|error"):
            client.query_model(torch.ones(1, 4))
        model.stop()
    finally:
        cluster.stop()


@pytest.mark.slow
def test_crypto_provider_failure_fails_requests(hook, client_for):
    cluster = new_cluster().start()
    try:
        model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
        model.share(cluster, name="no-dealer")
        model.serve(background=True)
        client = client_for(cluster, (1, 4), (1, 2), name="no-dealer", timeout=20)
        cluster.process(cluster.crypto_provider.id).kill()
        with pytest.raises(ServingError, match="unreachable|failed|error"):
            client.query_model(torch.randn(3, 4))  # a new shape: needs fresh material from the dealer
        model.stop()
    finally:
        cluster.stop()
