"""veil: private deep learning on PyTorch.

Public API re-exports only; nothing is defined here.
"""

from veil import exceptions
from veil.api import describe, get, list_objects, private_tensor, search, send, tag
from veil.hook import TorchHook
from veil.module_api import copy_module, get_module, move_module, send_module
from veil.tensors.pointer import PointerTensor
from veil.workers.base import BaseWorker
from veil.workers.virtual import VirtualWorker

__version__ = "0.1.0"

__all__ = [
    "BaseWorker",
    "PointerTensor",
    "TorchHook",
    "VirtualWorker",
    "copy_module",
    "describe",
    "exceptions",
    "get",
    "get_module",
    "list_objects",
    "move_module",
    "private_tensor",
    "search",
    "send",
    "send_module",
    "tag",
]
