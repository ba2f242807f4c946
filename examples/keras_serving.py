"""Encrypted serving of a Keras model, with the client in a separate process.

The model owner trains a small Keras 3 CNN (torch backend) on MNIST in the
clear, secret-shares it on three workers it starts itself and answers three
private queries. The client — another Python process, started here with
``--client`` — connects with the client token from the cluster file and asks
for three predictions: its images and the answers never exist in the clear
outside the client, and the owner's process holds only pointers to shares.

    python examples/keras_serving.py            # owner; it launches the client
    python examples/keras_serving.py --client cluster.json   # a client by hand
"""

import os
import subprocess
import sys
import tempfile

os.environ.setdefault("KERAS_BACKEND", "torch")  # before the owner imports Keras: its models are torch modules

import numpy as np  # noqa: E402

import veil as sy  # noqa: E402
from veil.datasets import load_mnist_5k  # noqa: E402
from veil.workers.websocket_launcher import free_port  # noqa: E402

SHORT = os.environ.get("VEIL_EXAMPLE_SHORT") == "1"
PICKS = [0, 100, 200]  # test rows are sorted by digit: a 0, a 1 and a 2


def mnist_channels_last():
    data = load_mnist_5k()
    as_keras = lambda x: x.permute(0, 2, 3, 1).numpy()  # noqa: E731  (N, 28, 28, 1), as Keras wants
    return as_keras(data["x_train"]), data["y_train"].numpy(), as_keras(data["x_test"]), data["y_test"].numpy()


def client(cluster_file):
    """The client's process: three private queries, answered only here."""
    _, _, x_test, y_test = mnist_channels_last()
    desc = sy.TFECluster.load(cluster_file)  # addresses and the client token the owner handed out
    workers = [sy.TFEWorker(host=w.address, auto_managed=False) for w in desc.workers]
    cluster = sy.TFECluster(*workers)
    me = sy.TFEWorker()
    me.connect_to_model((1, 28, 28, 1), (1, 10), cluster, token=desc.client_token)
    for i in PICKS:
        logits = me.query_model(x_test[i:i + 1])  # a numpy array in, a numpy array out
        print(f"client: image {i} is a {y_test[i]}, the encrypted model says {int(logits.argmax())}")
    me.close()


def owner():
    import keras  # only the owner's process needs Keras (a few seconds to import): the client sends numpy arrays

    x_train, y_train, _, _ = mnist_channels_last()
    order = np.random.default_rng(0).permutation(len(x_train))  # the bundled rows are sorted by digit
    n = 640 if SHORT else len(x_train)
    x_train, y_train = x_train[order[:n]], y_train[order[:n]]

    keras.utils.set_random_seed(0)
    L = keras.layers
    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        L.Conv2D(16, 3, padding="same"), L.AveragePooling2D(2), L.Activation("relu"),
        L.Conv2D(32, 3, padding="same"), L.AveragePooling2D(2), L.Activation("relu"),
        L.Flatten(), L.Dense(10),
    ])
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(x_train, y_train, batch_size=32, epochs=1 if SHORT else 3, verbose=0)
    print(f"owner: trained on {n} images")

    sy.KerasHook(keras)  # Keras models get share/serve/stop (a global hook: nothing to keep)
    alice, bob, carol = (sy.TFEWorker(host=f"localhost:{free_port()}", auto_managed=True) for _ in range(3))
    cluster = sy.TFECluster(alice, bob, carol)  # carol, the last one, deals the crypto material
    cluster.start()
    try:
        model.share(cluster)
        print("owner: model shared; the owner holds only pointers:",
              sy.serving.service_of(model).holds_only_pointers())
        with tempfile.TemporaryDirectory() as tmp:
            cluster_file = cluster.save(os.path.join(tmp, "cluster.json"))
            the_client = subprocess.Popen([sys.executable, __file__, "--client", str(cluster_file)])
            model.serve(num_requests=len(PICKS))  # blocks until the client's three queries were answered
            model.stop()  # waits until the client fetched its last answer
            if the_client.wait(300) != 0:
                raise SystemExit("the client failed")
        print("owner: served", sy.serving.service_of(model).served, "private queries")
    finally:
        cluster.stop()


if __name__ == "__main__":
    args = sys.argv[1:]
    if args and (len(args) != 2 or args[0] != "--client"):
        print(f"usage: python {sys.argv[0]}  (the owner)  |  python {sys.argv[0]} --client CLUSTER_FILE",
              file=sys.stderr)
        sys.exit(2)
    try:
        if args:
            client(args[1])
        else:
            owner()
    except sy.serving.ServingError as e:  # a missing or damaged cluster file, a stopped service: one line
        sys.exit(f"{os.path.basename(sys.argv[0])}: error: {e}")
