"""Per-sample gradient rules, one per layer type (an explicit registry).

A rule receives the layer, the inputs it was called with (batch first) and
the gradient of the loss with respect to each of its outputs, and returns
``{parameter name: per-sample gradient [B, *param.shape]}`` as fresh tensors
(the caller rescales them in place). Rules for
Linear, convolutions, Embedding and the norms use closed forms (one einsum);
recurrent layers use a per-sample vector-Jacobian product (correct for any
layer, slower).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

Grads = dict[str, torch.Tensor]
Rule = Callable[[nn.Module, Sequence, Sequence], Grads]


def _linear(layer: nn.Linear, inputs: Sequence, grads: Sequence) -> Grads:
    a, g = inputs[0], grads[0]
    # Extra dims between batch and features (sequences) are summed over.
    a3 = a.reshape(a.shape[0], -1, a.shape[-1])
    g3 = g.reshape(g.shape[0], -1, g.shape[-1])
    out = {"weight": torch.einsum("bto,bti->boi", g3, a3)}
    if layer.bias is not None:
        out["bias"] = g3.sum(1)
    return out


def _conv_padding(layer: nn.Module, spatial: Sequence[int]) -> list[int]:
    """Explicit (left, right) padding per spatial dim, in F.pad's order."""
    pads: list[tuple[int, int]] = []
    for i, _ in enumerate(spatial):
        k, d = layer.kernel_size[i], layer.dilation[i]
        if layer.padding == "same":
            total = d * (k - 1)
            pads.append((total // 2, total - total // 2))
        elif layer.padding == "valid":
            pads.append((0, 0))
        else:
            p = layer.padding[i]
            pads.append((p, p))
    # F.pad lists the last dimension first.
    return [v for pair in reversed(pads) for v in pair]


def _conv(layer: nn.Module, inputs: Sequence, grads: Sequence) -> Grads:
    a, g = inputs[0], grads[0]
    if a.dim() == layer.weight.dim() - 1:  # unbatched input
        a, g = a.unsqueeze(0), g.unsqueeze(0)
    b = a.shape[0]
    one_d = isinstance(layer, nn.Conv1d)
    pad = _conv_padding(layer, a.shape[2:])
    symmetric = all(pad[i] == pad[i + 1] for i in range(0, len(pad), 2))
    unfold_pad: tuple[int, ...] = (0, 0)
    if any(pad) and layer.padding_mode == "zeros" and symmetric and not one_d:
        # Let unfold pad (no extra copy of the input).
        unfold_pad = (pad[2], pad[0])
    elif any(pad):
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        a = F.pad(a, pad, mode=mode)
    if one_d:  # a 1-D convolution is a 2-D one of height 1
        a = a.unsqueeze(2)
        kernel, dil, stride = (1, layer.kernel_size[0]), (1, layer.dilation[0]), (1, layer.stride[0])
    else:
        kernel, dil, stride = layer.kernel_size, layer.dilation, layer.stride
    cols = F.unfold(a, kernel, dilation=dil, padding=unfold_pad, stride=stride)  # [B, C_in*k, L]
    groups, c_out = layer.groups, layer.out_channels
    cols = cols.reshape(b, groups, -1, cols.shape[-1])
    g2 = g.reshape(b, groups, c_out // groups, -1)
    w = torch.einsum("bgol,bgkl->bgok", g2, cols).reshape(b, *layer.weight.shape)
    out = {"weight": w}
    if layer.bias is not None:
        out["bias"] = g.reshape(b, c_out, -1).sum(-1)
    return out


def _embedding(layer: nn.Embedding, inputs: Sequence, grads: Sequence) -> Grads:
    idx, g = inputs[0], grads[0]
    b, dim = idx.shape[0], layer.embedding_dim
    idx2 = idx.reshape(b, -1)
    g2 = g.reshape(b, -1, dim)
    if layer.padding_idx is not None:
        # torch never updates the padding row; neither may a per-sample grad.
        g2 = g2 * (idx2 != layer.padding_idx).unsqueeze(-1).to(g2.dtype)
    out = torch.zeros(b, layer.num_embeddings, dim, dtype=g.dtype, device=g.device)
    out.scatter_add_(1, idx2.unsqueeze(-1).expand(-1, -1, dim), g2)
    return {"weight": out}


def _layer_norm(layer: nn.LayerNorm, inputs: Sequence, grads: Sequence) -> Grads:
    a, g = inputs[0], grads[0]
    normed = F.layer_norm(a, layer.normalized_shape, eps=layer.eps)
    n = len(layer.normalized_shape)
    reduce = list(range(1, a.dim() - n))  # dims between batch and normalized ones
    out = {}
    if layer.weight is not None:
        out["weight"] = (g * normed).sum(reduce) if reduce else g * normed
    if getattr(layer, "bias", None) is not None:
        out["bias"] = g.sum(reduce) if reduce else g.clone()
    return out


def _group_norm(layer: nn.GroupNorm, inputs: Sequence, grads: Sequence) -> Grads:
    a, g = inputs[0], grads[0]
    normed = F.group_norm(a, layer.num_groups, eps=layer.eps)
    reduce = list(range(2, a.dim()))
    out = {}
    if layer.weight is not None:
        out["weight"] = (g * normed).sum(reduce) if reduce else g * normed
    if layer.bias is not None:
        out["bias"] = g.sum(reduce) if reduce else g.clone()
    return out


def _batch_dims(layer: nn.Module, inputs: Sequence) -> list[int]:
    """Batch dimension of each input of a recurrent layer."""
    first = 0 if getattr(layer, "batch_first", False) or isinstance(layer, nn.RNNCellBase) else 1
    # Hidden states of RNN/GRU/LSTM are [layers, B, H] (batch dim 1); cells' are [B, H].
    hidden = 0 if isinstance(layer, nn.RNNCellBase) else 1
    return [first] + [hidden] * (len(inputs) - 1)


def _per_sample_vjp(layer: nn.Module, inputs: Sequence, grads: Sequence) -> Grads:
    """Per-sample gradients by re-running the layer on each sample alone.

    Used for recurrent layers: their fused kernels have no vmap batching
    rule (RNN/GRU fail under ``torch.func.vmap``), and their parameters are
    shared across time steps, so no closed form applies. The cost is one
    extra forward and backward of this layer per sample.
    """
    names = [n for n, p in layer.named_parameters(recurse=False) if p.requires_grad]
    params = [getattr(layer, n) for n in names]
    dims = _batch_dims(layer, inputs)
    b = inputs[0].shape[dims[0]]
    per_sample: list[list[torch.Tensor]] = []
    with torch.enable_grad():
        for i in range(b):
            args = []
            for x, d in zip(inputs, dims):
                if isinstance(x, tuple):  # LSTM's (h0, c0)
                    args.append(tuple(t.narrow(d, i, 1) for t in x))
                else:
                    args.append(x.narrow(d, i, 1))
            outs = _flatten(layer(*args))
            pairs = [(o, gg) for o, gg in zip(outs, grads) if gg is not None]
            gout = [gg.narrow(_out_dim(layer, k), i, 1) for k, (o, gg) in enumerate(pairs)]
            res = torch.autograd.grad([o for o, _ in pairs], params, gout, allow_unused=True)
            per_sample.append([torch.zeros_like(p) if r is None else r for r, p in zip(res, params)])
    return {n: torch.stack([s[j] for s in per_sample]) for j, n in enumerate(names)}


def _out_dim(layer: nn.Module, k: int) -> int:
    """Batch dimension of the k-th flattened output of a recurrent layer."""
    if isinstance(layer, nn.RNNCellBase):
        return 0
    if k == 0:
        return 0 if layer.batch_first else 1
    return 1  # h_n (and c_n)


def _flatten(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    flat: list[torch.Tensor] = []
    for o in out:
        flat.extend(_flatten(o))
    return flat


# The registry: layer type -> rule. Only these parametrised layers may train
# privately; anything else with trainable parameters is refused.
RULES: dict[type, Rule] = {
    nn.Linear: _linear,
    nn.Conv1d: _conv,
    nn.Conv2d: _conv,
    nn.Embedding: _embedding,
    nn.LayerNorm: _layer_norm,
    nn.GroupNorm: _group_norm,
    nn.RNN: _per_sample_vjp,
    nn.GRU: _per_sample_vjp,
    nn.LSTM: _per_sample_vjp,
    nn.RNNCell: _per_sample_vjp,
    nn.GRUCell: _per_sample_vjp,
    nn.LSTMCell: _per_sample_vjp,
}

# Rules that need the layer's outputs flattened (several outputs) and that
# must see every input argument (hidden states).
MULTI_OUTPUT: frozenset[type] = frozenset({nn.RNN, nn.GRU, nn.LSTM, nn.RNNCell, nn.GRUCell, nn.LSTMCell})


def register_rule(layer_type: type, rule: Rule, multi_output: bool = False) -> None:
    """Adds (or replaces) the per-sample rule of a layer type."""
    global MULTI_OUTPUT
    RULES[layer_type] = rule
    if multi_output:
        MULTI_OUTPUT = MULTI_OUTPUT | {layer_type}
