"""The owner console's last failed log-ins are audited when ``veil worker`` stops.

Failed console log-ins inside one window are counted and written as one audit row when the window closes or
the console stops. ``veil worker`` used to stop its console after the worker had closed the owner's database,
so a burst of wrong admin tokens just before a stop (SIGTERM) left no row at all.
"""

from __future__ import annotations

import httpx

from veil.workers.persistence import OwnerDB

from governance_helpers import console_url, worker_args


def _failed_login(url: str) -> None:
    """One wrong admin token posted the way a browser does (loopback, with the console's secret host name)."""
    authority = url.split("://", 1)[1]
    with httpx.Client(base_url=f"http://127.0.0.1:{authority.rsplit(':', 1)[1]}", headers={"host": authority},
                      follow_redirects=False, timeout=10) as c:
        form = c.get("/login")
        csrf = form.text.split('name="login_csrf" value="', 1)[1].split('"', 1)[0]
        cookie = form.headers["set-cookie"].split(";", 1)[0]
        r = c.post("/login", data={"login_csrf": csrf, "token": "not-the-admin-token"},
                   headers={"origin": url, "cookie": cookie})
        assert r.status_code == 303 and r.headers["location"] == "/login?failed=1", r.text


def test_failed_log_ins_just_before_a_stop_are_in_the_audit_log(spawn, tmp_path):
    wp = spawn("alice", worker_args("review", ["--data-dir", str(tmp_path), "--console-port", "0"]))
    url = console_url(wp)
    for _ in range(3):  # the first is written at once; the next two wait for the window (or the stop)
        _failed_login(url)
    assert wp.stop(timeout=20) == 0
    db = OwnerDB(str(tmp_path / OwnerDB.FILENAME))
    try:
        rows = [e for e in db.audit_entries() if e["action"] == "console_login" and e["outcome"] == "refused"]
    finally:
        db.close()
    counted = sum(int(e["detail"].split()[0]) for e in rows)
    assert counted == 3, rows


def test_an_audit_row_the_console_cannot_write_is_logged_not_swallowed(hook, caplog, monkeypatch):
    """The console must not fall over when the owner's database refuses a row (a full disk, a closed database),
    but it used to drop the failure silently: the rows lost at shutdown above went unnoticed. Now one warning
    line names the row (never the token tried) and the console keeps serving."""
    import logging

    import veil as sy
    from veil.governance.console.auth import ConsoleAuth

    from veil.governance import state

    def full_disk(*_args, **_kw):
        raise OSError("No space left on device")

    auth = ConsoleAuth(sy.VirtualWorker(hook, id="console-audit-full"))
    monkeypatch.setattr(state, "audit", full_disk)
    with caplog.at_level(logging.WARNING, logger="veil.console"):
        assert auth.login("not-the-admin-token", "127.0.0.1") is None
    lines = [r.getMessage() for r in caplog.records if r.name == "veil.console"]
    assert any("console_login" in line and "not written" in line for line in lines), lines
    assert not any("not-the-admin-token" in line for line in lines)
