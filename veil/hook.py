"""TorchHook: adds veil's verbs to torch classes. It replaces nothing.

Every attachment is listed in ``ATTACHMENTS`` (class, name, function); attaching
refuses any name torch already defines, so native behaviour (including
``torch.jit.script`` and ``torch.compile``) is untouched. Extensions (SMPC, HE,
federated datasets) add entries with :func:`register_attachment` before the hook
is created.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from veil import api, module_api
from veil.tensors.mpc_glue import module as mpc_module
from veil.tensors.mpc_glue import optim as mpc_optim
from veil.tensors.mpc_glue import tensor_api as mpc_tensor_api
from veil.workers.registry import HookContext, set_default_hook_context

def _encrypt(tensor: torch.Tensor, protocol: str = "paillier", **kwargs: Any) -> Any:
    from veil.he import encrypt

    return encrypt(tensor, protocol=protocol, **kwargs)


def _federate(dataset: Any, workers: Any) -> Any:
    from veil.federated import federate

    return federate(dataset, workers)


def _share_module(module: nn.Module, *parties: Any, **kwargs: Any) -> nn.Module:
    # ``model.share(cluster)`` (encrypted serving) or ``model.share(alice, bob, crypto_provider=cp)``.
    from veil.serving.cluster import Cluster

    if len(parties) == 1 and isinstance(parties[0], Cluster):
        from veil.serving.service import share_on_cluster

        return share_on_cluster(module, parties[0], **kwargs)
    return mpc_module.share_module(module, *parties, **kwargs)


def _serve_module(module: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
    from veil.serving.service import serve_model

    return serve_model(module, *args, **kwargs)


def _stop_module(module: nn.Module) -> nn.Module:
    from veil.serving.service import stop_model

    return stop_model(module)


#: (class, attribute name, function). Explicit: one line per verb.
ATTACHMENTS: list[tuple[type, str, Callable[..., Any]]] = [
    (torch.Tensor, "send", api.send),
    (torch.Tensor, "tag", api.tag),
    (torch.Tensor, "describe", api.describe),
    (torch.Tensor, "private_tensor", api.private_tensor),
    (nn.Module, "send", api.send),
    (nn.Module, "get", module_api.get_module),
    (nn.Module, "copy", module_api.copy_module),
    (nn.Module, "move", module_api.move_module),
    (torch.utils.data.Dataset, "federate", _federate),
    (torch.Tensor, "encrypt", _encrypt),
    # SMPC (veil.mpc): encode, secret-share, decode. torch has none of these names
    # (nn.Module has share_memory, not share; Tensor has share_memory_).
    (torch.Tensor, "fix_precision", mpc_tensor_api.fix_precision),
    (torch.Tensor, "fix_prec", mpc_tensor_api.fix_precision),
    (torch.Tensor, "float_precision", mpc_tensor_api.float_precision),
    (torch.Tensor, "float_prec", mpc_tensor_api.float_precision),
    (torch.Tensor, "share", mpc_tensor_api.share),
    (nn.Module, "fix_precision", mpc_module.fix_precision_module),
    (nn.Module, "fix_prec", mpc_module.fix_precision_module),
    (nn.Module, "share", _share_module),
    (nn.Module, "serve", _serve_module),  # encrypted model serving (veil.serving)
    (nn.Module, "stop", _stop_module),
    (nn.Module, "float_precision", mpc_module.float_precision_module),
    (nn.Module, "float_prec", mpc_module.float_precision_module),
    (torch.optim.Optimizer, "fix_precision", mpc_optim.fix_precision_optimizer),
    (torch.optim.Optimizer, "fix_prec", mpc_optim.fix_precision_optimizer),
]

#: attributes veil itself attached (so that a second hook is a no-op, not a conflict)
_ATTACHED: dict[tuple[type, str], Callable[..., Any]] = {}


def register_attachment(cls: type, name: str, func: Callable[..., Any]) -> None:
    """Adds a verb (e.g. ``fix_precision``) to be attached by TorchHook.

    Raises:
        RuntimeError: If torch defines the name, or another function has it: checked before the verb is listed
            (a refused entry left in the list made every later TorchHook in the process raise).
    """
    listed = next((f for c, n, f in ATTACHMENTS if c is cls and n == name), None)
    if listed is not None and listed is not func:
        raise RuntimeError(f"{cls.__qualname__}.{name} is already a veil verb; register another name")
    if listed is None and hasattr(cls, name) and (cls, name) not in _ATTACHED:
        raise RuntimeError(f"{cls.__qualname__}.{name} exists in torch; veil never replaces native attributes")
    if listed is None:
        ATTACHMENTS.append((cls, name, func))
    if _ATTACHED:  # a hook already exists: attach now
        _attach(cls, name, func)


def _attach(cls: type, name: str, func: Callable[..., Any]) -> None:
    key = (cls, name)
    if key in _ATTACHED:
        return
    if hasattr(cls, name):
        raise RuntimeError(f"{cls.__qualname__}.{name} exists in torch; veil never replaces native attributes")
    setattr(cls, name, func)
    _ATTACHED[key] = func


class TorchHook(HookContext):
    """``hook = sy.TorchHook(torch)``: attaches veil's methods and holds the worker registry.

    Args:
        torch_module: the ``torch`` module (kept for PySyft compatibility).
        local_worker: the worker that owns the user's pointers (default: a
            VirtualWorker named ``"me"``).
    """

    def __init__(self, torch_module: Any = torch, local_worker: Any = None, **_ignored: Any) -> None:
        super().__init__()
        if torch_module is not torch:
            raise ValueError("TorchHook expects the torch module")
        self.torch = torch_module
        for cls, name, func in ATTACHMENTS:
            _attach(cls, name, func)
        if local_worker is not None:
            self._local_worker = local_worker
            self.register_worker(local_worker)
        set_default_hook_context(self)
        _ = self.local_worker  # create "me" now so it is in the registry


def __getattr__(name: str) -> Any:
    # ``sy.hook.local_worker`` (PySyft 0.2's tutorials): ``sy.hook`` is this module here.
    if name == "local_worker":
        from veil.workers.registry import default_hook_context

        return default_hook_context().local_worker
    raise AttributeError(f"module 'veil.hook' has no attribute {name!r}")
