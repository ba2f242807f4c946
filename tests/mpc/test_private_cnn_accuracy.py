"""Accuracy bar of private inference: an MNIST CNN on 1,000 encrypted images.

The CNN (conv16 3x3 - avgpool2 - relu - conv32 3x3 - avgpool2 - relu -
conv64 3x3 - avgpool2 - relu - flatten - linear10) is trained in plaintext
on the 4,000 training images; the 1,000 test images are then classified with
model and images secret-shared between two workers. Bar: accuracy within
0.5 points of plaintext inference; also for the model as serving rewrites it
(``veil/serving/fuse.py``: conv-pool as one strided convolution, the ReLUs'
truncations folded into their comparisons; the weights as fixed operands,
``veil/serving/fixed_weights.py``), against the original's plaintext.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import veil as sy
from veil.datasets import load_mnist_5k


def mnist_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3), nn.AvgPool2d(2), nn.ReLU(),
        nn.Conv2d(16, 32, 3), nn.AvgPool2d(2), nn.ReLU(),
        nn.Conv2d(32, 64, 3), nn.AvgPool2d(2), nn.ReLU(),
        nn.Flatten(), nn.Linear(64, 10),
    )


@pytest.mark.slow
@pytest.mark.parametrize("fuse", [False, True])
def test_encrypted_cnn_accuracy_within_half_a_point(hook, fuse):
    data = load_mnist_5k()
    torch.manual_seed(0)
    model = mnist_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(4):
        perm = torch.randperm(4000)  # training rows are ordered by digit
        for start in range(0, 4000, 64):
            idx = perm[start : start + 64]
            opt.zero_grad()
            F.cross_entropy(model(data["x_train"][idx]), data["y_train"][idx]).backward()
            opt.step()
    model.eval()
    x_test, y_test = data["x_test"], data["y_test"]
    with torch.no_grad():
        plain_logits = model(x_test)
    acc_plain = (plain_logits.argmax(1) == y_test).float().mean().item()

    if fuse:
        from veil.serving.fuse import fuse_linear_layers

        assert fuse_linear_layers(model) == 6
    alice, bob = sy.VirtualWorker(hook, id=f"cnn_alice{fuse}"), sy.VirtualWorker(hook, id=f"cnn_bob{fuse}")
    cp = sy.VirtualWorker(hook, id=f"cnn_cp{fuse}")
    model.fix_precision().share(alice, bob, crypto_provider=cp)
    if fuse:  # as serving runs it: each weight's Beaver mask opened once
        from veil.serving.fixed_weights import fix_weights

        assert fix_weights(model) == 4
    logits = []
    with torch.no_grad():
        for start in range(0, len(y_test), 100):
            x = x_test[start : start + 100].fix_precision().share(alice, bob, crypto_provider=cp)
            logits.append(model(x).get().float_precision())
    logits = torch.cat(logits)
    acc_enc = (logits.argmax(1) == y_test).float().mean().item()

    assert acc_plain > 0.8
    assert abs(acc_enc - acc_plain) <= 0.005
    assert torch.allclose(logits, plain_logits, atol=1e-2)
    print(f"fuse={fuse}: plaintext {acc_plain:.4f}, encrypted {acc_enc:.4f}, "
          f"max logit error {(logits - plain_logits).abs().max():.2e}")
