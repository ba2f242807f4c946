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

import json
import math
import os
import re
import zipfile
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


# ------------------------------------------------------------------ files: checked before Keras reads them

#: Most elements of the model's input and of any activation (batch 1), for Keras and .pt files alike: 64 MiB
#: of float32, more than one client connection may queue (64 MiB of int64 shares), so no servable model is refused.
MAX_ELEMENTS = 2**24
MAX_CONFIG_BYTES = 1 << 20  # config.json / metadata.json (a real one is a few KiB per layer)
MAX_WEIGHTS_BYTES = 4 << 30  # model.weights.h5
MAX_RATIO = 100  # inflated / compressed size of a member (Keras stores members uncompressed)
MAX_JSON_DEPTH = 64
MAX_LAYERS = 1024
MAX_DIM = 1 << 20  # units, filters, kernel sizes, strides, input dimensions
_FLOAT_POLICIES = {"float16", "bfloat16", "float32", "float64", "mixed_float16", "mixed_bfloat16"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def _refuse(where: str, why: str) -> ModelConversionError:
    return ModelConversionError(f"cannot load Keras model {where!r}: {why}")


def _parse_config(raw: bytes | str, where: str) -> dict:
    """json.loads after checking the nesting depth (deep nesting would be a RecursionError)."""
    text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    depth = 0
    for ch in re.findall(r"[\[\]{}]", _STRING.sub('""', text)):
        depth += 1 if ch in "[{" else -1
        if depth > MAX_JSON_DEPTH:
            raise _refuse(where, f"config nested over {MAX_JSON_DEPTH} levels")
    cfg = json.loads(text)
    if not isinstance(cfg, dict):
        raise _refuse(where, "config is not a JSON object")
    return cfg


def _read_member(zf: zipfile.ZipFile, name: str, limit: int, where: str) -> bytes:
    info = zf.getinfo(name)
    if info.file_size > limit:
        raise _refuse(where, f"{name} inflates to {info.file_size} bytes (at most {limit})")
    with zf.open(info) as f:
        data = f.read(limit + 1)  # zipfile stops at the declared size and checks the CRC at the end
    if len(data) > limit:
        raise _refuse(where, f"{name} is over {limit} bytes")
    return data


def _h5_weights(h5: Any, layers_group: str, where: str, limit: int) -> dict:
    """Layer name -> [(shape, dtype), ...] of the file's weights, in the layer's variable order."""
    import h5py

    out: dict = {}
    if layers_group == "layers":  # .keras: layers/<path>/vars/0, 1, ... with the layer's name as an attribute
        for key, group in h5.get("layers", {}).items():
            vars_ = group.get("vars") if isinstance(group, h5py.Group) else None
            if vars_ is None:
                continue
            name = vars_.attrs.get("name", key)
            out[str(name)] = [(tuple(vars_[k].shape), vars_[k].dtype) for k in sorted(vars_, key=int)]
    else:  # legacy .h5: model_weights/<layer>/ with weight_names
        root = h5[layers_group]
        for name in root.attrs.get("layer_names", []):
            name = name.decode() if isinstance(name, bytes) else str(name)
            group = root[name]
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs.get("weight_names", [])]
            out[name] = [(tuple(group[n].shape), group[n].dtype) for n in names]
    # what reading the weights allocates against what the file holds: every dataset once, and every layer
    # variable as Keras reads it (one dataset hard-linked into many layers is read once for each)
    stored = 0

    def count(_: str, obj: Any) -> None:
        nonlocal stored
        if isinstance(obj, h5py.Dataset):
            stored += obj.size * obj.dtype.itemsize

    h5.visititems(count)
    total = max(stored, sum(math.prod(shape) * dtype.itemsize for weights in out.values() for shape, dtype in weights))
    if total > limit:
        raise _refuse(where, f"the weights declare {total} bytes, more than the file holds")
    return out


def _size(cfg: dict, key: str, where: str, layer: str, default: Any = None, pair: bool = False) -> Any:
    value = cfg.get(key, default)
    items = list(value) if pair and isinstance(value, (list, tuple)) else [value]
    if pair and len(items) == 1:
        items = items * 2
    if len(items) != (2 if pair else 1) or not all(type(v) is int and 1 <= v <= MAX_DIM for v in items):
        raise _refuse(where, f"layer {layer!r}: {key}={str(value)[:40]} (whole numbers 1..{MAX_DIM})")
    return tuple(items) if pair else items[0]


