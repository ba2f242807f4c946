"""Runs the console (uvicorn) on its own port, in a thread of the worker process."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any


class _HeldErrors(logging.Filter):
    """Keeps ERROR records back (their text in ``messages``) while the console starts."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            self.messages.append(record.getMessage())
            return False
        return True


class ConsoleServer:
    """``start()`` returns once the port is bound (``url`` then names it); ``stop()`` ends it."""

    def __init__(self, worker: Any, host: str = "127.0.0.1", port: int = 8780) -> None:
        import uvicorn

        from veil.governance.console.app import build_app

        self.worker, self.host, self.port = worker, host, port
        if host in ("0.0.0.0", "::", ""):  # exposed on purpose on every interface: any Host header
            hosts = ["*"]
        elif host in ("127.0.0.1", "localhost", "::1"):  # loopback: refuse other Host headers (DNS rebinding)
            hosts = ["127.0.0.1", "localhost", host]
        else:
            hosts = [host]
        self.app = build_app(worker, hosts)
        config = uvicorn.Config(self.app, host=host, port=port, log_level="warning", access_log=False,
                                lifespan="off", server_header=False)
        self._server = uvicorn.Server(config)
        self._server.install_signal_handlers = lambda: None  # the worker owns SIGINT/SIGTERM
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    def _run(self) -> None:
        try:
            self._server.run()
        except BaseException as e:  # noqa: BLE001 - reported by start() in one line, not as a thread traceback
            self._failure = e

    def start(self, timeout: float = 20.0) -> "ConsoleServer":
        # uvicorn logs a failed bind (a port in use) as an ERROR line of its own, then ends its thread: held
        # back here, its text goes into the one line start() raises
        held = _HeldErrors()
        uvicorn_log = logging.getLogger("uvicorn.error")
        uvicorn_log.addFilter(held)
        try:
            self._thread = threading.Thread(target=self._run, name="veil-console", daemon=True)
            self._thread.start()
            deadline = time.monotonic() + timeout
            while not self._server.started:
                if not self._thread.is_alive() or time.monotonic() > deadline:
                    failure = self._failure
                    reasons = [*held.messages] + ([str(failure) or type(failure).__name__] if failure is not None
                                                  and not isinstance(failure, SystemExit) else [])
                    reason = f": {' '.join(reasons[-1].split())}" if reasons else ""
                    # an OSError: `veil worker` prints it as one `error:` line (status 2)
                    raise OSError(f"the console could not listen on {self.host}:{self.port}{reason}")
                time.sleep(0.02)
        finally:
            uvicorn_log.removeFilter(held)
        for message in held.messages:  # started all the same: the owner still sees them
            uvicorn_log.error(message)
        sockets = [s for srv in self._server.servers for s in srv.sockets]
        if sockets:
            self.port = sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(5)
