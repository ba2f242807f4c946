"""A worker's start-up heap is frozen out of the cyclic collector (veil/workers/heap_freeze.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

MODULE = Path(__file__).resolve().parents[2] / "veil" / "workers" / "heap_freeze.py"

# Loads the module by path (no torch import: the check takes milliseconds) and reports what the
# collector will still walk: objects alive before the call, whether they are frozen, and whether a
# cycle that was already garbage survived the freeze.
PROBE = f"""
import gc, importlib.util, weakref
spec = importlib.util.spec_from_file_location("heap_freeze", {str(MODULE)!r})
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
class Node: pass
dead = Node(); dead.me = dead; gone = weakref.ref(dead); del dead  # garbage held only by its own cycle
kept = [Node() for _ in range(1000)]
froze = mod.freeze_startup_heap()
print(froze, gc.get_freeze_count(), gone() is None, len(gc.get_objects()))
"""


@pytest.mark.parametrize("setting", [None, "0"])
def test_start_up_objects_are_frozen_and_dead_cycles_collected_first(setting):
    env = {k: v for k, v in os.environ.items() if k != "VEIL_GC_FREEZE"}
    if setting is not None:
        env["VEIL_GC_FREEZE"] = setting
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    froze, frozen, cycle_gone, walked = out.stdout.split()
    if setting == "0":  # left as Python sets it: nothing frozen, every object still walked
        assert (froze, frozen) == ("False", "0") and int(walked) > 1000
    else:
        assert froze == "True" and int(frozen) > 1000  # the 1,000 kept objects and the interpreter's own
        assert cycle_gone == "True"  # collected before freezing, not kept forever
        assert int(walked) < 100  # the collector walks (almost) nothing made before the freeze


def test_the_worker_command_freezes_before_serving():
    source = (MODULE.parent / "websocket_cli.py").read_text()
    ready = source[source.index("def ready("):]
    assert "freeze_startup_heap()" in ready.split("def ", 2)[1]
