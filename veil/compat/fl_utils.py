"""PySyft's ``sy.frameworks.torch.fl.utils``: averaging whole models (FedAvg by hand)."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import nn


def _models(models: Mapping[Any, nn.Module] | Iterable[nn.Module]) -> list[nn.Module]:
    values = list(models.values()) if isinstance(models, Mapping) else list(models)
    if not values:
        raise ValueError("federated_avg needs at least one model")
    for m in values:
        if not isinstance(m, nn.Module):
            raise TypeError(f"federated_avg averages nn.Module objects, got {type(m).__name__}")
        if any(type(p).__name__ == "PointerTensor" for p in m.parameters()):
            raise TypeError("federated_avg needs local models: call model.get() on each one first")
    return values


def add_model(dst_model: nn.Module, src_model: nn.Module) -> nn.Module:
    """Adds ``src_model``'s parameters into ``dst_model`` (in place); returns ``dst_model``."""
    dst_params, src_params = list(dst_model.named_parameters()), list(src_model.named_parameters())
    if len(dst_params) != len(src_params):  # (zip alone would skip the ones a model lacks)
        raise ValueError(f"the models have {len(dst_params)} and {len(src_params)} parameters")
    pairs = list(zip(dst_params, src_params, strict=True))
    for (name, dst), (src_name, src) in pairs:  # all checked before any write
        if name != src_name or dst.shape != src.shape:
            raise ValueError(f"parameter {name!r} {tuple(dst.shape)} does not match {src_name!r} {tuple(src.shape)}")
    with torch.no_grad():
        for (_, dst), (_, src) in pairs:
            dst.add_(src)
    return dst_model


def scale_model(model: nn.Module, scale: float) -> nn.Module:
    """Multiplies every parameter by ``scale`` (in place)."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model


def federated_avg(models: Mapping[Any, nn.Module] | Iterable[nn.Module]) -> nn.Module:
    """The plain average of the models' parameters, as a new model.

    ``models`` is PySyft's ``{worker: model}`` dict (a list works too). Unlike
    PySyft, the inputs are left untouched: the average is written to a copy.
    """
    import copy

    values = _models(models)
    out = copy.deepcopy(values[0])
    for m in values[1:]:
        add_model(out, m)
    return scale_model(out, 1.0 / len(values))


def accuracy(pred_softmax: torch.Tensor, target: torch.Tensor) -> float:
    """Fraction of rows whose argmax equals the target."""
    return (pred_softmax.argmax(dim=1) == target).float().mean().item()


def extract_batches_per_worker(federated_train_loader: Any) -> dict:
    """``{worker: [(data, target), ...]}`` from a FederatedDataLoader."""
    batches: dict = {}
    for data, target in federated_train_loader:
        batches.setdefault(data.location, []).append((data, target))
    return batches
