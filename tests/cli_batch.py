"""Runs ``veil`` commands in ONE long-lived Python process, each as ``python -m veil.cli ARGS`` would see it.

Each new process imports torch (~2-3 s of CPU on the CI host); tests that only check how a command fails
(status, one line, nothing secret printed) pay that once per module instead of once per command. Every
command gets the environment and working folder it names and its own fresh file descriptors 1 and 2 (dup2,
so output that C code writes straight to the descriptors is captured too); an uncaught exception prints its
traceback on that stderr and gives status 1, as the interpreter would. A command that does not end in time
(a worker that started and serves) raises subprocess.TimeoutExpired, as subprocess.run does: its process is
killed and the next command gets a fresh one.

    done = run_veil(["worker", "--db", url], env=env, cwd=ROOT)   # a CompletedProcess

``run_veil`` uses one runner per test process (pytest-xdist starts two), closed at its exit.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

_REPORT_FD = 100  # the driver's real stdout, kept where the commands' descriptors 1 and 2 do not reach


class CliRunner:
    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def run(self, argv: list[str], *, env: dict, cwd: Path | str,
            timeout: float = 180) -> subprocess.CompletedProcess:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = subprocess.Popen([sys.executable, __file__], cwd=Path(__file__).parents[1],
                                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            proc = self._proc
            proc.stdin.write(json.dumps({"argv": list(argv), "env": dict(env), "cwd": str(cwd)}) + "\n")
            proc.stdin.flush()
            reply: list[str] = []
            reader = threading.Thread(target=lambda: reply.append(proc.stdout.readline()), daemon=True)
            reader.start()
            reader.join(timeout)
            line = reply[0] if reply else None  # (read before the kill below ends the reader with "")
            if not line:
                self._stop(proc)
                self._proc = None
                if line is None:
                    raise subprocess.TimeoutExpired(["veil", *argv], timeout)
                raise AssertionError(f"the command runner died running veil {argv} (status {proc.returncode}; "
                                     "a command that ends its process is for subprocess.run, not this runner)")
            code, out, err = json.loads(line)
            return subprocess.CompletedProcess(["veil", *argv], code, out, err)

    @staticmethod
    def _stop(proc: subprocess.Popen) -> None:
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()

    def close(self) -> None:
        with self._lock:
            if self._proc is not None:
                self._stop(self._proc)
                self._proc = None

    def __enter__(self) -> CliRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_shared: CliRunner | None = None
_shared_lock = threading.Lock()


def run_veil(argv: list[str], *, env: dict, cwd: Path | str, timeout: float = 180) -> subprocess.CompletedProcess:
    """``python -m veil.cli *argv`` to completion, in this test process's shared runner."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = CliRunner()
            atexit.register(_shared.close)
    return _shared.run(argv, env=env, cwd=cwd, timeout=timeout)


def _run_one(argv: list[str]) -> tuple[int, str, str]:
    import tempfile
    import traceback

    from veil.cli import main

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=sys.stderr)
        except BaseException:  # what the interpreter would print for an uncaught exception
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, was in zip((1, 2), saved):
            os.dup2(was, fd)
            os.close(was)
        texts = []
        for f in (out, err):
            f.seek(0)
            texts.append(f.read().decode("utf-8", "replace"))
    return int(code or 0), texts[0], texts[1]


def _serve() -> None:
    os.dup2(1, _REPORT_FD)
    os.dup2(os.open(os.devnull, os.O_RDWR), 1)  # nothing but replies reaches the runner's pipe
    sys.path[0] = os.getcwd()  # the checkout, not tests/
    for line in sys.stdin:
        request = json.loads(line)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        reply = memoryview((json.dumps(_run_one(request["argv"])) + "\n").encode())
        while reply:
            reply = reply[os.write(_REPORT_FD, reply):]
    os._exit(0)  # the commands' exit handlers and threads are not the runner's business


if __name__ == "__main__":
    _serve()
