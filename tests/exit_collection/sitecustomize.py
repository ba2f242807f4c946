"""Imported at start-up by the Python processes that tests/compat/test_examples.py (the examples) and
tests/serving/test_r_walkthrough.py (reticulate's Python inside Rscript) start: this folder is on their
PYTHONPATH. At exit it collects once and freezes the heap, so the interpreter's exit does not walk every object
torch allocated again (0.5-2 s of a 2-core host per process, the test waiting on it). The programs themselves
run unchanged; ``python -m veil.cli`` does the same (veil/cli.py)."""

import atexit
import gc


def _spare_the_exit_collection() -> None:
    gc.collect()
    gc.freeze()


atexit.register(_spare_the_exit_collection)  # registered first: runs after the program's own exit handlers
