"""The first shared product of a process computes its shapes without meta arithmetic.

Arithmetic on meta tensors runs through torch's Python references, the first of which imports
``torch._dynamo`` (~1 s once per process): the first fixed-point product's shape inference (the masks'
opening, the truncation's, the triple's product shape) paid it. Its steps now build their meta results
from broadcast shapes (``veil.mpc.ring.meta_result``). Checked in a fresh interpreter, against torch.
"""

from __future__ import annotations

import subprocess
import sys

SCRIPT = r"""
import sys
import torch
import torch.nn.functional as F
import veil as sy

hook = sy.TorchHook(torch)
alice, bob, cp = (sy.VirtualWorker(hook, id=n) for n in ("alice", "bob", "cp"))
sh = lambda t: t.fix_precision().share(alice, bob, crypto_provider=cp)
x, w, im = torch.randn(4, 4), torch.randn(2, 1, 3, 3), torch.randn(1, 1, 6, 6)
got = {"matmul": ((sh(x) @ sh(x)).get().float_precision(), x @ x),
       "mul": ((sh(x) * sh(x)).get().float_precision(), x * x),
       "conv2d": (F.conv2d(sh(im), sh(w)).get().float_precision(), F.conv2d(im, w))}
for name, (a, b) in got.items():
    assert torch.allclose(a, b, atol=1e-2), (name, a, b)
print("dynamo imported:", "torch._dynamo" in sys.modules)
"""


def test_the_first_products_import_no_dynamo():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "dynamo imported: False" in out.stdout, out.stdout
