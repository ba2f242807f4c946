"""Per-sample gradients equal the gradients of batches of one, layer by layer."""

import pytest
import torch
import torch.nn as nn

from veil.dp import GradSampleModule, fix_module
from veil.dp.errors import BatchNormNotPrivateError


class Sum(nn.Module):
    """Wraps a layer and reduces its (possibly tuple) output to a per-sample vector."""

    def __init__(self, layer, pick=lambda o: o):
        super().__init__()
        self.layer, self.pick = layer, pick

    def forward(self, x):
        return self.pick(self.layer(x))


def rnn_out(o):
    # Use both the sequence output and the final hidden state, so both
    # gradient paths into the recurrent layer are exercised.
    out, h = o
    h = h[0] if isinstance(h, tuple) else h
    return out.sum(dim=tuple(range(1, out.dim()))) * 0 + out.pow(2).flatten(1).sum(1) + h.transpose(0, 1).flatten(1).sum(1)


def rnn_out_seq_first(o):
    out, h = o
    h = h[0] if isinstance(h, tuple) else h
    return out.transpose(0, 1).pow(2).flatten(1).sum(1) + h.transpose(0, 1).flatten(1).sum(1)


CASES = {
    "linear": (lambda: nn.Linear(5, 3), lambda b: torch.randn(b, 5)),
    "linear_seq": (lambda: nn.Linear(5, 3), lambda b: torch.randn(b, 4, 5)),
    "linear_nobias": (lambda: nn.Linear(5, 3, bias=False), lambda b: torch.randn(b, 5)),
    "conv1d": (lambda: nn.Conv1d(2, 4, 3, stride=2, padding=1), lambda b: torch.randn(b, 2, 11)),
    "conv1d_same": (lambda: nn.Conv1d(2, 4, 4, padding="same", dilation=2), lambda b: torch.randn(b, 2, 9)),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, padding=1), lambda b: torch.randn(b, 3, 7, 6)),
    "conv2d_groups": (lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), groups=2, dilation=(1, 2)), lambda b: torch.randn(b, 4, 9, 8)),
    "conv2d_reflect": (lambda: nn.Conv2d(2, 3, 3, padding=2, padding_mode="reflect"), lambda b: torch.randn(b, 2, 6, 6)),
    "embedding": (lambda: nn.Embedding(10, 4, padding_idx=0), lambda b: torch.randint(0, 10, (b, 6))),
    "layernorm": (lambda: nn.LayerNorm(5), lambda b: torch.randn(b, 3, 5)),
    "layernorm_2d": (lambda: nn.LayerNorm([3, 5]), lambda b: torch.randn(b, 3, 5)),
    "groupnorm": (lambda: nn.GroupNorm(2, 4), lambda b: torch.randn(b, 4, 3, 3)),
    "rnn": (lambda: nn.RNN(3, 4, num_layers=2, batch_first=True), lambda b: torch.randn(b, 5, 3)),
    "gru": (lambda: nn.GRU(3, 4, batch_first=True, bidirectional=True), lambda b: torch.randn(b, 5, 3)),
    "lstm": (lambda: nn.LSTM(3, 4, batch_first=True), lambda b: torch.randn(b, 5, 3)),
    "lstm_seq_first": (lambda: nn.LSTM(3, 4, num_layers=2), lambda b: torch.randn(5, b, 3)),
}


def _net(name):
    make, data = CASES[name]
    layer = make()
    if name in ("rnn", "gru", "lstm"):
        head = rnn_out
    elif name == "lstm_seq_first":
        head = rnn_out_seq_first
    else:
        head = lambda o: o.float().pow(2).flatten(1).sum(1)  # noqa: E731
    return Sum(layer, head), data


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_per_sample_matches_microbatch(name, reduction):
    torch.manual_seed(0)
    net, data = _net(name)
    b = 4
    x = data(b)
    seq_first = name == "lstm_seq_first"
    gsm = GradSampleModule(net, loss_reduction=reduction, batch_dim=1 if seq_first else 0)
    out = gsm(x)
    loss = out.mean() if reduction == "mean" else out.sum()
    loss.backward()
    params = [p for p in net.parameters() if p.requires_grad]
    per_sample = {id(p): p.grad_sample for p in params}
    gsm.remove_hooks()
    for i in range(b):
        xi = x[:, i : i + 1] if seq_first else x[i : i + 1]
        net.zero_grad()
        net(xi).sum().backward()
        for p in params:
            assert per_sample[id(p)].shape == (b, *p.shape)
            torch.testing.assert_close(per_sample[id(p)][i], p.grad, atol=1e-5, rtol=1e-4)


