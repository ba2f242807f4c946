"""The recipe side of a dealing request, worked out without any message: the request's recipe
refused unless its size is bounded (:func:`bounded_recipe`), where each item's fields lie and which are
uniform (:func:`recipe_layout`), and, for seeded dealing, the last party's shares of the derived fields
(:func:`_corrections`). The provider (:mod:`veil.mpc.providers.worker_dealer`) and the parties that expand
their seeds use them alike.
"""

from __future__ import annotations

from typing import Any

import torch

from veil.mpc.errors import ProviderError
from veil.mpc.material import (FIXED_KINDS, FROM_SHARES, WIDE_KINDS, check_request_work, derived_sources,
                               last_shares_wide, recipe, sum_wide)
from veil.mpc.prg import expand, expand_sum, subtract_streams
from veil.mpc.providers.fss_dealing import MAX_BATCH_ELEMENTS
from veil.mpc.ring import DTYPE
from veil.mpc.runtime import DEALT_FIXED, step_check
from veil.shapes import numel


def _label(k: int, field: int) -> str:
    return f"{k}/{field}"


#: most ring elements one dealing request may make per party (1 GiB of int64 or 512 MiB for wide kinds'
#: pairs), checked before anything is generated or expanded: the requester names count and shapes, and
#: the provider and the parties allocate them (an honest client's requests hold ``max_elements``, 2^23)
MAX_DEAL_ELEMENTS = 1 << 27


def bounded_recipe(kind: str, spec: Any, count: Any) -> tuple[list, list, Any]:
    """:func:`veil.mpc.material.recipe` of a dealing request for ``count`` items, refused unless
    ``count`` is a positive int and the items hold at most :data:`MAX_DEAL_ELEMENTS` ring elements."""
    if type(count) is not int or count < 1:
        raise ProviderError(f"a dealing needs a positive item count, got {repr(count)[:40]}")
    uniform_shapes, derived_shapes, derive = recipe(kind, spec)
    shapes = uniform_shapes + derived_shapes
    if any(int(d) < 0 for shape in shapes for d in shape):
        raise ProviderError(f"a {kind!r} dealing spec has a negative dimension")
    elements = count * sum(max(1, numel(shape)) for shape in shapes)  # (an empty field is still a loop step)
    bound = MAX_DEAL_ELEMENTS if count == 1 else MAX_BATCH_ELEMENTS  # (a batch: the honest dealer's max_elements)
    if elements > bound:
        raise ProviderError(f"a dealing of {count} {kind!r} items would make {elements} ring elements per party, "
                            f"more than {bound} in one request")
    check_request_work(kind, spec, count)  # (and the items' product work: the dealing slot)
    return uniform_shapes, derived_shapes, derive


def _corrections(kind: str, uniform_shapes: list, derived_shapes: list, derive: Any, xor: frozenset,
                 seeds: list, count: int, gen: torch.Generator) -> list:
    """The last party's shares of every derived field of ``count`` items: each field's value minus
    (or XOR) the other parties' streams for it, folded in place (:func:`veil.mpc.prg.subtract_streams`);
    the uniform fields' values come from every seed's stream in one pass (:func:`expand_sum`)."""
    n_u = len(uniform_shapes)
    corrections = []
    for k in range(count):
        step_check()  # a session gone (disconnected, past its deadline) stops here: its items held the dealing slot
        if kind in WIDE_KINDS:  # 128-bit SPDZ2k fields: sums and corrections with carries
            uniform = sum_wide([[expand(s, _label(k, j), shape) for s in seeds]
                                for j, shape in enumerate(uniform_shapes)])
            values = derive(uniform, gen)
            others = [[expand(s, _label(k, n_u + j), shape) for s in seeds[:-1]]
                      for j, shape in enumerate(derived_shapes)]
            corrections += last_shares_wide(values, others)
            continue
        if kind in FROM_SHARES:  # derived from each party's shares: every seed's streams, as the parties expand them
            shares = [[expand(s, _label(k, j), shape) for j, shape in enumerate(uniform_shapes)] for s in seeds]
            values = _own(derive(shares), derived_shapes, [u for party in shares for u in party])
        else:
            uniform = [expand_sum(seeds, _label(k, j), shape, j in xor) for j, shape in enumerate(uniform_shapes)]
            values = _own(derive(uniform, gen), derived_shapes, uniform)
        corrections += [subtract_streams(v, seeds[:-1], _label(k, n_u + j), n_u + j in xor)
                        for j, v in enumerate(values)]
    return corrections


def _own(values: list, shapes: list, uniform: list) -> list:
    """The derived values as tensors of their fields' shapes that nothing else holds (they are
    corrected in place): one that shares memory with another (a derive may return a uniform field
    itself, or one value twice) or is not contiguous is copied."""
    seen = {u.untyped_storage().data_ptr() for u in uniform if u.numel()}
    out = []
    for v, shape in zip(values, shapes):
        if tuple(v.shape) != tuple(shape):
            raise ProviderError(f"a derived field has shape {tuple(v.shape)}, its recipe says {tuple(shape)}")
        ptr = v.untyped_storage().data_ptr() if v.numel() else None
        if v.dtype != DTYPE or not v.is_contiguous() or (ptr is not None and ptr in seen) or v._base is not None:
            v = v.to(DTYPE).contiguous().clone()
            ptr = v.untyped_storage().data_ptr() if v.numel() else None
        if ptr is not None:
            seen.add(ptr)
        out.append(v)
    return out


def recipe_layout(kind: str, spec: Any, count: int) -> list[tuple[int, Any, Any]]:
    """``(item index, uniform?, sources)`` of each of ``count`` items' fields, item-major (uniform fields
    first); a fixed mask's field is marked :data:`DEALT_FIXED` instead of False; ``sources``: a derived
    field's uniform sources where tracked (:func:`veil.mpc.material.derived_sources`), else None."""
    uniform_shapes, derived_shapes, _ = recipe(kind, spec)
    fields = [True] * len(uniform_shapes) + [DEALT_FIXED if kind in FIXED_KINDS else False] * len(derived_shapes)
    sources = [None] * len(uniform_shapes) + (derived_sources(kind, spec) or [None] * len(derived_shapes))
    return [(k, uniform, src) for k in range(int(count)) for uniform, src in zip(fields, sources)]
