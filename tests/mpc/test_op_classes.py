"""The one op table: derived lists agree with it; composite ops decompose."""

import torch

from veil.mpc.op_classes import OP_CLASSES, WORKER_CLASSES, OpClass, classify, ops_of, packets_of
from veil.mpc.providers import LocalDealer
from veil.mpc.wire_ops import REGISTERED, SHARE_OPS
from veil.tensors.additive import share
from veil.tensors.fixed_precision import fix_precision
from veil.tensors.rules.common import STRUCTURAL_OPS

aten = torch.ops.aten


def test_derived_lists_follow_the_table():
    assert set(STRUCTURAL_OPS) == set(ops_of(OpClass.STRUCTURAL, OpClass.LINEAR))
    assert set(SHARE_OPS.split()) == set(packets_of(*WORKER_CLASSES))
    # no protocol op reaches a worker as a plain op on a share
    for name in REGISTERED:
        _, packet, overload = name.split(".")
        assert classify(getattr(getattr(aten, packet), overload)) in WORKER_CLASSES, name
    assert "aten.view.default" in REGISTERED and "aten.view.dtype" not in REGISTERED
    assert not {"div", "gt", "relu", "max", "ones_like"} & set(SHARE_OPS.split())
    assert all(isinstance(c, OpClass) for c in OP_CLASSES.values())


def test_classify_overloads():
    assert classify(aten.mm.default) is OpClass.BILINEAR
    assert classify(aten.add.Scalar) is OpClass.AFFINE
    assert classify(aten.view.default) is OpClass.STRUCTURAL
    assert classify(aten.view.dtype) is None  # reinterpreting bits is not structural
    assert classify(aten.floor_divide.default) is OpClass.TRUNCATING
    assert classify(aten.addmm.default) is None  # composite: decomposed


def _fp(t, dealer, **kw):
    return fix_precision(t).share("a", "b", crypto_provider=dealer, **kw)


def test_composite_ops_decompose_on_shares():
    dealer = LocalDealer(seed=3)
    x, w, b = torch.randn(3, 4), torch.randn(4, 2), torch.randn(2)
    X, W, B = _fp(x, dealer), _fp(w, dealer), _fp(b, dealer)
    tol = 1e-3
    got = torch.addmm(B, X, W, beta=2, alpha=0.5).get().float_precision()
    assert torch.allclose(got, torch.addmm(b, x, w, beta=2, alpha=0.5), atol=tol)
    assert torch.allclose((2.5 - X).get().float_precision(), 2.5 - x, atol=tol)
    assert torch.allclose(torch.nn.functional.linear(X, W.t(), B).get().float_precision(),
                          torch.nn.functional.linear(x, w.t(), b), atol=tol)
    xi = torch.randint(-9, 9, (3, 3))
    Xi = share(xi, ("a", "b", "c"), dealer)
    assert torch.equal(torch.addmm(Xi, Xi, Xi, beta=3, alpha=2).get(), torch.addmm(xi, xi, xi, beta=3, alpha=2))
    assert torch.equal((7 - Xi).get(), 7 - xi)


def test_composite_ops_keep_macs():
    dealer = LocalDealer(seed=4)
    xi, yi = torch.randint(-9, 9, (2, 3)), torch.randint(-9, 9, (3, 3))
    X = share(xi, ("a", "b"), dealer, active_security=True)
    Y = share(yi, ("a", "b"), dealer, active_security=True)
    Z = torch.addmm(Y[:2], X, Y, beta=2)
    assert Z.mac is not None
    assert torch.equal(Z.get(), torch.addmm(yi[:2], xi, yi, beta=2))
    R = 5 - X
    assert R.mac is not None and torch.equal(R.get(), 5 - xi)


def test_communicator_counts_rounds_and_bytes_per_party(hook):
    import veil as sy
    from veil.mpc.communicator import communicate

    parties = [sy.VirtualWorker(hook, id=n) for n in ("ca", "cb", "cc")]
    cp = sy.VirtualWorker(hook, id="comm_cp")
    x = torch.randint(-5, 5, (10,)).share(*parties, crypto_provider=cp)
    y = torch.randint(-5, 5, (10,)).share(*parties, crypto_provider=cp)
    with communicate(parties, cp) as comm:
        x * y
    assert comm.rounds == 1
    # each party sends its shares of e and f (10 entries each) to the 2 others
    assert comm.opened_bytes == {p.id: 8 * 2 * 20 for p in parties}
    assert comm.dealer_sent > 0 and set(comm.sent) == {p.id for p in parties}
    assert comm.as_dict()["rounds"] == 1
