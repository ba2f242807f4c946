"""Keras files (``.keras`` zip archives, legacy ``.h5``) checked before Keras reads them.

Keras allocates and initialises every variable a config declares before it compares anything with the
weights in the file, and inflates zip members up to 4 GiB: a small hostile file could take gigabytes. So the
archive is opened here first, with bounded reads (member sizes, inflation ratio, JSON depth), and its config
must be a chain of the layers :data:`veil.serving.keras_convert.CONVERTERS` converts, with sizes whose
variables match the weights the file really holds (counted as Keras reads them).
"""

from __future__ import annotations

import json
import math
import re
import zipfile
from pathlib import Path
from typing import Any

from veil.serving.errors import ModelConversionError
from veil.serving.keras_convert import CONVERTERS

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


def refuse(where: str, why: str) -> ModelConversionError:
    return ModelConversionError(f"cannot load Keras model {where!r}: {why}")


def _parse_config(raw: bytes | str, where: str) -> dict:
    """json.loads after checking the nesting depth (deep nesting would be a RecursionError)."""
    text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    depth = 0
    for ch in re.findall(r"[\[\]{}]", _STRING.sub('""', text)):
        depth += 1 if ch in "[{" else -1
        if depth > MAX_JSON_DEPTH:
            raise refuse(where, f"config nested over {MAX_JSON_DEPTH} levels")
    cfg = json.loads(text)
    if not isinstance(cfg, dict):
        raise refuse(where, "config is not a JSON object")
    return cfg


def _read_member(zf: zipfile.ZipFile, name: str, limit: int, where: str) -> bytes:
    info = zf.getinfo(name)
    if info.file_size > limit:
        raise refuse(where, f"{name} inflates to {info.file_size} bytes (at most {limit})")
    with zf.open(info) as f:
        data = f.read(limit + 1)  # zipfile stops at the declared size and checks the CRC at the end
    if len(data) > limit:
        raise refuse(where, f"{name} is over {limit} bytes")
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
        raise refuse(where, f"the weights declare {total} bytes, more than the file holds")
    return out


def _size(cfg: dict, key: str, where: str, layer: str, default: Any = None, pair: bool = False) -> Any:
    value = cfg.get(key, default)
    items = list(value) if pair and isinstance(value, (list, tuple)) else [value]
    if pair and len(items) == 1:
        items = items * 2
    if len(items) != (2 if pair else 1) or not all(type(v) is int and 1 <= v <= MAX_DIM for v in items):
        raise refuse(where, f"layer {layer!r}: {key}={str(value)[:40]} (whole numbers 1..{MAX_DIM})")
    return tuple(items) if pair else items[0]


