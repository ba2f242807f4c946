"""Red team of the owner console, second pass (veil/governance/console/): the Sessions page's revoke form,
log-in and session handling, the HTTP surface outside the pages, and the console's place in the worker.

The first pass (test_redteam_console.py) covered escaping of scientist strings, origins, Host headers and
admin-token gating of the pages. This one attacks as a web pentester would what is new or not covered:
``POST /users/revoke`` (CSRF tied to the session, checked before the revocation runs, the admin role, the
redirect it builds), session fixation, cookie flags, logout, static files, oversized and chunked bodies,
the audit trail of failed log-ins, forged confirmations, and connections held open against the console's
port (it lives in the worker's process and shares its file descriptors). README: the console listens on
loopback unless ``--console-host``; any local user can reach loopback, so the console's port is reachable
by people without the owner's rights even in the default setup.
"""

from __future__ import annotations

import os
import re
import resource
import socket
import time

import pytest
import torch

import veil as sy
from veil.governance.console.auth import COOKIE, LOGIN_COOKIE
from veil.governance.console.server import ConsoleServer
from veil.workers.websocket_server import WebsocketServerWorker

from network_helpers import TOKEN
from worker_processes import spawned_workers

testclient = pytest.importorskip("starlette.testclient")
httpx = pytest.importorskip("httpx")

ADMIN = "redteam2-console-admin"
MALLORY = "redteam2-console-mallory"


@pytest.fixture
def served(hook, request):
    """An in-process serving worker (not listening: TestClient drives its console app) with an owner and
    two scientists; ``client()`` makes a fresh browser (its own cookie jar) on the same console."""
    tokens = sy.TokenTable()
    tokens.add(ADMIN, "owner", "admin")
    tokens.add(MALLORY, "mallory", "scientist")
    tokens.add(TOKEN, "scientist", "scientist")
    w = WebsocketServerWorker(hook, id=f"rt-console2-{request.node.name[:16]}-{time.monotonic_ns() % 10**6}",
                              port=0, tokens=tokens)
    w.load(torch.tensor([[1.5, 2.5], [101.0, 202.0]]), tags=("#ward",), description="ward data", policy="review")
    console = ConsoleServer(w, host="127.0.0.1", port=0)  # its secret *.localhost name, as the owner's browser

    def client(scheme: str = "http", address: str = "testclient"):
        return testclient.TestClient(console.app, base_url=f"{scheme}://{_name(console)}:8780", follow_redirects=False,
                                     client=(address, 50000))

    return w, client


def _name(console) -> str:
    """The host name the owner's browser uses for ``console`` (its secret ``*.localhost`` name on loopback)."""
    return getattr(console, "host_name", None) or console.host


def _origin(client) -> str:
    return str(client.base_url).rstrip("/")


def _login(client, token: str = ADMIN, origin: str | None = None):
    page = client.get("/login")
    csrf = page.text.split('name="login_csrf" value="', 1)[1].split('"', 1)[0]
    return client.post("/login", data={"login_csrf": csrf, "token": token},
                       headers={"origin": origin or _origin(client)})


def _csrf(client, path: str = "/sessions") -> str:
    return client.get(path).text.split('name="csrf" value="', 1)[1].split('"', 1)[0]


def _set_cookies(resp) -> list[str]:
    return resp.headers.get_list("set-cookie")


# --------------------------------------------------------------------------------------------- what holds


