"""PySyft 0.2's recurrent layers (``sy.frameworks.torch.nn``): torch's numbers in the clear, through pointers
and secret-shared; sigmoid and tanh on fixed-precision tensors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import veil as sy
from veil.mpc.providers import LocalDealer
from veil.tensors.fixed_precision import fix_precision

PAIRS = {"lstm": (sy.frameworks.torch.nn.LSTM, nn.LSTM, {}),
         "gru": (sy.frameworks.torch.nn.GRU, nn.GRU, {}),
         "rnn_tanh": (sy.frameworks.torch.nn.RNN, nn.RNN, {"nonlinearity": "tanh"}),
         "rnn_relu": (sy.frameworks.torch.nn.RNN, nn.RNN, {"nonlinearity": "relu"})}


def _copy_weights(ours, theirs) -> None:
    """torch's ``weight_ih_l{k}[_reverse]`` etc. into our cells' ``fc_xh``/``fc_hh``."""
    with torch.no_grad():
        for layer in range(ours.num_layers):
            for d, cells in enumerate([ours.rnn_forward] + ([ours.rnn_backward] if ours.bidirectional else [])):
                suffix = f"_l{layer}" + ("_reverse" if d else "")
                cell = cells[layer]
                cell.fc_xh.weight.copy_(getattr(theirs, "weight_ih" + suffix))
                cell.fc_hh.weight.copy_(getattr(theirs, "weight_hh" + suffix))
                cell.fc_xh.bias.copy_(getattr(theirs, "bias_ih" + suffix))
                cell.fc_hh.bias.copy_(getattr(theirs, "bias_hh" + suffix))


def _pair(kind: str, **kw):
    ours_cls, theirs_cls, extra = PAIRS[kind]
    ours, theirs = ours_cls(3, 4, **extra, **kw), theirs_cls(3, 4, **extra, **kw)
    _copy_weights(ours, theirs)
    return ours, theirs


def _pysyft_layout(state, batch_first: bool):
    """torch keeps layers first in h_n; PySyft 0.2 (and so veil) puts the batch first with batch_first."""
    return state.transpose(0, 1) if batch_first else state


@pytest.mark.parametrize("kind", sorted(PAIRS))
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_outputs_and_states_are_torchs(kind, batch_first, with_state):
    torch.manual_seed(5)
    ours, theirs = _pair(kind, num_layers=2, batch_first=batch_first, bidirectional=True)
    x = torch.randn(2, 5, 3) if batch_first else torch.randn(5, 2, 3)
    state = None
    if with_state:
        h0, c0 = torch.randn(4, 2, 4), torch.randn(4, 2, 4)
        state = (h0, c0) if kind == "lstm" else h0
    out, got = ours(x, None if state is None else
                    tuple(_pysyft_layout(s, batch_first) for s in state) if kind == "lstm"
                    else _pysyft_layout(state, batch_first))
    want_out, want = theirs(x, state)
    torch.testing.assert_close(out, want_out, atol=1e-6, rtol=1e-5)
    got, want = (got, want) if kind == "lstm" else ((got,), (want,))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, _pysyft_layout(w, batch_first), atol=1e-6, rtol=1e-5)


def test_cells_and_dropout_follow_torch():
    torch.manual_seed(6)
    ours, theirs = sy.frameworks.torch.nn.LSTMCell(3, 4), nn.LSTMCell(3, 4)
    with torch.no_grad():
        ours.fc_xh.weight.copy_(theirs.weight_ih), ours.fc_hh.weight.copy_(theirs.weight_hh)
        ours.fc_xh.bias.copy_(theirs.bias_ih), ours.fc_hh.bias.copy_(theirs.bias_hh)
    x, h, c = torch.randn(2, 3), torch.randn(2, 4), torch.randn(2, 4)
    for g, w in zip(ours(x, (h, c)), theirs(x, (h, c))):
        torch.testing.assert_close(g, w)
    model = sy.frameworks.torch.nn.GRU(3, 4, num_layers=2, dropout=0.5)
    x = torch.randn(6, 2, 3)
    assert torch.equal(model.eval()(x)[0], model(x)[0])  # dropout only between layers, only in training
    torch.manual_seed(1)
    a = model.train()(x)[0]
    torch.manual_seed(2)
    assert not torch.equal(a, model(x)[0])


@pytest.mark.parametrize("kwargs", [{"num_layers": 0}, {"dropout": 1.0}, {"nonlinearity": "gelu"},
                                    {"hidden_size": 0}])
def test_bad_arguments_are_one_line_errors(kwargs):
    args = {"input_size": 3, "hidden_size": 4, **kwargs}
    with pytest.raises(ValueError) as e:
        sy.frameworks.torch.nn.RNN(**args)
    assert len(str(e.value).splitlines()) == 1


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_a_step_through_pointers_is_the_local_step(hook, kind):
    """PySyft 0.2's federated RNN loop: model.send(worker), forward, backward, SGD step, get."""
    torch.manual_seed(7)
    model, _ = _pair(kind, batch_first=True)
    local = copy.deepcopy(model)
    worker = sy.VirtualWorker(hook, id=f"rnn-{kind}")
    x, y = torch.randn(2, 4, 3), torch.randn(2)

    def step(m, xs, ys):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        opt.zero_grad()
        out, _ = m(xs)
        loss = ((out.sum(dim=1).sum(dim=1) - ys) ** 2).sum()
        loss.backward()
        opt.step()
        return loss

    want = step(local, x, y)
    model.send(worker)
    got = step(model, x.send(worker), y.send(worker)).get()
    model.get()
    torch.testing.assert_close(got, want)
    for p, q in zip(model.parameters(), local.parameters()):
        torch.testing.assert_close(p.data, q.data)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_encrypted_inference_is_close_to_torch(kind):
    """Weights and inputs secret-shared between two parties: within the approximations' error of torch."""
    torch.manual_seed(8)
    model, theirs = _pair(kind, batch_first=True)
    x = torch.randn(2, 3, 3) * 0.5
    dealer = LocalDealer(seed=3)
    shared = copy.deepcopy(model).fix_precision().share("alice", "bob", crypto_provider=dealer)
    out, _ = shared(x.fix_precision().share("alice", "bob", crypto_provider=dealer))
    want, _ = theirs(x)
    err = (out.get().float_precision() - want).abs().max().item()
    assert err < 1e-2, err


@pytest.mark.parametrize("parties", [(), ("alice", "bob")], ids=["plain", "2party"])
def test_sigmoid_and_tanh_methods_on_fixed_precision(parties):
    """``x.sigmoid()`` / ``torch.tanh(x)`` on a fixed-precision (shared) tensor: veil.mpc.functions' errors
    on their ranges (before: UnsupportedOperationError, prims.neg / prims.tanh)."""
    x = torch.linspace(-2.5, 2.5, 101)
    f = fix_precision(x)
    if parties:
        f = f.share(*parties, crypto_provider=LocalDealer(seed=4))

    def value(t):
        return (t.get() if parties else t).float_precision()

    assert (value(f.sigmoid()) - torch.sigmoid(x)).abs().max() <= 2e-3
    assert (value(torch.tanh(f)) - torch.tanh(x)).abs().max() <= 4e-3
