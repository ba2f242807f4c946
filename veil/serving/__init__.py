"""Encrypted model serving: a model secret-shared on a cluster answers private queries.

* :mod:`~veil.serving.cluster` — ``NetworkWorker``, ``Cluster`` (auto-managed worker processes, tokens)
* :mod:`~veil.serving.service` — the owner's side (``model.share(cluster)``, ``model.serve()``)
* :mod:`~veil.serving.client` — ``ModelClient`` (shares inputs, reconstructs outputs)
* :mod:`~veil.serving.protocol` — the workers' request queues (one message type)
* :mod:`~veil.serving.keras_convert`, :mod:`~veil.serving.model_file` — Keras models, saved models
* :mod:`~veil.serving.tfe` — PySyft's names: ``KerasHook``, ``TFEWorker``, ``TFECluster``
* :mod:`~veil.serving.inputs` — shapes and tensors from numpy and R (reticulate)
"""

from veil.serving import protocol  # noqa: F401  (registers the wire type and handler in every process)
from veil.serving.client import ModelClient
from veil.serving.cluster import Cluster, NetworkWorker
from veil.serving.errors import (
    ModelConversionError,
    RequestFailedError,
    ServiceClosedError,
    ServingError,
    WorkerUnavailableError,
)
from veil.serving.model_file import load_model, save_model
from veil.serving.keras_convert import keras_to_torch, load_keras
from veil.serving.service import ModelService, serve_model, service_of, share_on_cluster, stop_model
from veil.serving.tfe import KerasHook, TFECluster, TFEWorker

__all__ = [
    "Cluster",
    "KerasHook",
    "ModelClient",
    "ModelConversionError",
    "ModelService",
    "NetworkWorker",
    "RequestFailedError",
    "ServiceClosedError",
    "ServingError",
    "TFECluster",
    "TFEWorker",
    "WorkerUnavailableError",
    "serve_model",
    "service_of",
    "share_on_cluster",
    "stop_model",
    "keras_to_torch",
    "load_keras",
    "load_model",
    "save_model",
]
