"""SPDZ2k protocol steps as release paths, and the layering of the MAC code.

A hostile scientist who sends the MAC openings (``mac_*`` OpenMessages) on an
owner's private tensors gets no owner value back, the owner's data is
unchanged and the worker keeps serving.
"""

import ast
import sys
from pathlib import Path

import pytest
import torch

import veil as sy
import veil.mpc  # noqa: F401  (registers OpenMessage and the protocol steps)
from veil.messaging import messages as m
from veil.mpc.party import OPENABLE, OpenMessage

sys.path.insert(0, str(Path(__file__).parents[1] / "security"))
from taint_fuzz import VirtualTarget, bit_identical, sentinel_patterns  # noqa: E402

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def target():
    return VirtualTarget(sy.TorchHook(torch))


def _requests(ref):
    seed = torch.zeros(32, dtype=torch.uint8)
    return {
        "mac_beaver_mask": (ref,) * 8,
        "mac_trunc_mask": (ref, ref, ref, ref, 0),
        "mac_output_mask": (ref, ref, ref),
        "mac_gamma": (seed, [[[4], [[1, ref, ref]]]]),
    }


@pytest.mark.parametrize("name", ["mac_beaver_mask", "mac_trunc_mask", "mac_output_mask", "mac_gamma"])
def test_mac_openings_of_owner_data_release_nothing(target, name):
    assert name in OPENABLE
    before = target.owner_tensors()
    ref = m.ObjectRef(target.owner_ids["private_i64"])
    raw = target.send("scientist", OpenMessage(name, _requests(ref)[name], {}))
    assert not any(p in raw for p in sentinel_patterns())
    after = target.owner_tensors()
    assert bit_identical(before, after) == []
    assert target.serves()


@pytest.mark.parametrize("module", ["veil/mpc/mac.py", "veil/mpc/ring128.py", "veil/mpc/material.py"])
def test_mac_protocol_modules_import_no_tensor_or_worker_code(module):
    tree = ast.parse((ROOT / module).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n.startswith(("veil.tensors", "veil.workers"))]
