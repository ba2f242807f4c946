"""The hook adds verbs and replaces nothing: plain torch, TorchScript and compile still work."""

import subprocess
import sys

import torch

import veil as sy


def test_hook_only_adds_names_torch_lacks():
    # A fresh process: importing veil attaches nothing; TorchHook adds only new names.
    code = (
        "import torch, torch.nn as nn\n"
        "import veil as sy\n"
        "from veil.hook import ATTACHMENTS\n"
        "clash = [f'{c.__qualname__}.{n}' for c, n, _ in ATTACHMENTS if hasattr(c, n)]\n"
        "assert not clash, clash\n"
        "classes = {c for c, _, _ in ATTACHMENTS}\n"
        "before = {c: {k: id(v) for k, v in vars(c).items()} for c in classes}\n"
        "sy.TorchHook(torch)\n"
        "for c in classes:\n"
        "    after = {k: id(v) for k, v in vars(c).items()}\n"
        "    changed = [k for k in before[c] if after[k] != before[c][k]]\n"
        "    assert not changed, (c, changed)\n"
        "    added = set(after) - set(before[c])\n"
        "    assert added == {n for cc, n, _ in ATTACHMENTS if cc is c}, (c, added)\n"
        "print('ok', len(ATTACHMENTS))\n"
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
