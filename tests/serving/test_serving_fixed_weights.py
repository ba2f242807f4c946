"""The served model's weights as fixed operands (veil/serving/fixed_weights.py): plaintext's outputs, the
same rounds, the weights' masks opened once at load instead of in every query."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import veil as sy
from veil.mpc.opening import count_openings
from veil.serving.fixed_weights import ATTR, FixedLayer, fix_weights
from veil.serving.fuse import fuse_linear_layers
from veil.tensors.mpc_glue.module import fix_precision_module, share_module

from serving_helpers import client_for, mnist_cnn  # noqa: F401  (client_for: a fixture)


def _run(model, parties, cp, x):
    with count_openings() as stats:
        out = model(x.fix_precision().share(*parties, crypto_provider=cp)).settle()  # all its truncations counted
    return out.get().float_precision(), stats


def test_fixed_mnist_cnn_matches_plaintext_and_opens_only_activations(hook):
    parties = [sy.VirtualWorker(hook, id=n) for n in ("fw_alice", "fw_bob")]
    cp = sy.VirtualWorker(hook, id="fw_cp")
    torch.manual_seed(0)
    model = mnist_cnn().eval()
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    with torch.no_grad():
        xs = [torch.randn(1, 1, 28, 28) for _ in range(3)]
        expected = [model(x) for x in xs]
        fuse_linear_layers(model)
        fix_precision_module(model)
        share_module(model, *parties, crypto_provider=cp)
        _, generic = _run(model, parties, cp, xs[0])  # every product re-masks the weights
        with count_openings() as setup:
            assert fix_weights(model) == 4  # 3 convolutions (with their ReLU) and the dense layer
        assert isinstance(model[-1], FixedLayer) and all(
            getattr(m, ATTR, None) is not None for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
        assert setup.rounds == 4
        for x, want in zip(xs, expected):
            got, stats = _run(model, parties, cp, x)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-3)
            assert got.argmax() == want.argmax()
            assert stats.rounds == generic.rounds == 17
            # the fused weights (widened kernels) were opened in each generic product, here not at all
            assert generic.elements - stats.elements >= 2 * weights


def test_fixed_linear_and_conv_without_relu(hook):
    parties = [sy.VirtualWorker(hook, id=n) for n in ("fw2_alice", "fw2_bob")]
    cp = sy.VirtualWorker(hook, id="fw2_cp")
    torch.manual_seed(3)
    for model, shape in ((nn.Sequential(nn.Linear(7, 5)), (4, 7)), (nn.Sequential(nn.Linear(7, 5, bias=False)), (2, 7)),
                         (nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1)), (2, 2, 9, 9))):
        x = torch.randn(*shape) * 3
        with torch.no_grad():
            expected = model(x)
            fix_precision_module(model)
            share_module(model, *parties, crypto_provider=cp)
            assert fix_weights(model) == 1
            got, _ = _run(model, parties, cp, x)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-3)


@pytest.mark.slow
def test_fixed_weights_over_a_peer_opening_cluster(hook, client_for):
    """Network workers with peer openings: fixed_open and each query's x - a open party to party (one query)."""
    from veil.workers.websocket_launcher import free_port

    cluster = sy.Cluster(*[sy.NetworkWorker(f"127.0.0.1:{free_port()}") for _ in range(3)], auto_managed=True,
                         peer_openings=True).start()
    try:
        torch.manual_seed(4)
        model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
        x = torch.randn(1, 6)
        with torch.no_grad():
            expected = model(x)
        model.share(cluster, name="fixed_peer")
        assert sy.serving.service_of(model).fixed_weights == 2
        model.serve(background=True)
        client = client_for(cluster, (1, 6), (1, 3), name="fixed_peer")
        torch.testing.assert_close(client.query_model(x), expected, rtol=0, atol=1e-3)
        model.stop()
    finally:
        cluster.stop()
