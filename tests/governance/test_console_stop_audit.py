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