def test_revoke_form_needs_this_sessions_csrf_before_anything_is_revoked(served, monkeypatch):
    """Attack: revoke a scientist in the owner's name without the owner's intent: no session, a foreign
    Origin, no CSRF field, the CSRF token in the query string, and the CSRF token of *another* console
    session (an attacker who logged in on another browser, or a token seen in an old page) replayed with
    the owner's cookie. Must hold: each is refused before ``worker.revoke`` is even called; only the
    owner's own session with its own token revokes, and the confirmation then shows."""
    w, client = served
    calls = []
    real = w.revoke
    monkeypatch.setattr(w, "revoke", lambda name, by="owner": (calls.append(name), real(name, by))[1])
    owner, other, anonymous = client(), client(), client()
    assert _login(owner).status_code == 303 and _login(other).status_code == 303
    csrf, other_csrf = _csrf(owner), _csrf(other)
    assert csrf != other_csrf
    assert "mallory" in owner.get("/sessions").text  # offered in the revoke form
    attempts = [
        (anonymous, {"csrf": csrf, "name": "mallory"}, {}),
        (owner, {"name": "mallory"}, {}),
        (owner, {"csrf": other_csrf, "name": "mallory"}, {}),
        (owner, {"csrf": csrf + "x", "name": "mallory"}, {}),
        (owner, {"csrf": csrf, "name": "mallory"}, {"origin": "http://127.0.0.1:9999"}),
        (owner, {"csrf": csrf, "name": "mallory"}, {"origin": "null"}),
    ]
    for c, form, headers in attempts:
        assert c.post("/users/revoke", data=form, headers=headers).status_code == 403, (form, headers)
    assert owner.post(f"/users/revoke?csrf={csrf}&name=mallory").status_code == 403
    assert calls == [] and "mallory" not in w.tokens.revoked
    r = owner.post("/users/revoke", data={"csrf": csrf, "name": "mallory"}, headers={"origin": _origin(owner)})
    assert r.status_code == 303 and r.headers["location"] == "/sessions?revoked=mallory"
    assert calls == ["mallory"] and "mallory" in w.tokens.revoked and w.tokens.lookup(MALLORY) is None
    assert "mallory revoked" in owner.get(r.headers["location"]).text


def test_revoke_form_refuses_the_admin_and_hostile_names_without_side_effects(served):
    """Attack: post the revoke form with names the select never offers: the owner's own admin name (lock the
    owner out of console and CLI), a name with CR/LF (header injection through the redirect it builds) and
    markup (reflected in the error page), and a huge name. Must hold: the admin stays in, no header or
    element is injected, nothing is revoked, and the owner can still log in."""
    w, client = served
    owner = client()
    _login(owner)
    csrf = _csrf(owner)
    for name in ("owner", "mallory\r\nSet-Cookie: veil_console=attacker", "<script>alert(1)</script>",
                 "n" * 10_000):
        r = owner.post("/users/revoke", data={"csrf": csrf, "name": name}, headers={"origin": _origin(owner)})
        assert r.status_code in (200, 400), name[:40]
        assert "attacker" not in " ".join(_set_cookies(r)) and "location" not in r.headers, name[:40]
        assert "<script>alert" not in r.text
    assert w.tokens.revoked == frozenset()
    assert w.tokens.lookup(ADMIN).role == "admin" and _login(client()).headers["location"] == "/requests"


