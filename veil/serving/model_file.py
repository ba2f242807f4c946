"""Saved models for ``veil serve``: a torch architecture spec + weights, or a Keras file.

A ``.pt`` file written by :func:`save_model` is a plain dict —
``{"format": "veil-model/1", "input_shape": [...], "layers": [[name, {args}], ...],
"state_dict": {...}}`` — in veil's own msgpack format (``veil.messaging.serde``),
so loading never unpickles anything: a pickled file (``torch.save(model)``)
is simply not a veil model file. The architecture is rebuilt from
:data:`LAYERS` (layer name -> class and the constructor arguments it
records), never from names found in the file.
``.keras`` / ``.h5`` files load through Keras in safe mode
(:func:`veil.serving.keras_convert.load_keras`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from torch import nn

from veil.messaging import serde
from veil.serving.errors import ModelConversionError
from veil.serving.keras_convert import ChannelsLastToFirst, load_keras

FORMAT = "veil-model/1"


def _conv_args(m: nn.Conv2d) -> dict:
    return {"in_channels": m.in_channels, "out_channels": m.out_channels, "kernel_size": list(m.kernel_size),
            "stride": list(m.stride), "padding": m.padding if isinstance(m.padding, str) else list(m.padding),
            "dilation": list(m.dilation), "bias": m.bias is not None}


def _pool_args(m: Any) -> dict:
    return {"kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding}


def _bn_args(m: Any) -> dict:
    return {"num_features": m.num_features, "eps": m.eps}


#: layer name -> (class, recorded constructor arguments). Explicit: the only classes a file can name.
LAYERS: dict[str, tuple[type, Callable[[Any], dict]]] = {
    "Conv2d": (nn.Conv2d, _conv_args),
    "Linear": (nn.Linear, lambda m: {"in_features": m.in_features, "out_features": m.out_features,
                                     "bias": m.bias is not None}),
    "ReLU": (nn.ReLU, lambda m: {}),
    "AvgPool2d": (nn.AvgPool2d, _pool_args),
    "MaxPool2d": (nn.MaxPool2d, _pool_args),
    "Flatten": (nn.Flatten, lambda m: {"start_dim": m.start_dim, "end_dim": m.end_dim}),
    "BatchNorm1d": (nn.BatchNorm1d, _bn_args),
    "BatchNorm2d": (nn.BatchNorm2d, _bn_args),
    "ChannelsLastToFirst": (ChannelsLastToFirst, lambda m: {}),
}
_NAMES = {cls: name for name, (cls, _) in LAYERS.items()}


def architecture(model: nn.Sequential) -> list:
    """``[[layer name, constructor args], ...]`` for a Sequential of :data:`LAYERS`."""
    if not isinstance(model, nn.Sequential):
        raise ModelConversionError("only nn.Sequential models can be saved for `veil serve`")
    spec = []
    for m in model:
        name = _NAMES.get(type(m))
        if name is None:
            raise ModelConversionError(f"layer {type(m).__name__} cannot be saved; supported: {', '.join(LAYERS)}")
        spec.append([name, LAYERS[name][1](m)])
    return spec


def save_model(model: nn.Sequential, path: str | os.PathLike, input_shape: tuple) -> Path:
    """Writes ``model`` (architecture + weights) and one request's ``input_shape`` to ``path``."""
    path = Path(path)
    saved = {"format": FORMAT, "input_shape": list(input_shape), "layers": architecture(model),
             "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    path.write_bytes(serde.encode_value(saved))
    return path


def build(spec: list) -> nn.Sequential:
    """Rebuilds a Sequential from :func:`architecture`'s spec (names checked against :data:`LAYERS`)."""
    layers = []
    for item in spec:
        if not isinstance(item, (list, tuple)) or len(item) != 2 or item[0] not in LAYERS:
            raise ModelConversionError(f"unknown layer entry in model file: {str(item)[:80]!r}")
        cls = LAYERS[item[0]][0]
        args = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(item[1]).items()}
        try:
            layers.append(cls(**args))
        except TypeError as e:
            raise ModelConversionError(f"bad arguments for {item[0]} in model file: {e}") from e
    return nn.Sequential(*layers)


def load_model(path: str | os.PathLike) -> nn.Sequential:
    """Loads a servable model: ``.pt`` (veil format, weights only) or ``.keras`` / ``.h5``.

    The result has ``veil_input_shape`` (batch 1).

    Raises:
        ModelConversionError: Unknown format, bad file, unsupported layer.
    """
    path = Path(path)
    if path.suffix in (".keras", ".h5"):
        return load_keras(path)
    if path.suffix not in (".pt", ".pth"):
        raise ModelConversionError(f"{path.name}: expected a .pt (veil save_model), .keras or .h5 file")
    try:
        saved = serde.decode_value(path.read_bytes())  # msgpack + raw tensors: nothing is executed
    except Exception as e:
        raise ModelConversionError(f"cannot read {path.name} as a veil model file: {e}") from e
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ModelConversionError(f"{path.name} was not written by veil.serving.save_model")
    model = build(saved["layers"])
    try:
        model.load_state_dict(saved["state_dict"])
    except RuntimeError as e:
        raise ModelConversionError(f"{path.name}: weights do not fit the architecture: {e}") from e
    model.eval()
    model.veil_input_shape = tuple(saved["input_shape"])
    return model
