"""Starts ``veil worker`` processes on loopback (tests, benchmarks, local simulations)."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

from veil.exceptions import WorkerStartError


def free_port() -> int:
    """A TCP port that was free a moment ago, below the kernel's ephemeral range when there is room.

    A port the OS picks for ``bind(0)`` comes from the ephemeral range, from which every outgoing
    connection also takes its local port: between this check and the worker's own bind, a client
    connection elsewhere (another test's) could take it ("address already in use", seen in CI).
    A port handed out here is also recorded for every process of this user on this machine
    (:func:`_reserve`): two test processes (pytest-xdist) picking the same free port within a worker's
    start-up (seconds of importing torch) made both bind it (seen in CI).
    """
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(_LISTEN_LOW, low) if low - _LISTEN_LOW > 1000 else 0
        if port in _GIVEN:  # handed out already (its worker may not have bound it yet)
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = s.getsockname()[1]
        if not _reserve(port):  # another process handed it out a moment ago
            continue
        _GIVEN.add(port)
        return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: the lowest port :func:`free_port` picks (under it: well-known services' ports)
_LISTEN_LOW = 20000
#: ports this process handed out (never twice: two workers of one cluster would race for one)
_GIVEN: set[int] = set()
#: how long a port handed out by any process stays reserved: a worker binds it within its start-up
_RESERVED_FOR_S = 300.0


def _reserve(port: int) -> bool:
    """Records ``port`` in this user's reservation file unless a process reserved it in the last
    :data:`_RESERVED_FOR_S` seconds; True when it is this caller's. Without a usable file (another
    user's, a link, no /tmp) only this process's own record (``_GIVEN``) applies."""
    import fcntl

    path = os.path.join(tempfile.gettempdir(), f"veil-ports-{os.getuid()}")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError:
        return True
    with os.fdopen(fd, "r+") as f:
        if os.fstat(fd).st_uid != os.getuid():
            return True
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when the file closes
        now = time.time()
        held = {}
        for line in f.read().split():
            p, _, t = line.partition("@")
            try:
                if now - float(t) < _RESERVED_FOR_S:
                    held[int(p)] = float(t)
            except ValueError:
                continue
        if port in held:
            return False
        held[port] = now
        f.seek(0)
        f.truncate()
        f.write("".join(f"{p}@{t:.3f}\n" for p, t in held.items()))
        return True


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux; 32768, its default, elsewhere)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


@dataclass
class WorkerProcess:
    """A running ``veil worker`` subprocess; :meth:`stop` ends it (SIGTERM, then SIGKILL)."""

    id: str
    proc: subprocess.Popen
    port: int = 0
    output: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self) -> None:
        """Asks it to stop (SIGTERM) without waiting: :meth:`stop` then waits (several stopped together)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 5.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def _cause(output: list[str], ready_timeout: float) -> str:
    """The worker's own error line (``veil worker: error: ...``), else its last output line."""
    lines = [line.strip() for line in output if line.strip()]
    errors = [line for line in lines if line.startswith("veil worker: error:")]
    if errors:
        return errors[-1].removeprefix("veil worker: error:").strip()
    return lines[-1] if lines else f"no output (waited up to {ready_timeout:g} s)"


def start_worker(worker_id: str, args: list[str] = (), port: int = 0, env: dict | None = None,
                 ready_timeout: float = 60.0) -> WorkerProcess:
    """Runs ``veil worker --id worker_id --port port *args`` and waits until it listens.

    ``args`` (tokens among them) go in a file only this user can read (mode 0600), named on the command
    line as ``@FILE`` (argparse's arguments file) and removed once the worker listens or failed: a
    command line is readable by every local user (``ps``, /proc/PID/cmdline).

    Raises:
        RuntimeError: the process exited or did not report readiness in time
            (its output is in the message).
        ValueError: an argument holds a line break (the file holds one argument per line).
    """
    args = [str(a) for a in args]
    if any("\n" in a or "\r" in a for a in args):
        raise ValueError("a worker argument cannot hold a line break (they are passed one per line in a file)")
    fd, path = tempfile.mkstemp(prefix="veil-worker-", suffix=".args")
    try:
        with os.fdopen(fd, "w") as f:
            f.write("".join(a + "\n" for a in args))
        return _launch(worker_id, [f"@{path}"], port, env, ready_timeout)
    finally:
        os.unlink(path)


def _launch(worker_id: str, args: list[str], port: int, env: dict | None, ready_timeout: float) -> WorkerProcess:
    cmd = [sys.executable, "-m", "veil.cli", "worker", "--id", worker_id, "--port", str(port), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    wp = WorkerProcess(worker_id, proc)
    ready = threading.Event()

    def drain() -> None:  # keeps the pipe from filling up, and spots the ready line
        for line in proc.stdout:
            wp.output.append(line.rstrip("\n"))
            if "listening on" in line and not ready.is_set():
                wp.port = int(line.rsplit(":", 1)[1])
                ready.set()
        ready.set()

    threading.Thread(target=drain, daemon=True).start()
    deadline = time.monotonic() + ready_timeout
    while not ready.wait(0.05):
        if time.monotonic() > deadline:
            break
    if not wp.port:
        wp.kill()
        raise WorkerStartError(f"veil worker {worker_id!r} did not start: {_cause(wp.output, ready_timeout)}\n"
                               + "\n".join(wp.output[-30:]))
    return wp
