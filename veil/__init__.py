"""veil: private deep learning on PyTorch.

Public API re-exports only; nothing is defined here.
"""

from veil import dp, exceptions, federated, he, plans  # importing registers their wire types and worker functions
from veil.api import describe, get, list_objects, private_tensor, search, send, tag
from veil.hook import TorchHook
from veil.federated import BaseDataset, FederatedDataLoader, FederatedDataset
from veil.module_api import copy_module, get_module, move_module, send_module
from veil.plans import Plan, func2plan, training_plan
from veil.mpc.providers import LocalDealer, WorkerDealer
from veil.tensors.mpc_glue import remote_sharing as _remote_sharing  # noqa: F401  (network workers need its share worker function)
from veil.tensors.mpc_glue import runtime as _mpc_runtime  # noqa: F401  (the party runtime and the opening handler)
from veil.tensors.additive import AdditiveSharingTensor
from veil.tensors.fixed_precision import FixedPrecisionTensor, fix_precision, float_precision
from veil.tensors.pointer import PointerTensor
from veil.workers.base import BaseWorker
from veil.workers.virtual import VirtualWorker
from veil.workers.websocket_client import WebsocketClientWorker
from veil.workers.websocket_server import WebsocketServerWorker
from veil.compat import remote_fixed_precision as _remote_fixed_precision  # noqa: F401  (its worker functions)
from veil import serving  # noqa: E402  (registers the serving wire type on every worker)
from veil import governance  # noqa: E402  (registers the review-before-release messages)
from veil.governance import requests
from veil.serving import Cluster, ModelClient, NetworkWorker
from veil.serving import KerasHook, TFECluster, TFEWorker  # PySyft 0.2's serving names
# PySyft 0.2 names (veil/compat): paths and spellings PySyft users know
from veil import compat, frameworks, grid  # noqa: E402
from veil.compat.grid import PrivateGridNetwork
from veil.compat.protocol import Protocol
from veil.compat.sandbox import create_sandbox
from veil.workers.websocket_auth import TokenTable, new_token


def __getattr__(name: str):
    # ``sy.local_worker``: the current hook's local worker (created on first use).
    if name == "local_worker":
        from veil.workers.registry import default_hook_context

        return default_hook_context().local_worker
    # ``sy.ray`` is imported on first use: Ray is a large import that most programs never need.
    if name == "ray":
        import importlib

        return importlib.import_module("veil.ray")
    raise AttributeError(f"module 'veil' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "BaseDataset",
    "FederatedDataLoader",
    "FederatedDataset",
    "Plan",
    "dp",
    "federated",
    "he",
    "func2plan",
    "plans",
    "training_plan",
    "AdditiveSharingTensor",
    "FixedPrecisionTensor",
    "LocalDealer",
    "WorkerDealer",
    "fix_precision",
    "float_precision",
    "BaseWorker",
    "PointerTensor",
    "TorchHook",
    "VirtualWorker",
    "WebsocketClientWorker",
    "WebsocketServerWorker",
    "copy_module",
    "describe",
    "exceptions",
    "governance",
    "requests",
    "get",
    "get_module",
    "list_objects",
    "move_module",
    "private_tensor",
    "search",
    "send",
    "send_module",
    "tag",
    "serving",
    "Cluster",
    "ModelClient",
    "NetworkWorker",
    "KerasHook",
    "TFECluster",
    "TFEWorker",
    "compat",
    "frameworks",
    "grid",
    "PrivateGridNetwork",
    "Protocol",
    "create_sandbox",
    "TokenTable",
    "new_token",
]

