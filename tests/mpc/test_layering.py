"""Layering: ``veil.mpc`` is protocol code; it imports neither ``veil.tensors`` nor ``veil.workers``.

The tensors/workers side reaches the protocols through the injected party
runtime (``veil.mpc.runtime``), registered by ``veil.tensors.mpc_glue.runtime``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import veil
from veil.mpc import runtime as mpc_runtime

MPC = Path(veil.__file__).parent / "mpc"
FORBIDDEN = ("veil.tensors", "veil.workers")

#: exceptions (path relative to veil/mpc): none. An entry here must name a file that
#: still imports tensors/ or workers/ (checked below), with the reason beside it.
ALLOWED: set[str] = set()


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module a file imports (absolute, relative resolved), at any depth (functions too)."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(("veil",) + path.relative_to(MPC.parent).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            found.append((node.lineno, str(node.args[0].value)))
    return found


def _violations(files) -> list[str]:
    bad = []
    for path in files:
        for line, name in _imports(path):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN):
                bad.append(f"veil/mpc/{path.relative_to(MPC)}:{line} imports {name}")
    return bad


def test_no_mpc_module_imports_tensors_or_workers():
    files = [p for p in sorted(MPC.rglob("*.py")) if str(p.relative_to(MPC)) not in ALLOWED]
    assert len(files) > 20  # the scan really sees the package
    assert _violations(files) == []


def test_the_scan_catches_every_import_form(tmp_path, monkeypatch):
    fake = tmp_path / "veil" / "mpc"
    (fake / "sub").mkdir(parents=True)
    (fake / "a.py").write_text("import veil.tensors.pointer\n")
    (fake / "b.py").write_text("def f():\n    from veil.workers.base import BaseWorker\n")
    (fake / "sub" / "c.py").write_text("from ...tensors import additive\n")
    (fake / "d.py").write_text("from veil import workers\n")
    (fake / "e.py").write_text("import importlib\nimportlib.import_module('veil.tensors.additive')\n")
    (fake / "ok.py").write_text("from veil.mpc import ring\nfrom veil.messaging import messages\n")
    monkeypatch.setattr(sys.modules[__name__], "MPC", fake)
    bad = _violations(sorted(fake.rglob("*.py")))
    assert sorted({b.split(":")[0] for b in bad}) == ["veil/mpc/a.py", "veil/mpc/b.py", "veil/mpc/d.py", "veil/mpc/e.py",
                                             "veil/mpc/sub/c.py"]


def test_allowed_exceptions_still_exist():
    # An exception for a file that no longer imports tensors/workers must be dropped.
    for name in ALLOWED:
        assert _violations([MPC / name]), f"{name} no longer needs its layering exception: remove it from ALLOWED"


def test_the_worker_runtime_is_injected():
    from veil.tensors.mpc_glue.runtime import RUNTIME
    from veil.tensors.pointer import PointerTensor
    from veil.workers.monitor import DEALER_TAG

    assert mpc_runtime.runtime_of(PointerTensor.__new__(PointerTensor, None, 1, None, (1,), __import__(
        "torch").int64)) is RUNTIME
    assert mpc_runtime.default_runtime() is RUNTIME
    assert mpc_runtime.DEALER_TAG == DEALER_TAG


@pytest.mark.parametrize("old", ["maximum", "module", "optim", "remote_sharing", "tensor_api"])
def test_tensor_glue_lives_in_tensors(old):
    import importlib

    assert not (MPC / f"{old}.py").exists()
    assert importlib.import_module(f"veil.tensors.mpc_glue.{old}")
