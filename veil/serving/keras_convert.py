"""Keras 3 models -> torch modules that veil can secret-share.

A Keras model (``keras`` on any backend; veil uses ``KERAS_BACKEND=torch``)
built from the layers in :data:`CONVERTERS` becomes an ``nn.Sequential``
with the same weights and the same function:

* Keras images are channels-last (NHWC); the torch module starts with
  :class:`ChannelsLastToFirst`, so clients send exactly what they would give
  ``keras_model.predict``.
* Conv2D kernels are ``(kh, kw, in, out)`` in Keras and ``(out, in, kh, kw)``
  in torch.
* Keras flattens ``(H, W, C)`` while the torch module flattens ``(C, H, W)``;
  rather than permuting activations at inference (extra work on shared
  values), the rows of the first Dense kernel after a Flatten are reordered
  once, here.
* ``activation="relu"`` on Conv2D/Dense becomes a separate ``nn.ReLU``.

Only the SMPC layer set converts; anything else raises
:class:`~veil.serving.errors.ModelConversionError` naming the layer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from veil.serving.errors import ModelConversionError


class ChannelsLastToFirst(nn.Module):
    """NHWC -> NCHW (Keras image layout to torch's); a local op on shares."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


@dataclass
class _State:
    """What the converter knows about the activations flowing between layers."""

    shape: tuple  # current activation shape without batch, torch layout (C, H, W) or (F,)
    flattened_from: Optional[tuple] = None  # (C, H, W) of the last Flatten, until a Dense consumes it
    modules: list = field(default_factory=list)


def import_keras() -> Any:
    """Imports keras on its torch backend (unless the program chose a backend already)."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    try:
        import keras
    except ImportError as e:  # pragma: no cover - keras is a dependency
        raise ModelConversionError("serving Keras models needs the 'keras' package") from e
    return keras


def _activation(name: Any, layer: Any, state: _State) -> None:
    if name in (None, "linear"):
        return
    if name == "relu":
        state.modules.append(nn.ReLU())
        return
    raise ModelConversionError(f"layer {layer.name!r}: activation {name!r} is not supported (only relu)")


def _pair(v: Any) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _check_channels_last(cfg: dict, layer: Any) -> None:
    if cfg.get("data_format", "channels_last") != "channels_last":
        raise ModelConversionError(f"layer {layer.name!r}: only channels_last models are supported")


def _padding(cfg: dict, layer: Any, stride: tuple) -> str:
    padding = cfg.get("padding", "valid")
    if padding == "same" and stride != (1, 1):
        raise ModelConversionError(f"layer {layer.name!r}: padding='same' needs strides 1 (asymmetric padding)")
    if padding not in ("valid", "same"):
        raise ModelConversionError(f"layer {layer.name!r}: padding {padding!r} is not supported")
    return padding


def _spatial(shape: tuple, layer: Any) -> tuple:
    if len(shape) != 3:
        raise ModelConversionError(f"layer {layer.name!r} needs image inputs (H, W, C)")
    return shape


def _weights(layer: Any, cfg: dict) -> dict:
    """``{"kernel": array, "bias": array}`` by variable name, never by position: a quantized layer holds
    other variables (int8 kernel, scales) whose values are not the float weights."""
    mode = getattr(getattr(layer, "dtype_policy", None), "quantization_mode", None)
    if mode is not None:
        raise ModelConversionError(f"layer {layer.name!r}: quantized layers ({mode}) are not supported")
    found = {w.name: w for w in layer.weights}
    want = {"kernel", "bias"} if cfg.get("use_bias", True) else {"kernel"}
    if set(found) != want:
        raise ModelConversionError(f"layer {layer.name!r} holds weights {sorted(found)}, expected {sorted(want)}")
    return {name: torch.as_tensor(w.numpy()) for name, w in found.items()}


def _conv2d(layer: Any, state: _State) -> None:
    cfg = layer.get_config()
    _check_channels_last(cfg, layer)
    c, h, w = _spatial(state.shape, layer)
    stride, dilation = _pair(cfg["strides"]), _pair(cfg.get("dilation_rate", 1))
    padding = _padding(cfg, layer, stride)
    if cfg.get("groups", 1) != 1:
        raise ModelConversionError(f"layer {layer.name!r}: grouped convolutions are not supported")
    weights = _weights(layer, cfg)
    kernel = torch.as_tensor(weights["kernel"]).permute(3, 2, 0, 1)  # (kh, kw, in, out) -> (out, in, kh, kw)
    conv = nn.Conv2d(c, kernel.shape[0], tuple(kernel.shape[2:]), stride=stride, padding=padding,
                     dilation=dilation, bias=cfg.get("use_bias", True))
    with torch.no_grad():
        conv.weight.copy_(kernel)
        if conv.bias is not None:
            conv.bias.copy_(torch.as_tensor(weights["bias"]))
    state.modules.append(conv)
    state.shape = tuple(conv(torch.zeros(1, c, h, w)).shape[1:])
    _activation(cfg.get("activation"), layer, state)


def _pool(kind: type) -> Callable[[Any, _State], None]:
    def convert(layer: Any, state: _State) -> None:
        cfg = layer.get_config()
        _check_channels_last(cfg, layer)
        c, h, w = _spatial(state.shape, layer)
        size = _pair(cfg["pool_size"])
        stride = _pair(cfg.get("strides") or size)
        if _padding(cfg, layer, stride) != "valid":
            raise ModelConversionError(f"layer {layer.name!r}: pooling with padding='same' is not supported")
        pool = kind(size, stride)
        state.modules.append(pool)
        state.shape = tuple(pool(torch.zeros(1, c, h, w)).shape[1:])

    return convert


def _activation_layer(layer: Any, state: _State) -> None:
    _activation(layer.get_config().get("activation"), layer, state)


def _relu_layer(layer: Any, state: _State) -> None:
    cfg = layer.get_config()
    if cfg.get("max_value") is not None or cfg.get("negative_slope", 0) or cfg.get("threshold", 0):
        raise ModelConversionError(f"layer {layer.name!r}: only plain ReLU is supported")
    state.modules.append(nn.ReLU())


def _flatten(layer: Any, state: _State) -> None:
    if len(state.shape) == 3:
        state.flattened_from = state.shape
    state.modules.append(nn.Flatten())
    state.shape = (int(torch.tensor(state.shape).prod()),)


def _dense(layer: Any, state: _State) -> None:
    cfg = layer.get_config()
    if len(state.shape) != 1:
        raise ModelConversionError(f"layer {layer.name!r}: Dense on non-flat inputs is not supported (add Flatten)")
    weights = _weights(layer, cfg)
    kernel = torch.as_tensor(weights["kernel"])  # (in, out)
    if state.flattened_from is not None:
        # Keras's flat index runs over (H, W, C), ours over (C, H, W): reorder the rows to match.
        c, h, w = state.flattened_from
        kernel = kernel.reshape(h, w, c, -1).permute(2, 0, 1, 3).reshape(c * h * w, -1)
        state.flattened_from = None
    linear = nn.Linear(kernel.shape[0], kernel.shape[1], bias=cfg.get("use_bias", True))
    with torch.no_grad():
        linear.weight.copy_(kernel.T)
        if linear.bias is not None:
            linear.bias.copy_(torch.as_tensor(weights["bias"]))
    state.modules.append(linear)
    state.shape = (kernel.shape[1],)
    _activation(cfg.get("activation"), layer, state)


def _skip(layer: Any, state: _State) -> None:
    """Layers without effect at inference (InputLayer, Dropout)."""


#: Keras layer class name -> converter(layer, state). Explicit: one line per supported layer.
CONVERTERS: dict[str, Callable[[Any, _State], None]] = {
    "InputLayer": _skip,
    "Dropout": _skip,
    "Conv2D": _conv2d,
    "AveragePooling2D": _pool(nn.AvgPool2d),
    "MaxPooling2D": _pool(nn.MaxPool2d),
    "Activation": _activation_layer,
    "ReLU": _relu_layer,
    "Flatten": _flatten,
    "Dense": _dense,
}


def _check_chain(model: Any) -> None:
    """model.layers is converted in order, once each: that is the model's function only for a linear chain
    (a Sequential, or a functional model whose every layer runs once on the previous layer's output)."""
    keras = import_keras()
    if isinstance(model, keras.Sequential):
        return
    inputs, outputs = getattr(model, "inputs", None) or [], getattr(model, "outputs", None) or []
    if not isinstance(model, keras.Model) or len(inputs) != 1 or len(outputs) != 1:
        raise ModelConversionError("only Keras models with one input and one output (a chain of layers) can be served")
    previous = inputs[0]
    for layer in model.layers:
        if type(layer).__name__ == "InputLayer":
            continue
        nodes = getattr(layer, "_inbound_nodes", [])
        if (len(nodes) != 1 or len(nodes[0].input_tensors) != 1 or nodes[0].input_tensors[0] is not previous
                or len(nodes[0].output_tensors) != 1):
            raise ModelConversionError(f"Keras layer {layer.name!r} is shared or not applied to the previous layer's "
                                       "output: only a chain of layers (e.g. a keras.Sequential) can be served")
        previous = nodes[0].output_tensors[0]
    if previous is not outputs[0]:
        raise ModelConversionError("the Keras model's output is not its last layer's: only a chain of layers can be served")


def keras_to_torch(model: Any) -> nn.Sequential:
    """Converts a Keras model (a linear stack of :data:`CONVERTERS` layers) to ``nn.Sequential``.

    The result has ``veil_input_shape`` (batch 1, Keras layout), which
    ``model.share(cluster)`` uses.

    Raises:
        ModelConversionError: A layer or option has no secret-shared equivalent.
    """
    _check_chain(model)
    keras_shape = tuple(model.input_shape[1:])
    if None in keras_shape:
        raise ModelConversionError("the Keras model needs a fixed input shape (build it with keras.Input(shape=...))")
    images = len(keras_shape) == 3
    state = _State(shape=(keras_shape[2], keras_shape[0], keras_shape[1]) if images else keras_shape)
    if images:
        state.modules.append(ChannelsLastToFirst())
    for layer in model.layers:
        convert = CONVERTERS.get(type(layer).__name__)
        if convert is None:
            raise ModelConversionError(
                f"Keras layer {layer.name!r} ({type(layer).__name__}) cannot be served; supported: "
                f"{', '.join(sorted(CONVERTERS))}")
        convert(layer, state)
    out = nn.Sequential(*state.modules).eval()
    out.veil_input_shape = (1, *keras_shape)
    return out


def load_keras(path: str | os.PathLike) -> nn.Sequential:
    """Loads a ``.keras`` / ``.h5`` file (Keras safe mode: no code in the file runs) and converts it.

    The file is checked first (:func:`veil.serving.keras_files.check_keras_file`), so Keras never allocates more than the file holds."""
    from veil.serving.keras_files import check_keras_file, refuse

    path = Path(path)
    keras = import_keras()
    try:
        check_keras_file(path)
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
        return keras_to_torch(model)
    except ModelConversionError:
        raise
    except Exception as e:  # Keras, zipfile, h5py, torch: a bad file is one line, never a traceback
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise refuse(path.name, detail[:300]) from e
