"""PySyft 0.2's recurrent layers (``sy.frameworks.torch.nn.RNN``, ``GRU``, ``LSTM`` and their cells).

Built from ``nn.Linear`` layers and elementwise ops only, so the same module runs in the clear, on a worker
through pointers (``model.send(worker)``: ``nn.LSTM``'s fused kernel is not an allowlisted remote op) and
secret-shared (``model.fix_precision().share(...)``: sigmoid and tanh by veil.mpc's approximations).

What PySyft 0.2 users' code relies on, kept: the constructor arguments of ``torch.nn.RNN``/``GRU``/``LSTM``
(``num_layers``, ``nonlinearity``, ``bias``, ``batch_first``, ``dropout``, ``bidirectional``); ``forward(x,
h0)`` returning ``(output, h_n)`` (LSTM: ``(output, (h_n, c_n))``); and PySyft's layout of the hidden state,
which follows ``batch_first`` (``[batch, layers * directions, hidden]`` when it is set; torch always puts the
layers first). The gate equations are torch's, so weights copied from a torch module give torch's outputs.

No zero tensor is ever made for a missing initial state: a step without one skips the hidden-to-hidden
product (its bias alone), so nothing needs to know where ``x`` lives or how it is shared.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class RNNCellBase(nn.Module):
    """One step: ``gates = x W_ih^T + b_ih + h W_hh^T + b_hh`` (``num_chunks`` gates of ``hidden_size``)."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool, num_chunks: int) -> None:
        super().__init__()
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size)):
            if type(value) is not int or value < 1:
                raise ValueError(f"{type(self).__name__}: {name} must be a positive int, got {value!r}")
        self.input_size, self.hidden_size, self.bias = input_size, hidden_size, bool(bias)
        self.fc_xh = nn.Linear(input_size, hidden_size * num_chunks, bias=self.bias)
        self.fc_hh = nn.Linear(hidden_size, hidden_size * num_chunks, bias=self.bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torch's initialisation: every weight and bias uniform in +-1/sqrt(hidden_size)."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def _hidden_part(self, h):
        """``h W_hh^T + b_hh``; for no state, the bias alone (None without bias)."""
        if h is not None:
            return self.fc_hh(h)
        return self.fc_hh.bias if self.bias else None

    @staticmethod
    def _plus(a, b):
        return a if b is None else a + b


class RNNCell(RNNCellBase):
    """``h' = tanh(x W_ih^T + b_ih + h W_hh^T + b_hh)`` (or relu)."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str = "tanh") -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"RNNCell: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        super().__init__(input_size, hidden_size, bias, num_chunks=1)
        self.nonlinearity = nonlinearity

    def forward(self, x, h=None):
        pre = self._plus(self.fc_xh(x), self._hidden_part(h))
        return pre.tanh() if self.nonlinearity == "tanh" else pre.relu()


class GRUCell(RNNCellBase):
    """torch's GRU step: ``r, z = sigmoid(...)``, ``n = tanh(x_n + r * h_n)``, ``h' = n + z * (h - n)``."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str | None = None) -> None:
        super().__init__(input_size, hidden_size, bias, num_chunks=3)

    def forward(self, x, h=None):
        x_rz, x_n = self.fc_xh(x).split([2 * self.hidden_size, self.hidden_size], dim=-1)
        hidden = self._hidden_part(h)
        h_rz, h_n = hidden.split([2 * self.hidden_size, self.hidden_size], dim=-1) if hidden is not None \
            else (None, None)
        r, z = self._plus(x_rz, h_rz).sigmoid().chunk(2, dim=-1)  # both gates in one sigmoid (under sharing:
        n = (x_n if h_n is None else x_n + r * h_n).tanh()  # one approximation's rounds, not two)
        return n - z * n if h is None else n + z * (h - n)


class LSTMCell(RNNCellBase):
    """torch's LSTM step: gates ``i, f, g, o``; ``c' = f * c + i * g``, ``h' = o * tanh(c')``."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str | None = None) -> None:
        super().__init__(input_size, hidden_size, bias, num_chunks=4)

    def forward(self, x, state=None):
        h, c = (None, None) if state is None else state
        i, f, g, o = self._plus(self.fc_xh(x), self._hidden_part(h)).chunk(4, dim=-1)
        # the four gates in one sigmoid, tanh(g) = 2 sigmoid(2g) - 1: under sharing one approximation's rounds
        i, f, g2, o = torch.cat([i, f, g * 2, o], dim=-1).sigmoid().chunk(4, dim=-1)
        g = g2 * 2 - 1
        c_next = i * g if c is None else f * c + i * g
        return o * c_next.tanh(), c_next


class RNNBase(nn.Module):
    """Layers x directions of one cell type, over a sequence (``x``: ``[seq, batch, input]``, or
    ``[batch, seq, input]`` with ``batch_first``)."""

    CELL: type = RNNCell
    IS_LSTM = False

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 nonlinearity: str = "tanh") -> None:
        super().__init__()
        if type(num_layers) is not int or num_layers < 1:
            raise ValueError(f"{type(self).__name__}: num_layers must be a positive int, got {num_layers!r}")
        if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"{type(self).__name__}: dropout must be in [0, 1), got {dropout!r}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.bidirectional = bool(bias), bool(batch_first), bool(bidirectional)
        self.dropout = float(dropout)
        self.directions = 2 if self.bidirectional else 1
        kw = {"nonlinearity": nonlinearity} if self.CELL is RNNCell else {}
        # forward cells first, then the backward ones (PySyft's attribute names: rnn_forward, rnn_backward)
        self.rnn_forward = nn.ModuleList(
            self.CELL(input_size if k == 0 else hidden_size * self.directions, hidden_size, bias, **kw)
            for k in range(num_layers))
        self.rnn_backward = nn.ModuleList(
            self.CELL(input_size if k == 0 else hidden_size * self.directions, hidden_size, bias, **kw)
            for k in range(num_layers)) if self.bidirectional else None
        self.drop = nn.Dropout(self.dropout) if self.dropout else None

    def forward(self, x, state=None):
        if self.batch_first:
            x = x.transpose(0, 1)
        h0, c0 = self._initial(state)
        steps = x.shape[0]
        finals_h, finals_c = [], []
        for layer in range(self.num_layers):
            outs = []
            for d, cells in enumerate([self.rnn_forward] + ([self.rnn_backward] if self.bidirectional else [])):
                k = layer * self.directions + d
                s = self._state_at(h0, c0, k)
                seq = [None] * steps
                for t in (range(steps) if d == 0 else range(steps - 1, -1, -1)):
                    s = cells[layer](x[t], s)
                    seq[t] = s[0] if self.IS_LSTM else s
                outs.append(torch.stack(seq, dim=0))
                finals_h.append(s[0] if self.IS_LSTM else s)
                if self.IS_LSTM:
                    finals_c.append(s[1])
            x = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
            if self.drop is not None and self.training and layer < self.num_layers - 1:
                x = self.drop(x)
        out = x.transpose(0, 1) if self.batch_first else x
        h_n = self._stacked(finals_h)
        return (out, (h_n, self._stacked(finals_c))) if self.IS_LSTM else (out, h_n)

    def _initial(self, state):
        """(h0, c0) laid out ``[layers * directions, batch, hidden]`` (or None)."""
        if state is None:
            return None, None
        h0, c0 = state if self.IS_LSTM else (state, None)
        if self.batch_first:
            h0 = h0.transpose(0, 1)
            c0 = c0.transpose(0, 1) if c0 is not None else None
        return h0, c0

    def _state_at(self, h0, c0, k: int):
        if h0 is None:
            return None
        return (h0[k], c0[k]) if self.IS_LSTM else h0[k]

    def _stacked(self, finals: list):
        stacked = torch.stack(finals, dim=0)
        return stacked.transpose(0, 1) if self.batch_first else stacked


class RNN(RNNBase):
    """Elman RNN (``nonlinearity`` tanh or relu), as ``torch.nn.RNN`` (which takes it fourth)."""

    CELL = RNNCell

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: str = "tanh",
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False) -> None:
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         nonlinearity=nonlinearity)


class GRU(RNNBase):
    """As ``torch.nn.GRU``."""

    CELL = GRUCell


class LSTM(RNNBase):
    """As ``torch.nn.LSTM``; ``forward(x, (h0, c0))`` returns ``(output, (h_n, c_n))``."""

    CELL = LSTMCell
    IS_LSTM = True
