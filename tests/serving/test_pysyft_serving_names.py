"""PySyft 0.2's serving spelling (issue #15 item 8): KerasHook, TFEWorker, TFECluster, numpy queries."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import veil as sy
from veil.serving import ServingError
from veil.serving.inputs import as_count, as_shape, as_tensor
from veil.workers.websocket_launcher import free_port

from serving_helpers import client_for, cluster  # noqa: F401  (fixtures)

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")


def _keras_model():
    keras.utils.set_random_seed(3)
    L = keras.layers
    return keras.Sequential([
        keras.Input((8, 8, 1)), L.Conv2D(4, 3, padding="same", activation="relu"), L.AveragePooling2D(2),
        L.Flatten(), L.Dense(3),
    ])


def test_tutorial_spelling_matches_keras_predict(hook, monkeypatch):
    model = _keras_model()
    images = np.random.default_rng(0).random((3, 8, 8, 1), dtype=np.float32)
    expected = model.predict(images, verbose=0)

    # --- the model owner (PySyft's notebook 1)
    sy.KerasHook(keras)
    alice, bob, carol = (sy.TFEWorker(host=f"localhost:{free_port()}", auto_managed=True) for _ in range(3))
    cluster = sy.TFECluster(alice, bob, carol)
    cluster.start()
    try:
        model.share(cluster)
        owner_done = threading.Event()

        def owner():
            model.serve(num_requests=3)
            model.stop()
            owner_done.set()

        threading.Thread(target=owner, daemon=True).start()

        # --- the client (PySyft's notebook 2): its own view of the cluster, addresses only
        monkeypatch.setenv("VEIL_CLIENT_TOKEN", cluster.client_token)
        client = sy.TFEWorker()
        workers = [sy.TFEWorker(host=w.address, auto_managed=False) for w in (alice, bob, carol)]
        client_cluster = sy.TFECluster(*workers)
        assert client_cluster.client_token is None and client_cluster.owner_token is None
        client.connect_to_model((1, 8, 8, 1), (1, 3), client_cluster)  # positional, as in PySyft
        got = np.concatenate([client.query_model(images[i:i + 1]) for i in range(3)])  # numpy in, numpy out
        client.close()
        assert owner_done.wait(120)
    finally:
        cluster.stop()
    assert isinstance(got, np.ndarray)
    np.testing.assert_allclose(got, expected, atol=5e-3)
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_keras_model_share_holds_only_pointers(cluster):
    from veil.serving.service import service_of

    sy.KerasHook(keras)
    model = _keras_model()
    model.share(cluster, name="keras-view")
    try:
        service = service_of(model)
        assert service.input_shape == (1, 8, 8, 1) and service.output_shape == (1, 3)
        assert service.holds_only_pointers()
    finally:
        model.stop()


def test_client_without_token_is_told_how():
    cluster = sy.TFECluster(*(sy.TFEWorker(host=f"localhost:{free_port()}") for _ in range(3)))
    os.environ.pop("VEIL_CLIENT_TOKEN", None)
    with pytest.raises(ServingError, match="VEIL_CLIENT_TOKEN"):
        sy.TFEWorker().connect_to_model((1, 4), (1, 2), cluster)
    with pytest.raises(ServingError, match="needs a host"):
        sy.TFECluster(sy.TFEWorker(), sy.TFEWorker(host="localhost:1"), sy.TFEWorker(host="localhost:2"))


def test_owner_token_cannot_fetch_a_clients_result(cluster, client_for):
    """The owner computes on shares but can never collect a client's output shares."""
    from torch import nn

    from veil.serving import protocol
    from veil.serving.service import service_of

    model = nn.Sequential(nn.Linear(3, 2)).eval()
    model.share(cluster, name="owner-blind")
    client = client_for(cluster, (1, 3), (1, 2), name="owner-blind")
    rid = client.submit(torch.ones(1, 3))
    model.serve(num_requests=1)
    service = service_of(model)
    for party in service.parties:
        with pytest.raises(ServingError, match="may not query"):
            protocol.call(service.hook.local_worker, party, "fetch", "owner-blind", rid)
    assert client.result(rid).shape == (1, 2)
    model.stop()


# ------------------------------------------------------------------ inputs from R / numpy


def test_r_style_shapes_and_counts():
    assert as_shape([1.0, 28.0, 28.0, 1.0]) == (1, 28, 28, 1)  # c(1, 28, 28, 1)
    assert as_shape(np.array([1.0, 10.0])) == (1, 10)
    assert as_shape((None, 4)) == (1, 4)  # Keras's unknown batch
    assert as_shape(torch.Size([2, 3])) == (2, 3)
    assert as_shape(None) is None and as_count(None) is None
    assert as_shape(5.0) == (5,)  # an R vector of length one arrives as a number
    assert as_count(3.0) == 3 and as_count(3) == 3 and as_count(np.array([3.0])) == 3
    for bad in ([1.5, 2], ["a"], [-1]):
        with pytest.raises(ServingError):
            as_shape(bad)
    for bad in (2.5, "3", True):
        with pytest.raises(ServingError):
            as_count(bad)
    with pytest.raises(ServingError, match="NULL"):
        as_tensor(None)
    with pytest.raises(ServingError):
        as_tensor(["a", "b"])


@settings(max_examples=50, deadline=None)
@given(hnp.arrays(np.float64, hnp.array_shapes(min_dims=1, max_dims=4, max_side=5),
                  elements=st.floats(-1e3, 1e3)), st.booleans())
def test_arrays_keep_their_indexing_in_any_memory_order(arr, fortran):
    # reticulate hands R arrays over as Fortran-ordered numpy arrays with R's indexing
    given_arr = np.asfortranarray(arr) if fortran else arr
    t = as_tensor(given_arr)
    assert t.dtype == torch.float32 and tuple(t.shape) == arr.shape
    assert torch.equal(t, torch.tensor(arr.tolist(), dtype=torch.float32).reshape(arr.shape))


def test_nested_lists_and_vectors():
    assert torch.equal(as_tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 3.0]))  # an R numeric vector
    assert as_tensor([[1, 2], [3, 4]]).shape == (2, 2)
