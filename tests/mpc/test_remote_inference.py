"""Encrypted inference of small CNNs over VirtualWorkers, against plaintext."""

import pytest
import torch
from torch import nn

import veil as sy
from veil.datasets import load_mnist_5k


def _workers(hook, n):
    parties = [sy.VirtualWorker(hook, id=f"party{i}") for i in range(n)]
    return parties, sy.VirtualWorker(hook, id="crypto_provider")


@pytest.fixture(scope="module")
def trained_cnn():
    torch.manual_seed(0)
    data = load_mnist_5k()
    model = nn.Sequential(
        nn.Conv2d(1, 4, 5, stride=2), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(4 * 6 * 6, 10),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    perm = torch.randperm(len(data["y_train"]))
    for start in range(0, 4000, 100):
        idx = perm[start : start + 100]
        loss = nn.functional.cross_entropy(model(data["x_train"][idx]), data["y_train"][idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, data["x_test"][::97][:6]


def test_private_cnn_inference_matches_plaintext_argmax(trained_cnn, hook):
    model, images = trained_cnn
    with torch.no_grad():
        expected = model(images)
    parties, cp = _workers(hook, 2)
    private = nn.Sequential(*[m for m in model]).eval()  # a copy of the structure...
    private.load_state_dict(model.state_dict())  # ...with the same weights
    private.fix_precision().share(*parties, crypto_provider=cp)
    x = images.fix_precision().share(*parties, crypto_provider=cp)
    with torch.no_grad():
        out = private(x).get().float_precision()
    assert torch.equal(out.argmax(dim=1), expected.argmax(dim=1))
    assert torch.allclose(out, expected, atol=5e-2)


def test_three_party_mlp_with_avgpool(hook):
    torch.manual_seed(1)
    model = nn.Sequential(nn.AvgPool2d(2), nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    images = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        expected = model(images)
    parties, cp = _workers(hook, 3)
    model.fix_precision().share(*parties, crypto_provider=cp)
    with torch.no_grad():
        out = model(images.fix_precision().share(*parties, crypto_provider=cp)).get().float_precision()
    assert torch.allclose(out, expected, atol=1e-3)
    model.float_precision()
    assert torch.allclose(model(images), expected, atol=1e-3)
