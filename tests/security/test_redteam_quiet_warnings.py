"""Third red team of the warnings requester code raises on a worker: the mechanism itself
(veil/workers/quiet_warnings.py: one process-wide filter entry that matches only on threads running requester
code, counted per thread). One test per finding (a strict xfail on the code before its fix), then guards for what
held.

Hole found and fixed:
- the thread's count was raised before the filter was put first: a start that raised there (an interrupt, memory)
  ran no ``__exit__`` and left the count at 1, so once any run put the filter first, every warning of that thread
  (a pool thread's later owner code, the owner's main thread) was dropped for ever; ``capturing`` also left its
  list as the thread's destination.

Held (guards): a requester's dropped warning stores nothing in the registry of the code that raised it (an
owner's later identical warning, same text and line, is still shown: "ignore" returns before the registry is
written); ``warn_explicit`` with its own registry and module globals is dropped and writes nothing there; an
owner's ``showwarning`` / ``logging.captureWarnings`` never see a requester's warning; a run that raises midway
leaves a reused pool thread showing the owner's warnings; ``-W error`` and ``PYTHONWARNINGS`` at interpreter
start do not reach requester code and still decide the owner's; entering and leaving costs about a microsecond.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

from veil.workers import quiet_warnings as qw


def _on_own_thread(fn):
    """``fn()`` on a fresh thread (a count left behind must not reach the test process's main thread); its
    exception re-raised here."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test's thread
            box["error"] = e
    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _resizing_add(n):
    """A C++ warning (TORCH_WARN: ``out=`` of the wrong size resized) and a Python one (``mse_loss`` of a column
    against a row), raised from this one line each."""
    torch.add(torch.ones(n), 1.0, out=torch.zeros(n + 1)); F.mse_loss(torch.ones(n, 1), torch.ones(n))  # noqa: E702


# ------------------------------------------------------------------ hole: a start that raised

@pytest.mark.parametrize("how", ["dropped", "capturing"])
def test_a_run_that_fails_to_start_leaves_its_thread_showing_the_owners_warnings(monkeypatch, how):
    """A start interrupted while putting the filter first (KeyboardInterrupt here) left this thread counted as
    running requester code: after any other run put the filter first, the owner's own "error" warning on this
    thread was dropped (and every later one, for as long as the worker runs)."""
    real_put_first, victim = qw._put_first, {}

    def interrupted():
        if threading.current_thread() is victim.get("thread"):
            raise KeyboardInterrupt
        real_put_first()
    monkeypatch.setattr(qw, "_put_first", interrupted)

    def owner_thread():
        victim["thread"] = threading.current_thread()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # (before the filter: the next start must move it)
            with pytest.raises(KeyboardInterrupt):
                with (qw.DROPPED if how == "dropped" else qw.capturing([])):
                    pass
            victim["thread"] = None
            _on_own_thread(lambda: qw.DROPPED.__enter__() or qw.DROPPED.__exit__())  # another run: filter first
            assert warnings.filters[0] in qw._TWINS
            state = (qw._RUNNING.depth, qw._RUNNING.caught)
            with pytest.raises(UserWarning, match="the owner's own"):
                warnings.warn("the owner's own", UserWarning)
        return state
    assert _on_own_thread(owner_thread) == (0, None)


# ------------------------------------------------------------------ guards

def test_a_dropped_warning_leaves_nothing_that_hides_the_owners_identical_warning():
    """The requester's warnings (same text, same line as the owner's later ones) store nothing in the raising
    module's ``__warningregistry__``: under "default" the owner's own, raised next from that line, is shown."""
    def run():
        with warnings.catch_warnings(record=True) as shown:
            warnings.simplefilter("default")
            with qw.DROPPED:
                _resizing_add(5)
            assert not shown, [str(w.message)[:60] for w in shown]
            _resizing_add(5)
        return sorted(str(w.message)[:20] for w in shown)
    texts = _on_own_thread(run)
    assert len(texts) == 2 and texts[0].startswith("An output with one") and texts[1].startswith("Using a target"), texts


def test_warn_explicit_with_its_own_registry_and_globals_is_dropped_and_writes_nothing():
    """``warn_explicit`` given its registry and module globals (the path a module-level caller can take) is
    dropped on a requester thread, even under the owner's "error", and its registry keeps no entry."""
    registry: dict = {}

    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with qw.DROPPED:
                warnings.warn_explicit("value 17 seen", UserWarning, "plan.py", 3, module="plan", registry=registry,
                                       module_globals={"__name__": "plan"})
            with pytest.raises(UserWarning):
                warnings.warn_explicit("value 17 seen", UserWarning, "plan.py", 3, module="plan", registry={})
    _on_own_thread(run)
    assert [k for k in registry if k != "version"] == []


def test_the_owners_showwarning_and_logging_capture_see_only_the_owners_warnings():
    """An owner that routes warnings to its log (``logging.captureWarnings``, its own ``showwarning``) gets no
    line for a requester's warnings, and still gets its own."""
    records: list = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("py.warnings")
    logger.addHandler(handler)

    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            logging.captureWarnings(True)
            try:
                with qw.DROPPED:
                    _resizing_add(4)
                warnings.warn("owner line", UserWarning)
            finally:
                logging.captureWarnings(False)
    try:
        _on_own_thread(run)
    finally:
        logger.removeHandler(handler)
    assert ["UserWarning: owner line" in r.getMessage() for r in records] == [True], \
        [r.getMessage()[:80] for r in records]


def test_a_run_that_raises_midway_leaves_a_reused_pool_thread_showing_the_owners_warnings():
    """A handler thread whose requester run raised in the middle (nested runs, a cancelled command) then runs the
    owner's code: the owner's warnings there follow the owner's filters again."""
    def requester():
        with qw.DROPPED:
            with qw.capturing([]):
                _resizing_add(3)
                raise ValueError("cancelled midway")

    def owner():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(UserWarning):
                _resizing_add(3)
        return qw._RUNNING.depth, qw._RUNNING.caught
    with ThreadPoolExecutor(max_workers=1) as pool:
        with pytest.raises(ValueError):
            pool.submit(requester).result(30)
        assert pool.submit(owner).result(30) == (0, None)


def test_interpreter_start_W_error_and_PYTHONWARNINGS_reach_the_owner_not_requester_code():
    """A worker started with ``-W error`` and ``PYTHONWARNINGS=error``: requester code's C++ and Python warnings
    are dropped (a value-dependent one failed the command: one bit), the owner's own still raise."""
    script = (
        "import sys, warnings, torch, torch.nn.functional as F\n"
        "from veil.workers.quiet_warnings import DROPPED\n"
        "assert sys.warnoptions, sys.warnoptions\n"
        "with DROPPED:\n"
        "    torch.add(torch.ones(2), 1.0, out=torch.zeros(3)); F.mse_loss(torch.ones(2, 1), torch.ones(2))\n"
        "try:\n"
        "    torch.add(torch.ones(2), 1.0, out=torch.zeros(3))\n"
        "except UserWarning:\n"
        "    print('owner raised')\n")
    env = dict(os.environ, PYTHONWARNINGS="error", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-W", "error", "-c", script], capture_output=True, text=True, env=env,
                          timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
                              __file__)))))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "owner raised"


def test_entering_and_leaving_costs_about_a_microsecond():
    """The mechanism is on every command's path: a run's start and end (the filter already first) stay cheap."""
    def runs(n=20000):
        start = time.perf_counter()
        for _ in range(n):
            with qw.DROPPED:
                pass
        return (time.perf_counter() - start) / n
    _on_own_thread(lambda: qw.DROPPED.__enter__() or qw.DROPPED.__exit__())
    best = min(runs() for _ in range(5))
    assert best < 5e-6, f"{best * 1e6:.2f} us a run"


def test_a_process_forked_inside_a_run_shows_its_own_warnings():
    """A child forked while its thread ran requester code inherited the count and dropped every warning."""
    import os
    import warnings

    from veil.workers import quiet_warnings

    read, write = os.pipe()
    with quiet_warnings.DROPPED:
        pid = os.fork()
        if pid == 0:  # the child: owner code from here on
            os.close(read)
            seen = []
            warnings.showwarning = lambda *a, **k: seen.append(a)  # (the filters as they are: the run's first)
            warnings.warn(f"the child's own warning {os.getpid()}", UserWarning)
            os.write(write, b"shown" if seen else b"dropped")
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    assert os.read(read, 16) == b"shown"
    os.close(read)