def _spatial_out(size: int, k: int, s: int, d: int, padding: Any, where: str, layer: str) -> int:
    if padding == "same":
        return -(-size // s)
    if padding != "valid":
        raise _refuse(where, f"layer {layer!r}: padding {str(padding)[:20]!r} is not supported")
    out = (size - d * (k - 1) - 1) // s + 1
    if out < 1:
        raise _refuse(where, f"layer {layer!r}: the window is larger than its input")
    return out


def _check_layer(kind: str, cfg: dict, shape: tuple, where: str, name: str) -> tuple[tuple, list]:
    """(output shape, expected weight shapes) of one layer given its input shape (Keras layout, no batch)."""
    if kind in ("Dropout", "Activation", "ReLU"):
        return shape, []
    if kind == "Flatten":
        return (math.prod(shape),), []
    if kind == "Dense":
        units = _size(cfg, "units", where, name)
        return (*shape[:-1], units), [(shape[-1], units)] + ([(units,)] if cfg.get("use_bias", True) else [])
    if len(shape) != 3:
        raise _refuse(where, f"layer {name!r} needs image inputs (H, W, C)")
    h, w, c = shape
    if kind == "Conv2D":
        filters = _size(cfg, "filters", where, name)
        k = _size(cfg, "kernel_size", where, name, pair=True)
        st = _size(cfg, "strides", where, name, 1, pair=True)
        d = _size(cfg, "dilation_rate", where, name, 1, pair=True)
        if cfg.get("groups", 1) != 1:
            raise _refuse(where, f"layer {name!r}: grouped convolutions are not supported")
        out = (_spatial_out(h, k[0], st[0], d[0], cfg.get("padding", "valid"), where, name),
               _spatial_out(w, k[1], st[1], d[1], cfg.get("padding", "valid"), where, name), filters)
        return out, [(*k, c, filters)] + ([(filters,)] if cfg.get("use_bias", True) else [])
    k = _size(cfg, "pool_size", where, name, pair=True)  # the two pooling layers
    st = _size(cfg, "strides", where, name, None, pair=True) if cfg.get("strides") is not None else k
    return (_spatial_out(h, k[0], st[0], 1, cfg.get("padding", "valid"), where, name),
            _spatial_out(w, k[1], st[1], 1, cfg.get("padding", "valid"), where, name), c), []


def _check_dtype(value: Any, where: str, name: str) -> None:
    if value is None or (isinstance(value, str) and value in _FLOAT_POLICIES):
        return
    if (isinstance(value, dict) and value.get("class_name") in ("DTypePolicy", "FloatDTypePolicy")
            and isinstance(value.get("config"), dict) and value["config"].get("name") in _FLOAT_POLICIES):
        return
    shown = value.get("class_name") if isinstance(value, dict) else value
    raise _refuse(where, f"layer {name!r}: dtype policy {str(shown)[:60]} is not supported (quantized or not float)")


def _history(node: Any) -> Any:
    args = node.get("args") if isinstance(node, dict) else None
    if not isinstance(args, list) or len(args) != 1 or not isinstance(args[0], dict):
        return None
    if args[0].get("class_name") != "__keras_tensor__" or "__keras_tensor__" in json.dumps(node.get("kwargs", {})):
        return None
    return (args[0].get("config") or {}).get("keras_history")


def check_keras_config(cfg: dict, weights: dict, where: str) -> None:
    """Refuses, before Keras builds anything, a config that is not a chain of :data:`CONVERTERS` layers or
    whose variables (what Keras allocates) differ from the weights the file holds (``weights``)."""
    top = cfg.get("config")
    if cfg.get("class_name") not in ("Sequential", "Functional") or not isinstance(top, dict):
        raise _refuse(where, f"the model is a {str(cfg.get('class_name'))[:40]}, not a Sequential or functional model")
    layers = top.get("layers")
    if not isinstance(layers, list) or not 2 <= len(layers) <= MAX_LAYERS or not all(isinstance(x, dict) for x in layers):
        raise _refuse(where, "the config has no layer list")
    names = []
    for x in layers:
        if x.get("class_name") not in CONVERTERS:
            raise _refuse(where, f"layer {str(x.get('class_name'))[:40]} cannot be served; supported: "
                                 f"{', '.join(sorted(CONVERTERS))}")
        if not isinstance(x.get("config"), dict) or not isinstance(x["config"].get("name"), str):
            raise _refuse(where, "a layer has no config or name")
        names.append(x["config"]["name"])
    if len(set(names)) != len(names):
        raise _refuse(where, "layer names repeat")
    if layers[0]["class_name"] != "InputLayer" or any(x["class_name"] == "InputLayer" for x in layers[1:]):
        raise _refuse(where, "the model needs exactly one keras.Input, first")
    if cfg["class_name"] == "Functional":  # a chain: each layer once, on the previous layer's output
        ins, outs = top.get("input_layers"), top.get("output_layers")
        ins = ins[0] if isinstance(ins, list) and len(ins) == 1 else ins
        outs = outs[0] if isinstance(outs, list) and len(outs) == 1 else outs
        if ins != [names[0], 0, 0] or outs != [names[-1], 0, 0]:
            raise _refuse(where, "only a chain of layers with one input and one output can be served")
        for prev, x in zip(names, layers[1:]):
            nodes = x.get("inbound_nodes")
            if not isinstance(nodes, list) or len(nodes) != 1 or _history(nodes[0]) != [prev, 0, 0]:
                raise _refuse(where, f"layer {x['config']['name']!r} is shared or not applied to the previous "
                                     "layer's output: only a chain of layers can be served")
    batch_shape = layers[0]["config"].get("batch_shape")
    if not isinstance(batch_shape, list) or len(batch_shape) not in (2, 4):
        raise _refuse(where, "the input needs a fixed shape (H, W, C) or (features,)")
    shape = tuple(_size({"d": d}, "d", where, names[0]) for d in batch_shape[1:])
    if math.prod(shape) > MAX_ELEMENTS:
        raise _refuse(where, f"input shape {batch_shape} has over {MAX_ELEMENTS} elements")
    _check_dtype(layers[0]["config"].get("dtype"), where, names[0])
    for x in [cfg, *layers[1:]]:
        built = (x.get("build_config") or {}).get("input_shape") if isinstance(x.get("build_config"), dict) else None
        if x is cfg and built not in (None, batch_shape, [None, *shape]):
            raise _refuse(where, "build_config does not match the input shape")
        if x is cfg:
            continue
        name, xcfg = x["config"]["name"], x["config"]
        if built is not None and (not isinstance(built, list) or tuple(built[1:]) != shape):
            raise _refuse(where, f"layer {name!r}: build_config input_shape {str(built)[:40]} is not {list(shape)}")
        _check_dtype(xcfg.get("dtype"), where, name)
        if xcfg.get("quantization_config") is not None:
            raise _refuse(where, f"layer {name!r}: quantized layers are not supported")
        if not isinstance(xcfg.get("activation", None), (str, type(None))):
            raise _refuse(where, f"layer {name!r}: activation must be a name")
        shape, want = _check_layer(x["class_name"], xcfg, shape, where, name)
        if math.prod(shape) > MAX_ELEMENTS:
            raise _refuse(where, f"layer {name!r} gives {list(shape)}, over {MAX_ELEMENTS} elements")
        got = weights.get(name, [])
        if [s for s, _ in got] != want or any(d.kind != "f" for _, d in got):
            raise _refuse(where, f"layer {name!r} needs weights {want}, the file holds {[list(s) for s, _ in got]}")


def check_keras_file(path: Path) -> None:
    """Opens the file without Keras: bounded reads, a bounded config, weights that match it."""
    import h5py

    where = path.name
    if path.suffix == ".keras":
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            if len(infos) > 16:
                raise _refuse(where, f"{len(infos)} archive members")
            for info in infos:  # Keras reads every member it knows: each one is bounded
                big = info.filename == "model.weights.h5"
                limit = MAX_WEIGHTS_BYTES if big else MAX_CONFIG_BYTES
                if info.file_size > min(limit, max(info.compress_size, 1 << 16) * MAX_RATIO):
                    raise _refuse(where, f"{info.filename} inflates to {info.file_size} bytes "
                                         f"from {info.compress_size}")
                if not big:
                    _read_member(zf, info.filename, MAX_CONFIG_BYTES, where)  # CRC checked
            cfg = _parse_config(_read_member(zf, "config.json", MAX_CONFIG_BYTES, where), where)
            size = zf.getinfo("model.weights.h5").file_size
            with zf.open("model.weights.h5") as raw, h5py.File(raw, "r") as h5:
                weights = _h5_weights(h5, "layers", where, size)
    else:
        with h5py.File(path, "r") as h5:
            attr = h5.attrs.get_id("model_config")
            if attr.get_storage_size() > MAX_CONFIG_BYTES:
                raise _refuse(where, f"model_config is over {MAX_CONFIG_BYTES} bytes")
            cfg = _parse_config(h5.attrs["model_config"], where)
            weights = _h5_weights(h5, "model_weights", where, path.stat().st_size)
    check_keras_config(cfg, weights, where)


def load_keras(path: str | os.PathLike) -> nn.Sequential:
    """Loads a ``.keras`` / ``.h5`` file (Keras safe mode: no code in the file runs) and converts it.

    The file is checked first (:func:`check_keras_file`), so Keras never allocates more than the file holds."""
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
        raise _refuse(path.name, detail[:300]) from e
