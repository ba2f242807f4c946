"""Red team (session 67): a ring convolution's padding materialized in full, whatever its operands held.

Attack: a convolution's ``padding`` is a request-written integer (up to ``ring.OP_KWARG_MAX`` = 4096 per side). The
ring's unfold form (``ring._conv2d_unfold``, taken for few output positions against many output channels) padded the
input with ``F.pad`` before cutting its patches. ``beaver_combine`` on five stored tensors of ~1 KiB (e, a of shape
(1, 1, 1, 1), b (36, 1, 1, 1), c (1, 36, 3, 3)) with ``padding=1024, stride=1024`` made a 2049 x 2049 int64 tensor
(33 MiB) under a 1 MiB session quota; 4096 and a batch of 16 made 8.6 GB. The quota charges stored tensors and sizes
torch ops on meta; a worker function's temporaries are not sized, and the result (c's shape) and work bound
(``material.MAX_PRODUCT_WORK``) were tiny. The provider's dealing (``c = conv2d(a, b)``) and the SPDZ2k combine take
the same function.

Must hold: the convolution makes nothing larger than its input and its patches (the taps gathered from the input
where the padded input would be larger), with the same ring result as ``F.conv2d``; the worker serves on.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from veil.ids import new_id
from veil.messaging import messages as m
from veil.mpc import ring

from aten_watch import LargestMade  # noqa: E402
from server_sessions import (answers_next_command, open_session, quota_worker, request, run_command,  # noqa: E402
                             send_tensor)

TOKEN = "rt67-conv-padding-scientist-0123456789abcdef"
#: entries the attack's padded input held (2049 x 2049); anything its patches need is 324
PADDED = 2049 * 2049
SMALL = 1 << 12



def test_a_combine_never_makes_the_padded_input(hook):
    srv = quota_worker(hook, f"rt67-conv-{new_id() % 10**9}", TOKEN, 1 << 20)
    s = open_session(srv, TOKEN)
    e = torch.arange(1, 2, dtype=torch.int64).view(1, 1, 1, 1)
    b = torch.arange(36, dtype=torch.int64).view(36, 1, 1, 1)
    refs = [m.ObjectRef(send_tensor(srv, s, t)) for t in (e, b, torch.zeros(1, 36, 3, 3, dtype=torch.int64))]
    a, b_ref, c = refs
    geometry = {"stride": 1024, "padding": 1024}
    with LargestMade() as made:
        reply, (rid,) = run_command(srv, s, "veil.mpc.beaver_combine", a, b_ref, c, a, b_ref, "conv2d", True, geometry)
    assert made.most < SMALL, f"the combine made a tensor of {made.most} entries (padded input: {PADDED})"
    assert type(reply) is m.OkReply, reply
    # z = c + conv(e, b + f) + conv(a, f) with a = e and f = b: the ring result, computed
    got = request(srv, s, m.GetObjectsMessage([rid], False, None))
    want = F.conv2d(e, 2 * b, None, 1024, 1024) + F.conv2d(e, b, None, 1024, 1024)
    assert type(got) is m.ObjectsReply and torch.equal(got.objects[0], want), got
    answers_next_command(srv, s)


def test_the_ring_convolution_makes_no_padded_input():
    x = torch.ones(2, 1, 1, 1, dtype=torch.int64)
    w = torch.ones(36, 1, 1, 1, dtype=torch.int64)
    with LargestMade() as made:
        out = ring.conv2d(x, w, stride=1024, padding=1024)
    assert made.most < SMALL, f"ring.conv2d made a tensor of {made.most} entries"
    assert torch.equal(out, F.conv2d(x, w, None, 1024, 1024))


def test_the_unfold_form_is_the_ring_convolution_at_any_padding():
    """Both forms (padded and gathered) against F.conv2d, wrapping int64, groups and dilation; and on meta."""
    g = torch.Generator().manual_seed(0)
    checked = 0
    for (n, c_in, h, wd, c_out, kh, kw, groups) in [(2, 2, 5, 6, 8, 3, 2, 1), (1, 4, 3, 3, 16, 2, 2, 2),
                                                    (1, 1, 1, 1, 36, 1, 1, 1), (3, 2, 4, 7, 4, 3, 3, 2)]:
        for stride, padding, dilation in itertools.product([1, 2, 5], [0, 1, 3, 9, (0, 4)], [1, 2]):
            x = torch.randint(-2**62, 2**62, (n, c_in, h, wd), generator=g)
            w = torch.randint(-2**62, 2**62, (c_out, c_in // groups, kh, kw), generator=g)
            try:
                want = F.conv2d(x, w, None, stride, padding, dilation, groups)
            except RuntimeError:
                continue
            assert torch.equal(ring._conv2d_unfold(x, w, stride, padding, dilation, groups), want)
            meta = ring._conv2d_unfold(x.to("meta"), w.to("meta"), stride, padding, dilation, groups)
            assert meta.shape == want.shape
            checked += 1
    assert checked > 100
