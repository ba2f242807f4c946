"""Encrypted model serving end to end: real worker processes on loopback, clients, plaintext checks."""

from __future__ import annotations

import os
import time

import pytest
import torch
from torch import nn

import veil as sy
from veil.serving import ServiceClosedError, ServingError
from veil.exceptions import PermissionDeniedError, VeilError
from veil.serving import RequestFailedError
from veil.tensors.mpc_glue import runtime as mpc_runtime
from veil.tensors.mpc_glue.runtime import RUNTIME

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


# ------------------------------------------ concurrent protocol rounds: a round failing mid-query


def _rounds_model():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()


def test_a_party_refusing_mid_round_fails_that_query_and_the_next_one_is_right(cluster, client_for, monkeypatch):
    model = _rounds_model()
    x = torch.randn(1, 6)
    with torch.no_grad():
        expected = model(x)
    model.share(cluster, name="rounds-refuse", input_shape=(1, 6))
    model.serve(background=True)
    try:
        client = client_for(cluster, (1, 6), (1, 3), name="rounds-refuse", timeout=60)
        assert torch.allclose(client.query_model(x), expected, atol=1e-2)
        real_open, calls = RUNTIME.open_on_parties, []

        def one_party_refuses(name, per_party, kwargs):
            calls.append(name)
            if len(calls) == 2:  # mid-query: the second opening; the first party gets a step it must refuse
                first = [mpc_runtime._first_pointer(args) for args in per_party]  # (a list of shares may lead)
                requests = [(p.owner, mpc_runtime.OpenMessage(n, mpc_runtime._wire(tuple(args)), kwargs), p.location)
                            for n, args, p in zip(["not_a_step"] + [name] * (len(per_party) - 1), per_party, first)]
                return [list(r.objects) for r in mpc_runtime.one_round(requests, f"opening {name!r}")]
            return real_open(name, per_party, kwargs)

        monkeypatch.setattr(RUNTIME, "open_on_parties", one_party_refuses)
        with pytest.raises(RequestFailedError, match="MPCError while computing"):
            client.query_model(x)
        assert len(calls) >= 2
        monkeypatch.setattr(RUNTIME, "open_on_parties", real_open)
        for _ in range(2):  # the deferred steps of the failed query broke nothing
            assert torch.allclose(client.query_model(x), expected, atol=1e-2)
        assert model_service_alive(model)
    finally:
        model.stop()


@pytest.mark.parametrize("fuse", [True, False])
def test_an_owner_side_failure_mid_query_leaves_no_queued_step_behind(cluster, client_for, monkeypatch, fuse):
    model = _rounds_model()
    xs = torch.randn(3, 6)
    with torch.no_grad():
        expected = model(xs)
    name = f"rounds-owner-{fuse}"
    model.share(cluster, name=name, input_shape=(1, 6), fuse=fuse)
    model.serve(background=True)
    try:
        client = client_for(cluster, (1, 6), (1, 3), name=name, timeout=60)
        from veil.mpc import bit_comparison
        from veil.mpc.errors import MPCError
        from veil.tensors.mpc_glue import maximum

        # the fused Linear -> ReLU truncates inside its comparison (veil/serving/fuse.py)
        where, step = (bit_comparison, "truncate_relu") if fuse else (maximum, "sign_select")
        real = getattr(where, step)
        failed = []

        def fail_once(*args, **kwargs):  # after the first layer's product: its last steps are still queued
            if not failed:
                failed.append(1)
                raise MPCError("injected failure")
            return real(*args, **kwargs)

        monkeypatch.setattr(where, step, fail_once)
        with pytest.raises(RequestFailedError):
            client.query_model(xs[:1])
        outs = torch.cat([client.query_model(xs[i:i + 1]) for i in range(3)])
        assert torch.allclose(outs, expected, atol=1e-2)
    finally:
        model.stop()


def test_an_unexpected_owner_side_error_fails_the_claimed_query_at_once(cluster, client_for, monkeypatch):
    # Not a VeilError (a bug in the orchestrator): the service stops, and the client whose batch was
    # claimed gets an error instead of waiting out its timeout.
    model = _rounds_model()
    model.share(cluster, name="rounds-bug", input_shape=(1, 6))
    model.serve(background=True)
    try:
        client = client_for(cluster, (1, 6), (1, 3), name="rounds-bug", timeout=120)
        def bug(*args, **kwargs):  # after the batch was claimed: mid-computation
            raise ZeroDivisionError("a bug in the orchestrator")

        monkeypatch.setattr(RUNTIME, "open_on_parties", bug)
        started = time.monotonic()
        with pytest.raises(RequestFailedError, match="serving stopped"):
            client.query_model(torch.randn(1, 6))
        assert time.monotonic() - started < 60  # well before the client's timeout (120 s)
        # the claimed client is told first (its waiting fetch wakes at once), then the serving thread records
        # the error and ends: give it that moment, then it must have stopped
        from veil.serving.service import service_of

        service_of(model)._thread.join(10)
        assert not model_service_alive(model)
    finally:
        model.stop()


def model_service_alive(model) -> bool:
    from veil.serving.service import service_of

    svc = service_of(model)
    return svc.error is None and svc._thread is not None and svc._thread.is_alive()
