"""PySyft 0.2's serving names (``sy.KerasHook``, ``sy.TFEWorker``, ``sy.TFECluster``) on veil's serving.

PySyft served Keras models through TF Encrypted::

    hook = sy.KerasHook(tf.keras)
    alice = sy.TFEWorker(host="localhost:4000", auto_managed=True)   # x3
    cluster = sy.TFECluster(alice, bob, carol); cluster.start()
    model.share(cluster); model.serve(num_requests=3); model.stop(); cluster.stop()

    client = sy.TFEWorker()                                  # another process
    client.connect_to_model(input_shape, output_shape, cluster)
    client.query_model(image)                                # numpy in, numpy-like out

The same spelling runs on veil with Keras 3 on its torch backend: a Keras
model *is* a ``torch.nn.Module`` there, so the verbs ``share``/``serve``/``stop``
that :class:`~veil.hook.TorchHook` gives every module already reach it, and
``model.share(cluster)`` converts the Keras model (``keras_to_torch``) before
secret-sharing it. :class:`KerasHook` therefore patches nothing: it makes sure
the TorchHook exists and checks the backend. (On another Keras backend a Keras
model is no torch module; there the hook adds the three verbs to
``keras.Model`` itself — never replacing an existing attribute.)

Differences from PySyft, on purpose: every worker needs a token. An
auto-managed cluster makes them at :meth:`TFECluster.start`; the owner hands
clients the *client* token (``cluster.save(path)`` writes it with the
addresses), and a client passes ``token=`` to ``connect_to_model`` or sets
``$VEIL_CLIENT_TOKEN``. The last worker is the crypto provider, as in TF
Encrypted's three-server Pond.
"""

from __future__ import annotations

import secrets
from typing import Any, Optional

from veil.serving.client import ModelClient
from veil.serving.cluster import OWNER_USER, Cluster, NetworkWorker
from veil.serving.errors import ServingError


class KerasHook:
    """``hook = sy.KerasHook(keras)``: Keras models get ``.share(cluster)``, ``.serve()``, ``.stop()``.

    Args:
        keras_module: The ``keras`` module (Keras 3; PySyft took ``tf.keras``).
    """

    def __init__(self, keras_module: Any = None) -> None:
        from veil.serving.keras_convert import import_keras
        from veil.serving.service import default_hook

        self.keras = keras_module if keras_module is not None else import_keras()
        if not hasattr(self.keras, "Model"):
            raise ServingError("sy.KerasHook expects the keras module (Keras 3), e.g. sy.KerasHook(keras)")
        self.torch_hook = default_hook()  # attaches share/serve/stop to torch.nn.Module
        self.backend = self.keras.backend.backend() if hasattr(self.keras, "backend") else "unknown"
        import torch

        if not issubclass(self.keras.Model, torch.nn.Module):
            _attach_to_keras(self.keras.Model)

    def __repr__(self) -> str:
        return f"<KerasHook keras {getattr(self.keras, '__version__', '?')} backend={self.backend}>"


def _attach_to_keras(model_class: type) -> None:
    from veil.serving.service import serve_model, share_on_cluster, stop_model

    def share(model: Any, cluster: Cluster, **kwargs: Any) -> Any:
        return share_on_cluster(model, cluster, **kwargs)

    for name, func in (("share", share), ("serve", serve_model), ("stop", stop_model)):
        if not hasattr(model_class, name):  # never replace a Keras attribute (a second hook finds them set)
            setattr(model_class, name, func)


class TFEWorker(NetworkWorker):
    """A cluster worker at ``host`` (``"localhost:4000"``), or with no host a *client*.

    Args:
        host: ``HOST:PORT`` of the worker; None for a client that only queries.
        auto_managed: :meth:`TFECluster.start` launches this worker's process.
        id: The worker's name (default: from its place in the cluster).
    """

    def __init__(self, host: Optional[str] = None, auto_managed: bool = True, id: Optional[str] = None,
                 timeout: float = 120.0) -> None:
        super().__init__(host or "", id=id)
        self.auto_managed = bool(auto_managed)
        self.timeout = timeout
        self._client: Optional[ModelClient] = None

    def connect_to_model(self, input_shape: Any, output_shape: Any, cluster: Any, token: Optional[str] = None,
                         name: Optional[str] = None, owner: Optional[str] = None,
                         **_tfe_options: Any) -> "TFEWorker":
        """Connects this client to the model served on ``cluster`` (PySyft's positional order).

        ``input_shape``/``output_shape`` may be tuples, ``torch.Size``, numpy
        arrays or R vectors; ``sess=`` and other TF Encrypted options are ignored.
        ``owner``: the model owner's user, when the cluster does not name it (``ModelClient``).
        """
        from veil.serving.service import DEFAULT_SERVICE

        self.close()
        self._client = ModelClient(timeout=self.timeout)
        self._client.connect_to_model(input_shape, output_shape, cluster, token=token, name=name or DEFAULT_SERVICE,
                                      owner=owner)
        return self

    def query_model(self, x: Any) -> Any:
        """The model's output for ``x`` (torch tensor, numpy array or R array), as a numpy array."""
        if self._client is None:
            raise ServingError("call connect_to_model(input_shape, output_shape, cluster) first")
        return self._client.query_model(x).numpy()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __repr__(self) -> str:
        if not self.address:
            return "<TFEWorker client>"
        return f"<TFEWorker {self.address}{' auto-managed' if self.auto_managed else ''}>"


class TFECluster(Cluster):
    """``sy.TFECluster(alice, bob, carol)``: parties first, the last worker deals crypto material.

    Auto-managed when every worker is (``TFEWorker(..., auto_managed=True)``):
    :meth:`start` then launches the processes and makes the tokens. A client's
    copy of the cluster (never started) only names addresses; the client token
    comes from ``connect_to_model(..., token=)`` or ``$VEIL_CLIENT_TOKEN``.
    """

    def __init__(self, *workers: NetworkWorker, crypto_provider: Optional[NetworkWorker] = None,
                 owner_token: Optional[str] = None, client_token: Optional[str] = None,
                 peer_token: Optional[str] = None, auto_managed: Optional[bool] = None,
                 owner_user: Optional[str] = OWNER_USER) -> None:
        if any(not w.address for w in [*workers, *([crypto_provider] if crypto_provider else [])]):
            raise ServingError("every cluster worker needs a host, e.g. TFEWorker(host='localhost:4000')")
        auto = all(getattr(w, "auto_managed", False) for w in workers) if auto_managed is None else auto_managed
        super().__init__(*workers, crypto_provider=crypto_provider, auto_managed=False, owner_token=owner_token,
                         client_token=client_token, peer_token=peer_token, owner_user=owner_user)
        self.auto_managed = auto

    def start(self) -> "TFECluster":
        if self.auto_managed:  # tokens are made by the one who starts the workers, not by every copy
            new = secrets.token_urlsafe
            self.owner_token = self.owner_token or new(24)
            self.client_token = self.client_token or new(24)
            self.peer_token = self.peer_token or new(24)
        super().start()
        return self