def test_sum_of_per_sample_equals_grad_in_a_composite_model():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    gsm = GradSampleModule(net, loss_reduction="sum")
    x, y = torch.randn(5, 1, 6, 6), torch.randint(0, 3, (5,))
    nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    for p in net.parameters():
        torch.testing.assert_close(p.grad_sample.sum(0), p.grad, atol=1e-5, rtol=1e-4)


def test_shared_layer_called_twice_sums_contributions():
    lin = nn.Linear(3, 3)
    net = Sum(nn.Sequential(lin, lin), lambda o: o.sum(1))
    gsm = GradSampleModule(net, loss_reduction="sum")
    x = torch.randn(4, 3)
    gsm(x).sum().backward()
    torch.testing.assert_close(lin.weight.grad_sample.sum(0), lin.weight.grad)


def test_batchnorm_is_refused_with_the_fix_named():
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8))
    with pytest.raises(BatchNormNotPrivateError, match="GroupNorm.*fix_module"):
        GradSampleModule(net)
    fixed = fix_module(net)
    assert isinstance(fixed[1], nn.GroupNorm) and fixed[1].num_channels == 8
    GradSampleModule(fixed)  # now accepted


class BatchMixer(nn.Module):
    """A custom layer that subtracts the batch mean: mixes records in an ordinary forward pass."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, 3))

    def forward(self, x):
        return (x - x.mean(0, keepdim=True)) * self.w + x * self.w.pow(2)


def test_any_custom_layer_gets_each_records_own_gradient_even_one_that_mixes_the_batch():
    """No per-layer rules: every record runs alone, so a layer cannot leak one record into another's gradient."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(3, 3), BatchMixer())
    gsm = GradSampleModule(net, loss_reduction="sum")
    x = torch.randn(5, 3)
    gsm(x).pow(2).sum().backward()
    per_sample = [p.grad_sample.clone() for p in net.parameters()]
    for i in range(5):  # reference: the record alone through the plain model (a batch of one)
        net.zero_grad()
        net(x[i:i + 1]).pow(2).sum().backward()
        for p, gs in zip(net.parameters(), per_sample):
            torch.testing.assert_close(gs[i], p.grad, atol=1e-5, rtol=1e-4)
    # changing another record leaves record 0's gradient as it was
    x2 = x.clone()
    x2[1:] = torch.randn(4, 3) * 10
    net.zero_grad()
    for p in net.parameters():
        p.grad_sample = None
    gsm(x2).pow(2).sum().backward()
    for p, gs in zip(net.parameters(), per_sample):
        torch.testing.assert_close(p.grad_sample[0], gs[0])


def test_dropout_masks_of_the_backward_match_the_forward():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.Linear(8, 1))
    gsm = GradSampleModule(net, loss_reduction="sum")
    x = torch.randn(40, 6)
    gsm(x).sum().backward()  # vmap path (40 records)
    for p in net.parameters():  # the per-sample gradients add up to autograd's gradient of that same forward
        torch.testing.assert_close(p.grad_sample.sum(0), p.grad, atol=1e-5, rtol=1e-4)
    w0 = net[0].weight.grad_sample
    assert (w0.flatten(1).norm(dim=1) > 0).all()


def test_fused_criterion_matches_the_unfused_path():
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))
    x, y = torch.randn(6, 1, 6, 6), torch.randint(0, 4, (6,))
    plain = GradSampleModule(net)
    nn.functional.cross_entropy(plain(x), y).backward()
    expected = [p.grad_sample.clone() for p in net.parameters()]
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    for p in net.parameters():
        p.grad_sample = None
    fused = GradSampleModule(net, criterion=nn.CrossEntropyLoss())
    loss = fused.dp_loss(fused(x), y)
    torch.testing.assert_close(loss, nn.functional.cross_entropy(net(x), y))
    loss.backward()
    for p, e, g in zip(net.parameters(), expected, grads):
        torch.testing.assert_close(p.grad_sample, e, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(p.grad_sample.mean(0), g, atol=1e-5, rtol=1e-4)
        assert p.grad is None  # the DPOptimizer builds .grad from grad_sample


def test_no_grad_forward_records_nothing():
    net = nn.Linear(2, 2)
    gsm = GradSampleModule(net)
    with torch.no_grad():
        gsm(torch.randn(3, 2))
    assert getattr(net.weight, "grad_sample", None) is None
