"""The hook adds verbs and replaces nothing: plain torch, TorchScript and compile still work."""

import subprocess
import sys

import torch

import veil as sy
from veil.hook import ATTACHMENTS


def test_hook_only_adds_names_torch_lacks():
    code = (
        "import torch, torch.nn as nn\n"
        "names = [(c, n) for c, n in [" + ",".join(f"({c.__module__}.{c.__qualname__}, {n!r})"
                                           .replace("torch._tensor.", "torch.").replace("torch.nn.modules.module.", "nn.")
                                           for c, n, _ in ATTACHMENTS) + "] if hasattr(c, n)]\n"
        "assert not names, names\n"
        "before = {k: id(v) for k, v in vars(torch.Tensor).items()}\n"
        "import veil as sy; sy.TorchHook(torch)\n"
        "after = {k: id(v) for k, v in vars(torch.Tensor).items()}\n"
        "changed = [k for k in before if after[k] != before[k]]\n"
        "assert not changed, changed\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_hook_is_idempotent(hook):
    sy.TorchHook(torch)
    assert torch.Tensor.send is sy.send


def test_plain_torch_and_jit_script_after_hook(hook):
    @torch.jit.script
    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) * 2 + x.sum()

    x = torch.tensor([-1.0, 2.0, 3.0])
    assert torch.equal(f(x), torch.relu(x) * 2 + x.sum())
    m = torch.nn.Linear(3, 2)
    scripted = torch.jit.script(m)
    assert torch.allclose(scripted(x), m(x))


def test_torch_compile_after_hook(hook):
    def f(x):
        return torch.sin(x) ** 2 + torch.cos(x) ** 2

    compiled = torch.compile(f, backend="aot_eager")
    x = torch.randn(16)
    assert torch.allclose(compiled(x), torch.ones(16), atol=1e-6)
