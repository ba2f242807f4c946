"""Helpers shared by serving tests and bench/bench_serving.py (a unique module name: no clash with other conftests)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import veil as sy
from veil.datasets import load_mnist_5k
from veil.workers.registry import HookContext
from veil.workers.websocket_launcher import free_port


def new_cluster() -> sy.Cluster:
    return sy.Cluster(*[sy.NetworkWorker(f"127.0.0.1:{free_port()}") for _ in range(3)], auto_managed=True)


def served_small_model(cluster: sy.Cluster, name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A small MLP shared on ``cluster`` and served in the background, with its plaintext output on ones(1, 4)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    with torch.no_grad():
        expected = model(torch.ones(1, 4))
    model.share(cluster, name=name)
    model.serve(background=True)
    return model, expected


def assert_query_ok(client, expected: torch.Tensor) -> None:
    """An honest query of :func:`served_small_model` still gets the model's output."""
    assert torch.allclose(client.query_model(torch.ones(1, 4)), expected, atol=1e-2)


def mnist_cnn() -> nn.Sequential:
    """The three-party example's CNN: conv 16 - avgpool - relu - conv 32 - ... - dense 10."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.AvgPool2d(2), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.AvgPool2d(2), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.AvgPool2d(2), nn.ReLU(),
        nn.Flatten(), nn.Linear(64 * 3 * 3, 10),
    )


def train_briefly(model: nn.Module, data: dict, steps: int = 60, batch: int = 64, seed: int = 0) -> nn.Module:
    """A few Adam steps on shuffled rows (the bundled train rows are ordered by digit)."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    perm = torch.randperm(len(data["y_train"]))
    for i in range(steps):
        idx = perm[(i * batch) % len(perm):][:batch]
        loss = nn.functional.cross_entropy(model(data["x_train"][idx]), data["y_train"][idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


# ------------------------------------------------------------------ fixtures (imported by the test modules)


def _stop_services(cluster: sy.Cluster) -> None:
    """What :meth:`Cluster.stop` does first: stops the services still shared on ``cluster``."""
    services, cluster.services = cluster.services, []
    for service in services:
        try:
            service.stop()
        except Exception:
            pass


@pytest.fixture(scope="module")
def cluster(hook, serving_cluster_pool):
    """A started cluster (two parties + crypto provider) shared by a test module.

    Starting one costs three worker processes importing torch, so the modules take turns on one cluster
    (tests/conftest.py's ``serving_cluster_pool``, stopped at the end of the session): each module's
    tests share and serve models under their own names, and the services a module leaves are stopped
    when it ends, as a cluster of its own would have been. A module whose cluster lost a worker process
    leaves it to be replaced by a fresh one. Tests that kill workers, stop the cluster or change its
    settings start their own (:func:`new_cluster`).
    """
    c = serving_cluster_pool.get("cluster")
    if c is None or not c._processes or not all(p.alive() for p in c._processes):
        if c is not None:
            c.stop()
        c = serving_cluster_pool["cluster"] = new_cluster().start()
    yield c
    _stop_services(c)


@pytest.fixture
def client_for():
    """``client_for(cluster, in_shape, out_shape, name=..., token=...)``: a ModelClient with its own hook context.

    Its own context stands for another process: its connections never mix with the owner's.
    """
    made = []

    def make(cluster, in_shape, out_shape, **kwargs):
        client = sy.ModelClient(hook=HookContext(), timeout=kwargs.pop("timeout", 60))
        made.append(client)
        return client.connect_to_model(in_shape, out_shape, cluster, **kwargs)

    yield make
    for c in made:
        c.close()


@pytest.fixture(scope="module")
def mnist():
    return load_mnist_5k()


@pytest.fixture(scope="module")
def trained_cnn(mnist):
    return train_briefly(mnist_cnn(), mnist)
