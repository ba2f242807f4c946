"""Every examples/*.py runs to completion in its short mode (VEIL_EXAMPLE_SHORT=1)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.py"))
#: examples run at once: the test process only waits on them, so a second one uses the core it leaves idle
AT_ONCE = 2
TIMEOUT = 300
#: a sitecustomize that spares each example's exit the interpreter's walk over torch's objects (its docstring)
EXIT_COLLECTION = Path(__file__).resolve().parents[1] / "exit_collection"


def test_there_is_one_example_per_topic():
    assert len(EXAMPLES) >= 15


class _Runs:
    """The selected examples, run in the background AT_ONCE at a time in the tests' order; ``result(path)``
    waits for one (returncode, stdout, stderr). Whatever still runs at the end is killed."""

    def __init__(self, paths: list[Path]) -> None:
        self._procs: list[subprocess.Popen] = []
        self._lock = threading.Lock()
        self._closed = False
        self._pool = ThreadPoolExecutor(AT_ONCE)
        self._futures = {p: self._pool.submit(self._run, p) for p in paths}

    def _run(self, path: Path):
        env = {**os.environ, "VEIL_EXAMPLE_SHORT": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        root = str(path.parents[1])
        env["PYTHONPATH"] = os.pathsep.join([root, str(EXIT_COLLECTION), env.get("PYTHONPATH", "")])
        with self._lock:
            if self._closed:
                return None, "", "(not run: the module's tests ended)"
            proc = subprocess.Popen([sys.executable, str(path)], cwd=root, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            self._procs.append(proc)
        try:
            out, err = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            return None, out, err + f"\n(timed out after {TIMEOUT} s)"
        return proc.returncode, out, err

    def result(self, path: Path):
        future = self._futures.get(path)
        if future is None:  # not among the selected ones (a test run by itself): run it now
            return self._run(path)
        return future.result()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for proc in self._procs:
                if proc.poll() is None:
                    proc.kill()
        self._pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def example_runs(request):
    """Starts every selected example of this module's parametrized test at once (AT_ONCE at a time)."""
    selected = [item.callspec.params["path"] for item in request.session.items
                if getattr(item, "module", None) is request.module and hasattr(item, "callspec")
                and "path" in item.callspec.params and not item.get_closest_marker("skip")]
    runs = _Runs(selected)
    yield runs
    runs.close()


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs_in_short_mode(path, example_runs):
    returncode, stdout, stderr = example_runs.result(path)
    assert returncode == 0, f"{path.name} failed:\n{stdout[-2000:]}\n{stderr[-4000:]}"
    assert stdout.strip(), f"{path.name} printed nothing"


@pytest.mark.parametrize("args, returncode, says", [
    (["--client", "/nonexistent/cluster.json"], 1, "cannot read cluster file /nonexistent/cluster.json"),
    (["--client"], 2, "usage:"),  # ran the owner, ignoring the flag
])
def test_keras_serving_client_input_errors_are_one_line(args, returncode, says):
    path = EXAMPLES[0].parent / "keras_serving.py"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env["PYTHONPATH"] = os.pathsep.join([str(path.parents[1]), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(path), *args], cwd=path.parents[1], env=env, capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert proc.returncode == returncode, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert says in proc.stderr
