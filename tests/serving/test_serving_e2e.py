"""Encrypted model serving end to end: real worker processes on loopback, clients, plaintext checks."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import veil as sy
from veil.serving import ServiceClosedError, ServingError
from veil.exceptions import PermissionDeniedError, VeilError

from serving_helpers import client_for, cluster, mnist, trained_cnn  # noqa: F401  (fixtures)


def _serve(model, cluster, name, input_shape, **share_kw):
    model.share(cluster, input_shape=input_shape, name=name, **share_kw)
    model.serve(background=True)
    return model


def test_mnist_cnn_three_workers_same_labels_as_plaintext(cluster, client_for, trained_cnn, mnist):
    images = mnist["x_test"][::250]  # 4 images of different digits (the test set is ordered by digit)
    with torch.no_grad():
        expected = trained_cnn(images)
    private = _serve(trained_cnn, cluster, "mnist-fast", (1, 1, 28, 28))
    try:
        client = client_for(cluster, (1, 1, 28, 28), (1, 10), name="mnist-fast")
        logits = torch.cat([client.query_model(img.unsqueeze(0)) for img in images])
    finally:
        private.stop()
    assert torch.equal(logits.argmax(1), expected.argmax(1))
    assert torch.allclose(logits, expected, atol=5e-2)


def test_owner_holds_only_pointers(cluster, hook):
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    model.share(cluster, name="owner-view")
    try:
        for p in model.parameters():
            shares = p.child.child  # FixedPrecision -> AdditiveSharing -> {party: pointer}
            assert all(isinstance(s, sy.PointerTensor) for s in shares.values())
    finally:
        model.stop()


def test_keras_model_matches_predict(cluster, client_for):
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    kmodel = keras.Sequential([
        keras.Input((10, 10, 2)), keras.layers.Conv2D(4, 3, activation="relu"), keras.layers.AveragePooling2D(2),
        keras.layers.Conv2D(6, 3, padding="same"), keras.layers.Activation("relu"), keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(), keras.layers.Dense(5),
    ])
    x = torch.randn(3, 10, 10, 2)
    expected = torch.as_tensor(kmodel.predict(x.numpy(), verbose=0))
    model = _serve(sy.serving.keras_to_torch(kmodel), cluster, "keras", None)
    try:
        client = client_for(cluster, (1, 10, 10, 2), (1, 5), name="keras")
        out = torch.cat([client.query_model(x[i:i + 1]) for i in range(3)])
    finally:
        model.stop()
    assert torch.allclose(out, expected, atol=5e-3)


def test_batched_requests_and_num_requests_bound(cluster, client_for):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    x = torch.randn(5, 6)
    with torch.no_grad():
        expected = model(x)
    model.share(cluster, name="bounded")
    client = client_for(cluster, (1, 6), (1, 2), name="bounded")
    rids = [client.submit(x[i:i + 1]) for i in range(4)]  # queued before serving: computed as one batch
    model.serve(num_requests=4)  # foreground; returns after four
    out = torch.cat([client.result(r) for r in rids])
    assert torch.allclose(out, expected[:4], atol=1e-3)
    with pytest.raises(ServiceClosedError):
        client.query_model(x[4:])


def test_wrong_token_is_refused(cluster):
    from veil.workers.registry import HookContext

    client = sy.ModelClient(hook=HookContext())
    with pytest.raises(VeilError):
        client.connect_to_model((1, 6), (1, 2), cluster, token="not-the-client-token")


def test_client_cannot_act_as_owner_or_read_other_requests(cluster, client_for):
    from veil.serving import protocol

    model = nn.Sequential(nn.Linear(3, 2)).eval()
    model.share(cluster, name="isolation")
    model.serve(background=True)
    try:
        a = client_for(cluster, (1, 3), (1, 2), name="isolation")
        b = client_for(cluster, (1, 3), (1, 2), name="isolation")
        rid = a.submit(torch.ones(1, 3))
        party = b.parties[0]
        with pytest.raises(PermissionDeniedError, match="client token may only submit"):
            protocol.call(b.hook.local_worker, party, "pending", "isolation")
        a.result(rid)  # a gets its answer ...
        rid2 = a.submit(torch.ones(1, 3))
        import time

        time.sleep(0.5)
        assert protocol.call(b.hook.local_worker, party, "fetch", "isolation", rid2) == []  # ... b never sees a's
        a.result(rid2)
    finally:
        model.stop()


def test_shape_mismatch_is_clear(cluster, client_for):
    model = nn.Sequential(nn.Linear(3, 2)).eval()
    model.share(cluster, name="shapes")
    try:
        with pytest.raises(ServingError, match="inputs of shape"):
            client_for(cluster, (1, 4), (1, 2), name="shapes")
    finally:
        model.stop()
