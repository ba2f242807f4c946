"""Non-interference fuzzing of the review policy (in-process workers).

The same random sequence of commands, plans, in-place writes, views, backward passes
and moves runs in two worlds that differ only in the owner's secret dataset (under
``review``). After every step the scientist tries to ``.get()`` everything it holds.
Any value that leaves without an approval must be identical in both worlds: it
cannot depend on the secret. Owner data must be unchanged and the worker must serve.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

import veil as sy
from veil.exceptions import PermissionDeniedError, VeilError
from veil.plans import func2plan

SEQUENCES = int(os.environ.get("VEIL_REVIEW_FUZZ_SEQUENCES", "24"))
STEPS = 10


@func2plan(args_shape=[(2, 3), (2, 3)])
def _mix(a, b):
    return a * 0.5 + b.relu()


def _step(kind: int, pool: list, me, other, rng: random.Random) -> None:
    a, b = pool[rng.randrange(len(pool))], pool[rng.randrange(len(pool))]
    if kind == 0:
        pool.append(a * 2 + b)
    elif kind == 1:
        pool.append(a.copy())
    elif kind == 2:
        pool.append(a.view(-1).view(2, 3))  # an alias of a
    elif kind == 3:
        a.add_(b)  # in place: a may now carry b's data
    elif kind == 4:
        torch.mul(a, b, out=pool[rng.randrange(len(pool))])
    elif kind == 5:
        pool.append(_mix.send(me)(a, b) if not hasattr(_mix, "_ptrs") else _mix._ptrs[me.id](a, b))
    elif kind == 6:
        w = torch.ones(2, 3, requires_grad=True).send(me)
        (a * w).sum().backward()
        pool.append(w.grad)
        pool.append(w)
    elif kind == 7:
        moved = a.copy().move(other)
        pool.append(moved)
    elif kind == 8:
        pool.append(a.sum(dim=0, keepdim=True).expand(2, 3).contiguous())
    elif kind == 9:
        a.zero_()


def _world(hook, secret: torch.Tensor, tag: str):
    owner = sy.VirtualWorker(hook, id=f"fuzz-owner-{tag}")
    other = sy.VirtualWorker(hook, id=f"fuzz-other-{tag}")
    owner.load(secret.clone(), tags=("#secret",), policy="review")
    pool = [owner.search(["#secret"])[0], torch.ones(2, 3).send(owner), torch.arange(6.).reshape(2, 3).send(owner)]
    pool.append(pool[1].view(2, 3))
    return owner, other, pool


def _released(ptr) -> torch.Tensor | str:
    try:
        return ptr.get(delete=False)
    except PermissionDeniedError:  # review pending, or the raw data's private rule
        return "held"
    except VeilError as e:
        return f"error {type(e).__name__}"


@pytest.mark.parametrize("seed", range(SEQUENCES))
def test_nothing_secret_dependent_leaves_without_approval(hook, seed):
    rng = random.Random(seed)
    kinds = [rng.randrange(10) for _ in range(STEPS)]
    picks = rng.random()
    secrets = (torch.tensor([[7.0, -3.0, 11.0], [5.0, 13.0, -17.0]]), torch.tensor([[-2.0, 19.0, 4.0], [23.0, -6.0, 1.0]]))
    worlds = [_world(hook, s, f"{seed}-{i}") for i, s in enumerate(secrets)]
    released = 0
    for step, kind in enumerate(kinds):
        outcomes = []
        for owner, other, pool in worlds:
            r = random.Random(f"{seed}-{step}-{picks}")  # the same choices in both worlds
            try:
                _step(kind, pool, owner, other, r)
                outcomes.append("ok")
            except VeilError as e:
                outcomes.append(type(e).__name__)
        seen = [[_released(p) for p in pool] for _, _, pool in worlds]
        for i, (x, y) in enumerate(zip(*seen)):
            if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
                assert isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and torch.equal(x, y), (
                    f"seed {seed} step {step} ({kinds[:step + 1]}): pool[{i}] leaked a secret-dependent value "
                    f"{x} vs {y}")
                released += 1
    for (owner, _, _), secret in zip(worlds, secrets):
        src = next(e for e in (e for _, e in owner.monitor.owner_entries()) if e.protected)
        assert torch.equal(src.obj, secret)  # nothing the owner stored changed
        assert torch.equal((torch.ones(2) * 3).send(owner).get(), torch.ones(2) * 3)  # still serves
    assert released >= 0
