"""Linear models evaluated on CKKS-encrypted inputs match plaintext accuracy."""

from __future__ import annotations

import pytest
import torch

from veil.datasets import load_mnist_5k, load_pima
from veil.he import evaluation as ev
from veil.he.errors import ShapeMismatchError


@pytest.fixture(scope="module")
def ctx():
    return ev.default_context()


def test_pima_logistic_regression(ctx):
    d = load_pima()
    w, b = ev.train_logistic_regression(d["x_train"], d["y_train"], epochs=150)
    res = ev.compare_plain_and_encrypted(d["x_test"], d["y_test"], w, b, ctx)
    assert res["plain"] > 0.7
    assert abs(res["plain"] - res["encrypted"]) <= 0.01
    assert res["max_abs_score_error"] < 1e-3


def test_mnist_linear_subset(ctx):
    d = ev.shuffled_split(load_mnist_5k(), n_test=1000)
    w, b = ev.train_softmax_regression(d["x_train"][:2000], d["y_train"][:2000], 10, epochs=3)
    res = ev.compare_plain_and_encrypted(d["x_test"][:100], d["y_test"][:100], w, b, ctx)
    assert res["plain"] > 0.8
    assert abs(res["plain"] - res["encrypted"]) <= 0.01
    assert res["max_abs_score_error"] < 1e-3


def test_batch_too_large(ctx):
    with pytest.raises(ShapeMismatchError):
        ev.encrypt_batch(torch.zeros(ctx.slots, 2), ctx, n_outputs=2)
