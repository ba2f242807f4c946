"""A throwaway PostgreSQL server for the tests: Debian's binaries, ``initdb`` + ``pg_ctl`` in a temp folder.

PostgreSQL refuses to run as root, so under root the server runs as the
``postgres`` user (created by Debian's package) or ``nobody``. It listens on
loopback on a free port with trust authentication (nothing else can reach it)
and is removed when stopped. ``scripts/setup.sh`` installs the binaries.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid

from veil.workers.websocket_launcher import free_port


def find_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


class PostgresServer:
    """Starts on construction; :meth:`new_database` gives each test its own empty database."""

    def __init__(self) -> None:
        initdb, pg_ctl = find_bin("initdb"), find_bin("pg_ctl")
        if not (initdb and pg_ctl):
            raise RuntimeError("PostgreSQL binaries (initdb, pg_ctl) not found: run `bash scripts/setup.sh` "
                               "(it installs Debian's postgresql package)")
        self.pg_ctl = pg_ctl
        self.folder = tempfile.mkdtemp(prefix="veil-pg-")
        self.data = os.path.join(self.folder, "data")
        self.port = free_port()
        self._prefix: list[str] = []
        if os.geteuid() == 0:
            user = "postgres" if _user_exists("postgres") else "nobody"
            entry = pwd.getpwnam(user)
            os.chown(self.folder, entry.pw_uid, entry.pw_gid)
            self._prefix = ["runuser", "-u", user, "--"]
        self._run([initdb, "-D", self.data, "-A", "trust", "-U", "veil", "--no-sync", "-E", "UTF8"])
        options = (f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c max_connections=60 -c shared_buffers=16MB")
        self._run([pg_ctl, "-D", self.data, "-o", options, "-l", os.path.join(self.folder, "log"), "-w", "start"])
        self.url = f"postgresql://veil@127.0.0.1:{self.port}/postgres"

    def _run(self, cmd: list[str]) -> None:
        done = subprocess.run(self._prefix + cmd, capture_output=True, text=True, timeout=120, cwd=self.folder)
        if done.returncode != 0:
            log = os.path.join(self.folder, "log")
            tail = open(log).read()[-2000:] if os.path.exists(log) else ""
            raise RuntimeError(f"{' '.join(cmd[:2])} failed ({done.returncode}):\n{done.stdout}{done.stderr}{tail}")

    def new_database(self) -> str:
        """URL of a new empty database on this server."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"postgresql://veil@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        try:
            self._run([self.pg_ctl, "-D", self.data, "-m", "immediate", "-w", "stop"])
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False
