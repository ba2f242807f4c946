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

import contextlib
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from veil.messaging import serde
from veil.serving.errors import ModelConversionError
from veil.serving.keras_convert import ChannelsLastToFirst, load_keras
from veil.serving.keras_files import MAX_ELEMENTS, MAX_LAYERS

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
    data = serde.encode_value(saved)
    # the owner's weights in the clear: readable by the owner only (mkstemp: mode 0600, a fresh O_EXCL name),
    # and the rename replaces a file or symlink planted at ``path`` instead of writing through it
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


#: constructor keywords each layer's recorder writes: a file may pass only these (never device=/dtype=, which
#: would let it pick where and how the weights live, nor return_indices=/inplace=, which change the function)
KEYWORDS: dict[str, frozenset] = {
    "Conv2d": frozenset({"in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "bias"}),
    "Linear": frozenset({"in_features", "out_features", "bias"}),
    "ReLU": frozenset(),
    "AvgPool2d": frozenset({"kernel_size", "stride", "padding"}),
    "MaxPool2d": frozenset({"kernel_size", "stride", "padding"}),
    "Flatten": frozenset({"start_dim", "end_dim"}),
    "BatchNorm1d": frozenset({"num_features", "eps"}),
    "BatchNorm2d": frozenset({"num_features", "eps"}),
    "ChannelsLastToFirst": frozenset(),
}
_POSITIVE = {"in_channels", "out_channels", "kernel_size", "stride", "dilation", "in_features", "out_features",
             "num_features"}


def _check_value(layer: str, key: str, value: Any) -> None:
    """Sizes must be whole numbers (> 0, padding >= 0): torch would raise RuntimeError, or worse, accept them."""
    items = value if isinstance(value, list) else [value]
    if key in _POSITIVE or key == "padding":
        if key == "padding" and value in ("same", "valid"):
            return
        low = 0 if key == "padding" else 1
        if not items or not all(type(v) is int and v >= low for v in items):  # noqa: E721 - bool is not a size
            raise ModelConversionError(f"bad arguments for {layer} in model file: {key}={value!r} "
                                       f"(whole numbers >= {low})")
    elif key == "bias" and type(value) is not bool:
        raise ModelConversionError(f"bad arguments for {layer} in model file: bias={value!r}")
    elif key in ("start_dim", "end_dim") and type(value) is not int:
        raise ModelConversionError(f"bad arguments for {layer} in model file: {key}={value!r}")
    elif key == "eps" and not (isinstance(value, float) and 0 < value < 1):
        raise ModelConversionError(f"bad arguments for {layer} in model file: eps={value!r}")


def build(spec: list) -> nn.Sequential:
    """Rebuilds a Sequential from :func:`architecture`'s spec (names checked against :data:`LAYERS`).

    The layers are built on the ``meta`` device: nothing is allocated for the sizes the file declares
    until :func:`load_model` has checked the file's weights against them."""
    if not isinstance(spec, list) or not 1 <= len(spec) <= MAX_LAYERS:
        raise ModelConversionError(f"model file: 'layers' must be a list of 1 to {MAX_LAYERS} layers")
    layers = []
    for item in spec:
        if not isinstance(item, (list, tuple)) or len(item) != 2 or item[0] not in LAYERS:
            raise ModelConversionError(f"unknown layer entry in model file: {str(item)[:80]!r}")
        name, args = item
        if not isinstance(args, dict) or not set(args) <= KEYWORDS[name]:
            raise ModelConversionError(f"bad arguments for {name} in model file: {str(args)[:80]} "
                                       f"(allowed: {', '.join(sorted(KEYWORDS[name])) or 'none'})")
        for key, value in args.items():
            _check_value(name, key, value)
        args = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
        try:
            with torch.device("meta"):
                layers.append(LAYERS[name][0](**args))
        except Exception as e:  # torch's RuntimeError/ValueError for arguments it cannot take
            raise ModelConversionError(f"bad arguments for {name} in model file: {e}") from e
    return nn.Sequential(*layers)


def _input_shape(value: Any, where: str) -> tuple:
    """1 to 8 whole numbers >= 1 (R hands over 28 as 28.0) with at most MAX_ELEMENTS elements in all."""
    whole = isinstance(value, (list, tuple)) and all(
        isinstance(d, (int, float)) and not isinstance(d, bool) and math.isfinite(d) and d == int(d) for d in value)
    if not whole or not 1 <= len(value) <= 8 or min(value) < 1:
        raise ModelConversionError(f"{where}: input_shape must be 1 to 8 whole numbers >= 1, got {str(value)[:80]}")
    shape = tuple(int(d) for d in value)
    if math.prod(shape) > MAX_ELEMENTS:
        raise ModelConversionError(f"{where}: input_shape {list(shape)} has over {MAX_ELEMENTS} elements")
    return shape


#: all layers' outputs of one query together (a file of thousands of cheap layers on a big input would make
#: the load's dry run, and every query, take minutes)
MAX_TOTAL_ELEMENTS = 2**27


def _dry_run(model: nn.Sequential, shape: tuple, where: str, device: str = "cpu") -> None:
    """Runs ``model`` layer by layer on zeros of ``shape`` (shapes only on ``meta``): the architecture must
    take the input and give one tensor of bounded size at every layer, or the file is refused here rather
    than after the cluster is up."""
    try:
        with torch.no_grad():
            x = torch.zeros(shape, device=device)
            total = 0
            for i, layer in enumerate(model):
                x = layer(x)
                if not isinstance(x, torch.Tensor):
                    raise ModelConversionError(f"layer {i} ({type(layer).__name__}) does not return one tensor")
                if x.numel() > MAX_ELEMENTS:
                    raise ModelConversionError(f"layer {i} ({type(layer).__name__}) gives {list(x.shape)}, "
                                               f"over {MAX_ELEMENTS} elements")
                total += x.numel()
                if total > MAX_TOTAL_ELEMENTS:  # (each query, and the load's own dry run, pays them all)
                    raise ModelConversionError(f"the layers' outputs add up to over {MAX_TOTAL_ELEMENTS} elements")
    except ModelConversionError as e:
        raise ModelConversionError(f"{where}: {e}") from e
    except Exception as e:
        raise ModelConversionError(f"{where}: the model cannot run on its input_shape {list(shape)}: "
                                   f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from e


def _load_weights(model: nn.Sequential, state_dict: Any, where: str) -> None:
    """Checks every parameter/buffer against the file's tensors (names, shapes, dtypes), then adopts them."""
    want = model.state_dict()  # meta tensors: shapes and dtypes only
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ModelConversionError(f"{where}: state_dict must map names to tensors")
    if set(state_dict) != set(want):
        missing, extra = sorted(set(want) - set(state_dict)), sorted(set(state_dict) - set(want), key=str)
        raise ModelConversionError(f"{where}: weights do not fit the architecture (missing {missing[:5]}, "
                                   f"unexpected {extra[:5]})")
    for key, meta in want.items():
        got = state_dict[key]
        if got.shape != meta.shape or got.dtype != meta.dtype or got.device.type != "cpu":
            raise ModelConversionError(f"{where}: weight {key!r} is {got.dtype} {list(got.shape)}, the architecture "
                                       f"needs {meta.dtype} {list(meta.shape)}")
    model.load_state_dict(state_dict, assign=True)  # the checked tensors replace the meta ones: no copy, no init


def load_model(path: str | os.PathLike) -> nn.Sequential:
    """Loads a servable model: ``.pt`` (veil format, weights only) or ``.keras`` / ``.h5``.

    The result has ``veil_input_shape`` (batch 1); it has run once on zeros of that shape.

    Raises:
        ModelConversionError: Unknown format, bad file, unsupported layer, an input shape the model cannot take.
    """
    path = Path(path)
    if path.suffix in (".keras", ".h5"):
        model = load_keras(path)
        _dry_run(model, _input_shape(list(model.veil_input_shape), path.name), path.name)
        return model
    if path.suffix not in (".pt", ".pth"):
        raise ModelConversionError(f"{path.name}: expected a .pt (veil save_model), .keras or .h5 file")
    try:
        saved = serde.decode_value(path.read_bytes())  # msgpack + raw tensors: nothing is executed
    except Exception as e:
        raise ModelConversionError(f"cannot read {path.name} as a veil model file: {e}") from e
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ModelConversionError(f"{path.name} was not written by veil.serving.save_model")
    shape = _input_shape(saved.get("input_shape"), path.name)
    model = build(saved.get("layers")).eval()
    _dry_run(model, shape, path.name, device="meta")  # shapes only: bounds every activation before any allocation
    _load_weights(model, saved.get("state_dict"), path.name)
    _dry_run(model, shape, path.name)
    model.veil_input_shape = shape
    return model
