"""Keras conversion against Keras's own predict, saved-model round trips, and `veil serve` end to end."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

import veil as sy
from veil.exceptions import VeilError
from veil.serving import ModelConversionError, load_model, save_model
from veil.workers.registry import HookContext
from veil.workers.websocket_launcher import free_port

from serving_helpers import client_for, cluster, mnist, mnist_cnn, train_briefly, trained_cnn  # noqa: F401  (fixtures)

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")


def _keras_cnn():
    keras.utils.set_random_seed(1)
    L = keras.layers
    return keras.Sequential([
        keras.Input((28, 28, 1)), L.Conv2D(16, 3, padding="same"), L.AveragePooling2D(2), L.Activation("relu"),
        L.Conv2D(32, 3, padding="same", activation="relu"), L.MaxPooling2D(2),
        L.Flatten(), L.Dense(10),
    ])


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_keras_file_converts_to_same_function(tmp_path, suffix):
    kmodel = _keras_cnn()
    x = torch.randn(4, 28, 28, 1)
    expected = torch.as_tensor(kmodel.predict(x.numpy(), verbose=0))
    kmodel.save(tmp_path / f"m{suffix}")
    model = load_model(tmp_path / f"m{suffix}")
    assert model.veil_input_shape == (1, 28, 28, 1)
    assert torch.allclose(model(x), expected, atol=1e-5)


def test_unsupported_keras_layer_is_named():
    kmodel = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="tanh")])
    with pytest.raises(ModelConversionError, match="tanh"):
        sy.serving.keras_to_torch(kmodel)


def test_pt_round_trip_and_refuses_pickled_code(tmp_path):
    model = mnist_cnn().eval()
    save_model(model, tmp_path / "m.pt", (1, 1, 28, 28))
    loaded = load_model(tmp_path / "m.pt")
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(loaded(x), model(x))
    torch.save(model, tmp_path / "whole.pt")  # a pickled module is not a veil model file
    with pytest.raises(ModelConversionError):
        load_model(tmp_path / "whole.pt")


def test_veil_serve_cli_end_to_end(tmp_path, mnist):
    model = train_briefly(mnist_cnn(), mnist, steps=40)
    save_model(model, tmp_path / "mnist.pt", (1, 1, 28, 28))
    ports = ",".join(str(free_port()) for _ in range(3))
    cluster_file = tmp_path / "cluster.json"
    proc = subprocess.Popen([sys.executable, "-m", "veil.cli", "serve", str(tmp_path / "mnist.pt"), "--auto", ports,
                             "--cluster-file", str(cluster_file), "--num-requests", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if "serving" in line:
                break
        else:
            pytest.fail("veil serve did not start")
        client = sy.ModelClient(hook=HookContext(), timeout=60)
        client.connect_to_model((1, 1, 28, 28), (1, 10), str(cluster_file))
        images = mnist["x_test"][:2]
        try:
            out = [client.query_model(images[:1])]
            rid = client.submit(images[1:2])
            time.sleep(3)  # the 2nd (last) query is computed meanwhile: serve must wait for its fetch
            out = torch.cat(out + [client.result(rid)])
        except VeilError:
            proc.kill()
            raise AssertionError("query failed; veil serve printed:\n" + proc.stdout.read()[-3000:]) from None
        client.close()
        assert torch.equal(out.argmax(1), model(images).argmax(1))
        assert proc.wait(60) == 0  # --num-requests 2 reached: the command ends by itself
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_mnist_200_images_match_plaintext(cluster, client_for, trained_cnn, mnist):
    images = mnist["x_test"][::5]  # 200 images, 20 of each digit (the test set is ordered by digit)
    with torch.no_grad():
        expected = trained_cnn(images).argmax(1)
    trained_cnn.share(cluster, input_shape=(1, 1, 28, 28), name="mnist-200", max_batch=20)
    trained_cnn.serve(background=True)
    try:
        client = client_for(cluster, (1, 1, 28, 28), (1, 10), name="mnist-200")
        got = []
        for start in range(0, 200, 20):  # one connection may hold at most 32 requests in service (queue cap)
            rids = [client.submit(images[i:i + 1]) for i in range(start, start + 20)]
            got += [client.result(r) for r in rids]
        got = torch.cat(got).argmax(1)
    finally:
        trained_cnn.stop()
    assert (got == expected).float().mean() >= 0.99


def test_cluster_passes_tokens_that_start_with_a_dash():
    # token_urlsafe can start with "-": "--token -abc" would read it as an option
    import argparse

    from veil.workers.websocket_cli import configure

    cluster = sy.Cluster(*(sy.NetworkWorker(f"127.0.0.1:{9000 + i}") for i in range(3)),
                         owner_token="-starts-with-dash")
    parser = argparse.ArgumentParser()
    configure(parser)
    args = parser.parse_args(["--id", "w0", *cluster.worker_args(cluster.workers[0])])
    assert args.token == "-starts-with-dash"