def test_login_issues_a_fresh_session_with_strict_cookie_flags_and_logout_kills_it(served):
    """Attack: session fixation (plant a known ``veil_console`` cookie, e.g. from another port on the same
    loopback host, then wait for the owner to log in with it), and a stale session or CSRF token reused
    after logout. Must hold: log-in issues a new random id (the planted one stays worthless); the cookie is
    HttpOnly, SameSite=Strict, Path=/, and Secure when the console is reached over https; the log-in
    double-submit cookie is confined to /login; logout makes the old id and its CSRF token worthless."""
    w, client = served
    owner = client()
    owner.cookies.set(COOKIE, "attacker-planted-session-id", domain=owner.base_url.host)
    r = _login(owner)
    assert r.status_code == 303 and r.headers["location"] == "/requests"
    session_cookie = next(c for c in _set_cookies(r) if c.startswith(COOKIE + "="))
    sid = session_cookie.split(";", 1)[0].split("=", 1)[1]
    assert sid != "attacker-planted-session-id" and len(sid) >= 32 and owner.cookies.get(COOKIE) == sid
    flags = {f.strip().lower() for f in session_cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/"} <= flags and "secure" not in flags
    planted = client()
    planted.cookies.set(COOKIE, "attacker-planted-session-id")
    assert planted.get("/sessions").status_code == 303
    login_cookie = next(c for c in _set_cookies(owner.get("/login")) if c.startswith(LOGIN_COOKIE + "="))
    assert "path=/login" in login_cookie.lower() and "httponly" in login_cookie.lower()

    tls = client("https")
    r = _login(tls)
    assert r.status_code == 303
    assert "secure" in {f.strip().lower() for f in next(c for c in _set_cookies(r)
                                                        if c.startswith(COOKIE + "=")).split(";")[1:]}

    csrf = _csrf(owner)
    assert owner.post("/logout", data={"csrf": csrf}, headers={"origin": _origin(owner)}).status_code == 303
    replay = client()
    replay.cookies.set(COOKIE, sid)
    assert replay.get("/sessions").status_code == 303
    assert replay.post("/users/revoke", data={"csrf": csrf, "name": "mallory"}).status_code == 403
    _login(replay)  # a new session of the same owner does not accept the old session's token either
    assert replay.post("/users/revoke", data={"csrf": csrf, "name": "mallory"}).status_code == 403
    assert "mallory" not in w.tokens.revoked


def test_failed_guesses_do_not_lock_the_owner_out_or_tell_names_apart(served):
    """Attack: a scientist (or any local user) hammers the log-in form with wrong tokens, its own scientist
    token among them, to lock the owner out of the console or to learn which tokens exist (a different
    answer for a valid non-admin token). Must hold: every failure gets the same answer, until the source
    has used its free failures (``auth_throttle``), then every attempt gets the same 429 whatever the
    token; right after the burst the owner's admin token still logs in from another address (the owner's
    own source is held up only for short tokens: tests/security/test_redteam_auth_throttle.py)."""
    from veil.workers.auth_throttle import FREE_FAILURES

    w, client = served
    attacker = client()
    answers = []
    for i in range(60):
        token = (TOKEN, MALLORY, f"guess-{i:03d}-token", ADMIN[:-1], ADMIN + "x")[i % 5]
        r = _login(attacker, token)
        answers.append((r.status_code, r.headers.get("location"), r.text.split(";")[0]))
        assert COOKIE not in " ".join(_set_cookies(r))
    assert set(answers[:FREE_FAILURES + 1]) == {(303, "/login?failed=1", "")}
    assert set(answers[FREE_FAILURES + 1:]) == {(429, None, "too many failed authentications from this address")}
    assert _login(client(address="198.51.100.7")).headers["location"] == "/requests"


def test_static_files_and_unauthenticated_routes_serve_nothing_private(served):
    """Attack: read the console's source, the owner database or /etc/passwd through /static (dot segments,
    encoded and doubled), and fetch every page and action without a session, with security headers
    checked on error responses too. Must hold: only the two static assets are served (with nosniff);
    everything else is a 404, a redirect to /login or a 403, and no response carries the dataset's rows."""
    w, client = served
    anonymous = client()
    for path in ("/static/../app.py", "/static/%2e%2e/app.py", "/static/..%2fapp.py", "/static/%2e%2e%2fauth.py",
                 "/static/....//app.py", "/static/../../../../etc/passwd", "/static/%2e%2e/%2e%2e/__init__.py",
                 "/static//etc/passwd"):
        r = anonymous.get(path)
        assert r.status_code in (400, 404), path
        assert "import" not in r.text and "root:" not in r.text, path
    js = anonymous.get("/static/console.js")
    assert js.status_code == 200 and js.headers["x-content-type-options"] == "nosniff"
    assert "javascript" in js.headers["content-type"]
    nowhere = anonymous.get("/no/such/page")
    assert nowhere.status_code == 404 and nowhere.headers["x-frame-options"] == "DENY"
    for path in ("/", "/requests", "/requests?state=all", "/datasets", "/budgets", "/audit", "/sessions",
                 "/requests/anything"):
        r = anonymous.get(path)
        assert r.status_code == 303 and r.headers["location"] in ("/login", "/requests"), path
        assert "101" not in r.text and "202" not in r.text and "mallory" not in r.text, path
    for path in ("/users/revoke", "/sessions/x/disconnect", "/datasets/policy", "/requests/x/approve", "/logout"):
        assert anonymous.post(path, data={"csrf": "", "name": "mallory"}).status_code == 403, path
    assert "mallory" not in w.tokens.revoked


def test_oversized_and_chunked_bodies_on_the_revoke_form_are_cut_off(served):
    """Attack: a logged-in browser tricked into (or a local script with the owner's cookie) posting a huge
    body to ``/users/revoke``: a declared 64 MiB Content-Length, and a chunked body with no length at all.
    Must hold: 413 without buffering it, nothing revoked, the console still answers afterwards."""
    w, client = served
    owner = client()
    _login(owner)
    csrf = _csrf(owner)
    body = f"csrf={csrf}&name=mallory&pad=".encode() + b"x" * (1 << 20)
    r = owner.post("/users/revoke", content=body, headers={"origin": _origin(owner),
                                                           "content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 413

    def chunks():
        yield f"csrf={csrf}&name=mallory&pad=".encode()
        for _ in range(64):
            yield b"y" * 65536

    r = owner.post("/users/revoke", content=chunks(), headers={"origin": _origin(owner),
                                                               "content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 413
    assert "mallory" not in w.tokens.revoked and owner.get("/sessions").status_code == 200


# ----------------------------------------------------------------- holes of the second pass, now fixed


def test_a_link_cannot_fake_a_disconnect_confirmation(served):
    """Attack: a scientist hands the owner a console link (pasted into the address bar, so the SameSite
    cookie goes with it) ``/sessions?disconnected=s-4f2a (mallory, all her objects freed)``: the owner's
    own console then confirms, in its green "ok" style, that mallory's session was closed, while mallory
    stays connected. The code means to prevent exactly this (the ``revoked`` confirmation is checked
    against the revoked set). Must hold: a confirmation is only shown for a session this console session
    really disconnected, in the last few minutes (``ConsoleSession.did_disconnect``)."""
    w, client = served
    owner = client()
    _login(owner)
    forged = "s-4f2a (mallory, all her objects freed)"
    page = owner.get("/sessions", params={"disconnected": forged})
    assert page.status_code == 200
    assert "disconnected." not in page.text and "mallory, all her objects freed" not in page.text
    # the revoke confirmation, by contrast, is not forgeable:
    assert "revoked:" not in owner.get("/sessions", params={"revoked": "mallory"}).text


def test_a_reason_cannot_reorder_or_break_what_the_owner_reads(served):
    """Attack: a scientist's reason carries bidi controls (U+202E, U+061C) and a line separator (U+2028):
    HTML escaping leaves them raw, and the browser then shows the reason's text reordered. Must hold: the
    request list and the request page show them escaped (``\\u202e``), as ``veil requests`` prints them."""
    w, client = served
    reason = "release the means\u202e sdrocer lla\u061c\u2028approved by the owner"
    rid = w.search(["#ward"])[0].copy().request(reason=reason)["id"]
    owner = client()
    _login(owner)
    for path in ("/requests", f"/requests/{rid}"):
        page = owner.get(path)
        assert page.status_code == 200, path
        assert not any(c in page.text for c in "\u202e\u061c\u2028"), path
        assert "\\u202e" in page.text and "\\u2028" in page.text, path


def test_budgets_page_stays_bounded_however_many_charges_a_scientist_makes(served):
    """Attack: a scientist with a DP budget makes many tiny releases (epsilon down to MIN_EPSILON = 1e-6,
    so a budget of 1.0 allows a million charges). ``views.budgets`` reads the whole charge history and
    ``budget_svg`` draws a ``<circle>`` with a ``<title>`` and two polyline points per charge, in the
    console's event loop: the owner's Budgets page grows by ~110 bytes per charge (a million charges: a
    ~110 MB page, with the console's loop busy building it). Must hold: the chart's size is bounded (the
    curve downsampled to at most 300 points, built off the event loop); 5,000 more charges add little."""
    from veil.dp.worker_owner import enable_dp

    w, client = served
    ledger = enable_dp(w, budgets={"mallory": (1.0, 1e-5)}).ledger
    owner = client()
    _login(owner)
    for _ in range(50):
        ledger.charge("mallory", 1e-6, 0.0, "mean of #ward")
    before = len(owner.get("/budgets").content)
    for _ in range(5000):
        ledger.charge("mallory", 1e-6, 0.0, "mean of #ward")
    after = owner.get("/budgets")
    assert after.status_code == 200 and "mallory" in after.text
    assert len(after.content) - before < 150_000, f"{len(after.content) - before} bytes more for 5,000 charges"


def _failed_login_count(owner) -> int:
    page = owner.get("/audit", params={"action": "console_login", "outcome": "refused"}).text
    return sum(int(n) for n in re.findall(r"(\d+) failed console log-in\(s\)", page))


def test_a_burst_of_failed_logins_is_in_the_audit_log_when_its_window_closes(served, monkeypatch):
    """Fast variant of the next test, in process, with a short aggregation window: a burst of failed
    log-ins is written (as rows with counts) once the window closes, with no further failure to trigger it;
    a burst cut short by the console's stop is written at the stop."""
    from veil.governance.console.auth import ConsoleAuth

    w, _ = served
    monkeypatch.setattr(ConsoleAuth, "failure_window", 0.3, raising=False)
    console = ConsoleServer(w, host="127.0.0.1", port=0)
    attacker, owner = (testclient.TestClient(console.app, base_url=f"http://{_name(console)}:8780",
                                             follow_redirects=False) for _ in range(2))
    for i in range(21):
        assert _login(attacker, token=f"guess-{i:04d}").headers["location"] == "/login?failed=1"
    _login(owner)
    deadline = time.monotonic() + 10
    while _failed_login_count(owner) < 21 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _failed_login_count(owner) == 21
    monkeypatch.setattr(ConsoleAuth, "failure_window", 3600.0, raising=False)
    for i in range(5):
        _login(attacker, token=f"late-{i:04d}")
    console.stop()
    assert _failed_login_count(owner) == 26


def test_an_unexpected_error_is_a_plain_500_with_the_security_headers(served, monkeypatch, caplog):
    """Behind the null-byte test: whatever else raises in a page answers a plain 500 that still carries the
    console's security headers, and leaves one log line naming the exception's type (not its text)."""
    from veil.governance.console import views

    w, client = served
    owner = client()
    _login(owner)
    monkeypatch.setattr(views, "datasets", lambda worker: (_ for _ in ()).throw(RuntimeError("secret detail")))
    with caplog.at_level("ERROR", logger="veil.console"):
        r = owner.get("/datasets")
    assert r.status_code == 500 and r.text == "internal error\n" and r.headers["x-frame-options"] == "DENY"
    assert [rec.getMessage() for rec in caplog.records] == ["owner console: GET '/datasets' failed (RuntimeError)"]


@pytest.fixture(scope="module")
def console_worker():
    """One ``veil worker`` with its console, shared by the tests below (each process costs seconds)."""
    spawner = spawned_workers()
    spawn = next(spawner)
    yield spawn("rtc2-console", ["--token", TOKEN, "--admin-token", ADMIN, "--console-port", "0"])
    next(spawner, None)


@pytest.mark.slow
def test_a_burst_of_failed_logins_is_in_the_audit_log(console_worker):
    """Attack: guess the admin token at the console (loopback is reachable by every local user; any host
    with ``--console-host``): one wrong guess, then a burst of guesses within the minute, then stop.
    ``ConsoleAuth._failed`` wrote the first failure and only counted the rest in memory, writing the count
    with the *next* failure at least a minute later; a burst that stopped was never in the owner's audit
    log. Must hold: within a window (10 s, as the worker port's RefusalLog) of the burst, the owner's
    audit log accounts for every failed log-in, from a real worker process (its timer thread)."""
    wp = console_worker
    url = _console_url(wp)
    guesses = 21
    with _browser(url) as attacker:
        for i in range(guesses):
            r = _login(attacker, token=f"guess-{i:04d}-xxxxxxxx", origin=url)
            assert r.headers["location"] == "/login?failed=1"
    with _browser(url) as owner:
        assert _login(owner, origin=url).headers["location"] == "/requests"
        deadline = time.monotonic() + 75  # generous: a periodic flush (the worker port's is every 10 s) is fine
        seen = _failed_login_count(owner)
        while seen < guesses and time.monotonic() < deadline:
            time.sleep(2)
            seen = _failed_login_count(owner)
    assert seen == guesses, f"the audit log shows {seen} of {guesses} failed console log-ins"


def test_a_null_byte_in_a_static_path_is_a_clean_refusal(console_worker):
    """Attack: anyone who can reach the console's port, with no session (a local user; anyone with
    ``--console-host``), requests ``/static/console.js%00``. Starlette's StaticFiles passes the decoded path
    to ``os.path.realpath``, which raises ``ValueError: embedded null byte``; nothing in the console catches
    it, so each request is a 500 (without the console's security headers: ServerErrorMiddleware sits
    outside them) and uvicorn writes a ~40-line traceback into the worker's log: unauthenticated,
    unthrottled log flooding, and the owner's log full of stack frames. Must hold: a 400/404 answer, no
    traceback in the worker's output, and the console still serving."""
    wp = console_worker
    url = _console_url(wp)
    with _browser(url) as anyone:
        code = anyone.get("/static/console.js%00").status_code
    with _browser(url) as anyone:  # a new connection: the console still serves
        assert anyone.get("/login").status_code == 200
    deadline = time.monotonic() + 3  # uvicorn wrote its traceback before the second answer; the pipe lags
    while time.monotonic() < deadline and not any("Traceback" in line for line in wp.output):
        time.sleep(0.5)
    assert code in (400, 404), code
    assert not [line for line in wp.output if "Traceback" in line or "embedded null byte" in line]


def _console_url(wp) -> str:
    for line in wp.output:
        if "owner console on " in line:
            return line.split("owner console on ", 1)[1].split()[0]
    raise AssertionError("no console line in:\n" + "\n".join(wp.output))


def _browser(url: str):
    """An HTTP client for the console ``url`` (its secret ``*.localhost`` name): on loopback, with that name
    as the Host, as Chromium and Firefox resolve it (this machine's resolver may not)."""
    authority = url.split("://", 1)[1]
    return httpx.Client(base_url="http://127.0.0.1:" + authority.rsplit(":", 1)[1], headers={"host": authority},
                        follow_redirects=False, timeout=60)


def _answers(port: int) -> bool:
    """Whether the worker's own port answers a plain HTTP request (a refusal is an answer) within 60 s."""
    probe = socket.create_connection(("127.0.0.1", port), timeout=60)
    try:
        probe.settimeout(60)  # generous: a console that closes idle connections after a while is fine
        probe.sendall(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        try:
            return probe.recv(64).startswith(b"HTTP/1.1 ")
        except socket.timeout:
            return False  # accepted by the kernel, never by the worker: it is out of descriptors
    finally:
        probe.close()


def test_idle_console_connections_do_not_starve_the_worker(console_worker):
    """Attack: a local user without the owner's rights (loopback is shared) opens connections to the
    console's port and sends nothing, or half a request line (slowloris). uvicorn here has no
    ``limit_concurrency`` and no read timeout before the first request, so every such connection stays
    open for good, and each costs a file descriptor of the *worker's* process (the console is a thread of
    it). With the process's descriptor limit reached (lowered here to what it uses + 64 so the test stays
    small; a systemd service's default soft limit is 1024) the worker cannot accept a scientist's
    connection any more. Its own port bounds this (handshake slots, open timeout); the console does not.
    Must hold: after the flood, the worker's port still answers a new connection (the console now closes a
    connection beyond 32 at once, and one without a whole request head after 10 s: connections.py)."""
    wp = console_worker  # the last user of the shared worker: its descriptor limit stays lowered
    port = int(_console_url(wp).rsplit(":", 1)[1])
    assert _answers(wp.port)  # the probe works before the flood
    used = len(os.listdir(f"/proc/{wp.pid}/fd"))
    _, hard = resource.prlimit(wp.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(wp.pid, resource.RLIMIT_NOFILE, (used + 64, hard))
    held = []
    try:
        for i in range(used + 64 + 16):
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            if i % 2:
                s.sendall(b"GET /login HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
            held.append(s)
        time.sleep(3)  # let the console accept what it can
        assert wp.alive()
        assert _answers(wp.port), "the worker stopped answering on its own port"
    finally:
        for s in held:
            s.close()


def test_sessions_exist_only_on_the_consoles_secret_name(served):
    """Behind the next test, without a browser: on loopback the console's URL is a random ``*.localhost``
    name; on 127.0.0.1 or localhost it offers no log-in form (it says where to go, not the name), refuses a
    posted log-in, and does not take a session cookie made on the secret name."""
    w, client = served
    owner = client()
    assert _login(owner).status_code == 303
    sid = owner.cookies.get(COOKIE)
    console = ConsoleServer(w, host="127.0.0.1", port=0)
    name = console.host_name
    assert re.fullmatch(r"[0-9a-f]{32}\.localhost", name) and console.url == f"http://{name}:0"
    for base in ("http://127.0.0.1:8780", "http://localhost:8780"):
        other = testclient.TestClient(owner.app, base_url=base, follow_redirects=False)
        page = other.get("/login")
        assert 'id="wrong-host"' in page.text and "login_csrf" not in page.text
        assert owner.base_url.host not in page.text
        other.cookies.set(LOGIN_COOKIE, "x")
        r = other.post("/login", data={"login_csrf": "x", "token": ADMIN}, headers={"origin": base})
        assert r.status_code == 403 and COOKIE not in " ".join(_set_cookies(r))
        other.cookies.set(COOKIE, sid)
        assert other.get("/requests").status_code == 303


def test_half_sent_requests_are_closed_and_connections_are_capped(served, monkeypatch):
    """Behind the previous test, in process: a connection that sends no whole request head in time
    (nothing, or half a head, before or after a first request) is closed by the console, and a connection
    beyond the cap takes the place of the one waiting longest for its head (the third pass: the owner is not
    locked out by held connections), so no more than the cap stay open."""
    from veil.governance.console import connections

    w, _ = served
    monkeypatch.setattr(connections, "HEAD_SECONDS", 0.5)
    monkeypatch.setattr(connections, "MAX_CONNECTIONS", 4)
    console = ConsoleServer(w, host="127.0.0.1", port=0).start()
    head = f"GET /login HTTP/1.1\r\nHost: {console.host_name}\r\n".encode()
    try:
        # (every read below waits up to 30 s: a connection the console never closes fails it, and the closes it
        # does make, 0.5 s after a head began, are not raced against a loaded machine)
        idle, half, after = (socket.create_connection(("127.0.0.1", console.port), timeout=30) for _ in range(3))
        half.sendall(head)
        after.sendall(head + b"\r\n")
        reply = b""
        while b"</html>" not in reply:
            reply += after.recv(65536)
        after.sendall(head)  # the next request on the kept-alive connection, never finished
        time.sleep(0.2)
        extra = [socket.create_connection(("127.0.0.1", console.port), timeout=30) for _ in range(3)]
        # over the cap of 4: each took the place of the longest waiting (idle, then half), then its deadline ran out
        assert [s.recv(1) for s in extra[1:]] == [b"", b""]
        started = time.monotonic()
        assert [s.recv(1) for s in (idle, half, after)] == [b"", b"", b""]
        assert time.monotonic() - started < 10  # (closed already, or 0.5 s after the head: slack for a loaded host)
        for s in (idle, half, after, *extra):
            s.close()
    finally:
        console.stop()


CHROMIUM = __import__("shutil").which("chromium") or __import__("shutil").which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs the system chromium (scripts/setup.sh installs it)")
def test_another_port_on_the_same_host_cannot_take_over_the_console(served):
    """Attack: a local user without the owner's rights (a scientist with a shell account on the owner's
    machine) runs a small web server on another loopback port and gets the owner to open it ("my notebook
    is at http://127.0.0.1:9999"). Cookies are not isolated by port (RFC 6265 section 8.5) and another port
    of 127.0.0.1 is the *same site*, so the owner's browser sends ``veil_console`` (HttpOnly and
    SameSite=Strict change nothing here) to that server. With it the attacker reads the console's pages
    (previews of private data included), scrapes the CSRF token and approves a release from a plain
    script (no Origin header is needed). Must hold: whatever the owner's browser hands to another port of
    the host does not let it approve a release. (The console now binds sessions to a secret name,
    ``http://<random>.localhost:PORT``, the URL it prints: its host-only cookie never goes to 127.0.0.1.)"""
    import http.server
    import threading

    sync_api = pytest.importorskip("playwright.sync_api")
    w, _ = served
    rid = w.search(["#ward"])[0].copy().request(reason="row-level records")["id"]
    console = ConsoleServer(w, host="127.0.0.1", port=0).start()
    seen = []

    class Attacker(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen.append(self.headers.get("cookie", ""))
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.end_headers()
            self.wfile.write(b"<p>my notebook</p>")

        def log_message(self, *args):
            pass

    attacker = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Attacker)
    threading.Thread(target=attacker.serve_forever, daemon=True).start()
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            try:
                page = browser.new_context().new_page()
                page.goto(f"{console.url}/login")
                page.fill("#token", ADMIN)
                page.click("#login")
                assert page.url.endswith("/requests")
                page.goto(f"http://127.0.0.1:{attacker.server_address[1]}/")  # the owner opens the link
                page.goto(f"http://localhost:{attacker.server_address[1]}/")
            finally:
                browser.close()
        cookie = next((c for c in seen if COOKIE + "=" in c), "")
        if cookie:  # the attacker, from a script: read the page (its CSRF token), then approve
            sid = cookie.split(COOKIE + "=", 1)[1].split(";", 1)[0]
            with httpx.Client(base_url=console.url, cookies={COOKIE: sid}, follow_redirects=False,
                              timeout=60) as stolen:
                detail = stolen.get(f"/requests/{rid}")
                if detail.status_code == 200:
                    csrf = detail.text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
                    stolen.post(f"/requests/{rid}/approve", data={"csrf": csrf})
        assert w.release_requests.get(rid).state == "pending"
        assert seen and not cookie  # the owner's browser reached the attacker, without the console's cookie
    finally:
        attacker.shutdown()
        console.stop()
