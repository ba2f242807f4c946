"""CKKS depth: two plaintext layers on encrypted inputs, locally and on a worker's owner data, against plain torch;
an op the ciphertext has too few levels for is refused up front with the context that has them."""

import pytest
import torch

import veil as sy
from veil.exceptions import ReviewPendingError
from veil.he import ckks
from veil.he.errors import DepthRequiredError

X = torch.tensor([[1.0, 2.0, -1.0, 0.5], [0.3, -0.2, 0.8, 1.5]], dtype=torch.float64)
W1 = torch.tensor([[0.5, -1.0, 0.25], [1.0, 0.5, -0.5], [0.2, 0.3, 0.1], [-0.4, 0.6, 0.9]], dtype=torch.float64)
W2 = torch.tensor([[1.0, -0.5], [0.25, 0.75], [-1.0, 0.5]], dtype=torch.float64)
ROW = X[:1]  # (each output of a layer is a rotation sum over the ring's 4096 slots: one row keeps it quick)


def _owner_with_weights(hook, name):
    owner = sy.VirtualWorker(hook, id=name)
    owner.load(W1.clone(), tags=("#w1",), policy="review")
    owner.load(W2.clone(), tags=("#w2",), policy="review")
    return owner, owner.search(["#w1"])[0], owner.search(["#w2"])[0]


def test_two_layers_on_the_scientists_own_ciphertext_fit_the_default_context(ckks_ctx):
    enc = sy.he.encrypt(ROW, protocol="ckks", context=ckks_ctx)
    assert enc.levels_left() == 2
    out = enc.mm(W1).mm(W2)
    assert out.levels_left() == 0
    torch.testing.assert_close(out.decrypt(), ROW @ W1 @ W2, atol=1e-4, rtol=0)


def test_a_second_layer_on_owner_data_is_refused_up_front_naming_the_context(hook, ckks_ctx):
    owner, w1, w2 = _owner_with_weights(hook, "ckks-depth-default")
    hidden = sy.he.encrypt(ROW, protocol="ckks", context=ckks_ctx).send(owner).mm(w1)  # product + seal: 2 levels
    with pytest.raises(DepthRequiredError, match=r"needs 2 multiplicative level\(s\).*has 0 left.*"
                                                 r"veil\.he\.ckks\.context\(depth=4\)"):
        hidden.mm(w2)
    torch.testing.assert_close(_approved(owner, hidden).decrypt(), ROW @ W1, atol=1e-3, rtol=0)  # still served


def test_depth_picks_the_smallest_ring_that_holds_the_chain():
    assert ckks.depth_parameters(2) == (8192, (60, 40, 40, 60))  # the default context
    assert ckks.depth_parameters(4) == (16384, (60, 40, 40, 40, 40, 60))
    assert ckks.depth_parameters(10)[0] == 32768
    for bad in (0, 20, 2.5):
        with pytest.raises(ValueError):
            ckks.depth_parameters(bad)
    assert ckks.context(depth=3, galois_keys=False).slots == 8192


def _approved(owner, ptr):
    with pytest.raises(ReviewPendingError) as pending:
        ptr.get()
    owner.release_requests.approve(pending.value.request_id)
    return ptr.get()


@pytest.mark.slow
def test_two_layers_on_owner_data_under_a_depth_4_context_match_plain_torch(hook):
    owner, w1, w2 = _owner_with_weights(hook, "ckks-depth-4")
    ctx = ckks.context(depth=4)  # (ring 16384: its Galois keys take ~30 s to send)
    out = sy.he.encrypt(X, protocol="ckks", context=ctx).send(owner).mm(w1).mm(w2)
    # each layer's result is flooded (sigma ~1.5e-5) before it may leave: well inside CKKS tolerance here
    torch.testing.assert_close(_approved(owner, out).decrypt(), X @ W1 @ W2, atol=1e-3, rtol=0)