def _spatial_out(size: int, k: int, s: int, d: int, padding: Any, where: str, layer: str) -> int:
    if padding == "same":
        return -(-size // s)
    if padding != "valid":
        raise refuse(where, f"layer {layer!r}: padding {str(padding)[:20]!r} is not supported")
    out = (size - d * (k - 1) - 1) // s + 1
    if out < 1:
        raise refuse(where, f"layer {layer!r}: the window is larger than its input")
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
        raise refuse(where, f"layer {name!r} needs image inputs (H, W, C)")
    h, w, c = shape
    if kind == "Conv2D":
        filters = _size(cfg, "filters", where, name)
        k = _size(cfg, "kernel_size", where, name, pair=True)
        st = _size(cfg, "strides", where, name, 1, pair=True)
        d = _size(cfg, "dilation_rate", where, name, 1, pair=True)
        if cfg.get("groups", 1) != 1:
            raise refuse(where, f"layer {name!r}: grouped convolutions are not supported")
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
    raise refuse(where, f"layer {name!r}: dtype policy {str(shown)[:60]} is not supported (quantized or not float)")


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
        raise refuse(where, f"the model is a {str(cfg.get('class_name'))[:40]}, not a Sequential or functional model")
    layers = top.get("layers")
    if not isinstance(layers, list) or not 2 <= len(layers) <= MAX_LAYERS or not all(isinstance(x, dict) for x in layers):
        raise refuse(where, "the config has no layer list")
    names = []
    for x in layers:
        if x.get("class_name") not in CONVERTERS:
            raise refuse(where, f"layer {str(x.get('class_name'))[:40]} cannot be served; supported: "
                                 f"{', '.join(sorted(CONVERTERS))}")
        if not isinstance(x.get("config"), dict) or not isinstance(x["config"].get("name"), str):
            raise refuse(where, "a layer has no config or name")
        names.append(x["config"]["name"])
    if len(set(names)) != len(names):
        raise refuse(where, "layer names repeat")
    if layers[0]["class_name"] != "InputLayer" or any(x["class_name"] == "InputLayer" for x in layers[1:]):
        raise refuse(where, "the model needs exactly one keras.Input, first")
    if cfg["class_name"] == "Functional":  # a chain: each layer once, on the previous layer's output
        ins, outs = top.get("input_layers"), top.get("output_layers")
        ins = ins[0] if isinstance(ins, list) and len(ins) == 1 else ins
        outs = outs[0] if isinstance(outs, list) and len(outs) == 1 else outs
        if ins != [names[0], 0, 0] or outs != [names[-1], 0, 0]:
            raise refuse(where, "only a chain of layers with one input and one output can be served")
        for prev, x in zip(names, layers[1:]):
            nodes = x.get("inbound_nodes")
            if not isinstance(nodes, list) or len(nodes) != 1 or _history(nodes[0]) != [prev, 0, 0]:
                raise refuse(where, f"layer {x['config']['name']!r} is shared or not applied to the previous "
                                     "layer's output: only a chain of layers can be served")
    batch_shape = layers[0]["config"].get("batch_shape")
    if not isinstance(batch_shape, list) or len(batch_shape) not in (2, 4):
        raise refuse(where, "the input needs a fixed shape (H, W, C) or (features,)")
    shape = tuple(_size({"d": d}, "d", where, names[0]) for d in batch_shape[1:])
    if math.prod(shape) > MAX_ELEMENTS:
        raise refuse(where, f"input shape {batch_shape} has over {MAX_ELEMENTS} elements")
    _check_dtype(layers[0]["config"].get("dtype"), where, names[0])
    for x in [cfg, *layers[1:]]:
        built = (x.get("build_config") or {}).get("input_shape") if isinstance(x.get("build_config"), dict) else None
        if x is cfg and built not in (None, batch_shape, [None, *shape]):
            raise refuse(where, "build_config does not match the input shape")
        if x is cfg:
            continue
        name, xcfg = x["config"]["name"], x["config"]
        if built is not None and (not isinstance(built, list) or tuple(built[1:]) != shape):
            raise refuse(where, f"layer {name!r}: build_config input_shape {str(built)[:40]} is not {list(shape)}")
        _check_dtype(xcfg.get("dtype"), where, name)
        if xcfg.get("quantization_config") is not None:
            raise refuse(where, f"layer {name!r}: quantized layers are not supported")
        if not isinstance(xcfg.get("activation", None), (str, type(None))):
            raise refuse(where, f"layer {name!r}: activation must be a name")
        shape, want = _check_layer(x["class_name"], xcfg, shape, where, name)
        if math.prod(shape) > MAX_ELEMENTS:
            raise refuse(where, f"layer {name!r} gives {list(shape)}, over {MAX_ELEMENTS} elements")
        got = weights.get(name, [])
        if [s for s, _ in got] != want or any(d.kind != "f" for _, d in got):
            raise refuse(where, f"layer {name!r} needs weights {want}, the file holds {[list(s) for s, _ in got]}")


def check_keras_file(path: Path) -> None:
    """Opens the file without Keras: bounded reads, a bounded config, weights that match it."""
    import h5py

    where = path.name
    if path.suffix == ".keras":
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            if len(infos) > 16:
                raise refuse(where, f"{len(infos)} archive members")
            for info in infos:  # Keras reads every member it knows: each one is bounded
                big = info.filename == "model.weights.h5"
                limit = MAX_WEIGHTS_BYTES if big else MAX_CONFIG_BYTES
                if info.file_size > min(limit, max(info.compress_size, 1 << 16) * MAX_RATIO):
                    raise refuse(where, f"{info.filename} inflates to {info.file_size} bytes "
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
                raise refuse(where, f"model_config is over {MAX_CONFIG_BYTES} bytes")
            cfg = _parse_config(h5.attrs["model_config"], where)
            weights = _h5_weights(h5, "model_weights", where, path.stat().st_size)
    check_keras_config(cfg, weights, where)
