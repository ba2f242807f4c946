"""veil.shapes.broadcast_shape against torch.broadcast_shapes: the same result, the same refusals."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.shapes import broadcast_shape

dims = st.lists(st.integers(0, 4), max_size=4)


def _torch(*shapes):
    try:
        return ("ok", torch.broadcast_shapes(*shapes))
    except Exception as e:  # noqa: BLE001  (the same class of error is what must match)
        return ("error", type(e))


def _ours(*shapes):
    try:
        return ("ok", broadcast_shape(*shapes))
    except Exception as e:  # noqa: BLE001
        return ("error", type(e))


@settings(max_examples=300, deadline=None)
@given(st.lists(dims, min_size=1, max_size=5), st.booleans(), st.booleans())
def test_broadcast_shape_matches_torch(shapes, as_size, repeat_first):
    """Random shapes (equal ones made likely by repeating the first), as tuples, lists or torch.Size."""
    if repeat_first:
        shapes = [shapes[0]] * len(shapes)
    given_shapes = [torch.Size(s) if as_size else (tuple(s) if k % 2 else list(s)) for k, s in enumerate(shapes)]
    want, got = _torch(*given_shapes), _ours(*given_shapes)
    assert got == want
    if got[0] == "ok":
        assert type(got[1]) is torch.Size


@pytest.mark.parametrize("shapes", [((-1,), (-1,)), ((2, -3), (2, -3)), ((True,), (True,)), (3, 3), ((2,), 2), ()])
def test_unusual_arguments_go_to_torch(shapes):
    """Negative or bool dimensions, ints for shapes, no shapes: exactly what torch answers."""
    assert _ours(*shapes) == _torch(*shapes)


@settings(max_examples=200, deadline=None)
@given(dims)
def test_numel_is_the_element_count(shape):
    from veil.shapes import numel

    assert numel(shape) == torch.Size(shape).numel() == torch.empty(shape).numel()
