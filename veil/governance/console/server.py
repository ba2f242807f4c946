"""Runs the console (uvicorn) on its own port, in a thread of the worker process."""

from __future__ import annotations

import ipaddress
import logging
import secrets
import threading
import time
from typing import Any


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an interface to listen on) is this machine's loopback only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    """``start()`` returns once the port is bound (``url`` then names it); ``stop()`` ends it.

    On loopback the owner's browser reaches the console by a secret name, ``http://<random>.localhost:PORT``
    (Chromium and Firefox resolve ``*.localhost`` to loopback), and sessions exist only on that name:
    loopback is shared with every local user and cookies are not isolated by port, so a cookie of
    ``127.0.0.1`` would also go to a local user's server on another port of it; one of the secret name
    goes only where the owner's browser is pointed at that name.

    Off loopback (``--console-host``) it serves only https, with the worker's certificate (``--cert``,
    ``--key``): the admin token and the session cookie (then ``Secure``) never cross a network in clear.
    """

    def __init__(self, worker: Any, host: str = "127.0.0.1", port: int = 8780, certfile: str | None = None,
                 keyfile: str | None = None) -> None:
        import uvicorn

        from veil.governance.console.app import build_app
        from veil.governance.console.connections import BoundedH11Protocol, tls_protocol

        self.worker, self.host, self.port = worker, host, port
        self.host_name: str | None = None  # the secret name sessions are bound to (loopback only)
        self.tls = False
        if is_loopback(host):  # loopback: refuse other Host headers (DNS rebinding)
            self.host_name = f"{secrets.token_hex(16)}.localhost"
            hosts = [self.host_name, "127.0.0.1", "localhost", host]  # the others only explain where to go
        elif not (certfile and keyfile):
            # the admin token is posted at log-in and the session cookie goes with every page: over plain
            # HTTP anyone on the network path reads them (and then acts as the owner)
            raise ValueError(f"the console on {host or 'every interface'} (not loopback) needs TLS: give the "
                             "worker --cert and --key (served as https), or keep it on loopback and reach it "
                             "through an SSH tunnel")
        else:
            self.tls = True
            hosts = ["*"] if host in ("0.0.0.0", "::", "") else [host]  # every interface: any Host header
        self.app = build_app(worker, hosts, session_host=self.host_name)
        # https: the handshake runs in the bounded protocol (connections.tls_protocol), not in uvicorn's
        protocol = tls_protocol(certfile, keyfile) if self.tls else BoundedH11Protocol
        # no proxy headers: nothing proxies the console, and uvicorn believes X-Forwarded-For from loopback by
        # default, which let any local user pick the address its failed log-ins count against (auth_throttle)
        config = uvicorn.Config(self.app, host=host, port=port, log_level="warning", access_log=False,
                                lifespan="off", server_header=False, http=protocol, proxy_headers=False)
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
        host = self.host_name or (f"[{self.host}]" if ":" in self.host else self.host)
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def stop(self) -> None:
        """Ends the server, and waits for the requests in flight (one may be looking up a lost COMMIT's outcome:
        lifecycle.py): the worker closes its database after this returns, and a request still running then used
        the closed database (its decision recorded without its audit row, answered with a 500)."""
        from veil.governance.console.lifecycle import STOP_WAIT_S

        self._server.should_exit = True  # (no new connection, nor another request on an open one)
        self.app.state.in_flight.cut_client_waits()  # (a slow client's request ends now, answered 503)
        finished = self.app.state.in_flight.wait_idle(STOP_WAIT_S)
        if self._thread is not None:
            self._thread.join(STOP_WAIT_S if finished else 5)
        if not finished:  # (a database that answers nothing past the watchdog's limits: it fails in one line)
            logging.getLogger(__name__).warning("owner console: a request was still running when the console "
                                                "stopped (the owner's database did not answer)")
        self.app.state.auth.flush_failures()  # a burst of failed log-ins just before the stop is audited too
