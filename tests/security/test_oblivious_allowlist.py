"""The oblivious guard is an allowlist: an ATen op not known to be data-oblivious is refused on a secret.

The denylist it replaces named the value-checked and value-shaped ops we knew of; an op missing from it
(``linalg_cholesky`` fails on a non-positive-definite input, ``normal`` on a negative std) answered one
bit of a client's share per query. These tests run the guard directly on secret tensors and check that
the outcome (refused or not) is the same whatever the secret, and that allowed ops still compute what
torch computes.
"""

import pytest
import torch
import torch.nn.functional as F

from veil.exceptions import PermissionDeniedError
from veil.workers import oblivious, oblivious_ops

PD = torch.tensor([[2.0, 0.5], [0.5, 1.0]])  # Cholesky succeeds
NOT_PD = torch.tensor([[1.0, 3.0], [3.0, 1.0]])  # Cholesky fails


def _outcome(fn, secret):
    try:
        with oblivious.guard("test", [secret]):
            fn(secret)
        return "ran"
    except PermissionDeniedError:
        return "refused"
    except Exception as e:  # noqa: BLE001 - the point: a value-dependent failure would land here
        return type(e).__name__


@pytest.mark.parametrize("fn, a, b", [
    (torch.linalg.cholesky, PD, NOT_PD),
    (lambda s: torch.normal(torch.zeros(2), s), torch.ones(2), -torch.ones(2)),
    (lambda s: torch.linalg.inv(s), PD, torch.zeros(2, 2)),
    (lambda s: F.one_hot(s, 3), torch.tensor([0, 1]), torch.tensor([0, 7])),
])
def test_an_op_not_known_oblivious_is_refused_whatever_the_secret(fn, a, b):
    # without the guard the two secrets give different outcomes: this is an oracle
    plain = []
    for s in (a, b):
        try:
            fn(s)
            plain.append("ran")
        except Exception as e:  # noqa: BLE001
            plain.append(type(e).__name__)
    assert plain[0] != plain[1]
    assert _outcome(fn, a.clone()) == _outcome(fn, b.clone()) == "refused"


def test_allowed_ops_on_a_secret_compute_what_torch_computes():
    torch.manual_seed(0)
    x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
    secret = x.clone()
    with oblivious.guard("test", [secret]):
        got = F.max_pool2d(F.relu(F.conv2d(secret, w, padding=1)), 2).flatten(1).softmax(-1).sum(0)
    assert torch.allclose(got, F.max_pool2d(F.relu(F.conv2d(x, w, padding=1)), 2).flatten(1).softmax(-1).sum(0))
    ring = torch.randint(-2**62, 2**62, (5, 7), dtype=torch.int64)
    s = ring.clone()
    with oblivious.guard("test", [s]):
        out = ((s * 3 + 1) ^ (s >> 2)).t() @ torch.ones(5, 2, dtype=torch.int64)
    assert torch.equal(out, ((ring * 3 + 1) ^ (ring >> 2)).t() @ torch.ones(5, 2, dtype=torch.int64))


def test_a_secret_index_is_refused_but_a_secret_source_is_not():
    idx, src = torch.tensor([0, 2]), torch.arange(4.0)
    with oblivious.guard("test", [src]):
        got = src[idx]
    assert torch.equal(got, torch.tensor([0.0, 2.0]))
    with pytest.raises(PermissionDeniedError, match="indices"):
        with oblivious.guard("test", [idx]):
            src[idx]


def test_the_tables_name_real_aten_ops_once():
    tables = [oblivious_ops.OBLIVIOUS, frozenset(oblivious_ops.VALUE_CHECKED), oblivious_ops.VALUE_SHAPED]
    for i, t in enumerate(tables):
        for u in tables[i + 1:]:
            assert not (t & u), t & u
    for name in frozenset().union(*tables):
        ns, op = name.split("::")
        assert ns == "aten" and hasattr(torch.ops.aten, op), name
