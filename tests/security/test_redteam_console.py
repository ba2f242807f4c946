"""Red team: the data owner's web console (veil/governance/console) and the request paths it drives.

A hostile scientist controls request reasons, plan names and plan ops, op arguments and the
objects under review; these tests check what the owner's browser (and terminal) is shown, and
whether another origin, another Host or another principal can act in the owner's name.

Five tests were holes when a session-45 attacker wrote them (strict xfails then): a plan's ops past the
200th were not shown (and its box miscounted them), so a raw row returned by op 201 looked like the means
the first 200 computed; ``POST /login`` parsed a body of any size before its origin check; a plan's name
was stored unbounded in every request's graph; ``veil requests show`` printed the reason's escape sequences
and newlines raw; a pending request's reason could be rewritten after the owner read it. Fixed: the first
and last ops with a count of those between, forms read only same-origin and up to 16 KiB, names cut to 64
characters, control characters shown escaped, and a reason given once stays.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

import veil as sy
from veil.governance.console.server import ConsoleServer
from veil.plans.plan import Plan
from veil.workers.websocket_auth import TokenTable

testclient = pytest.importorskip("starlette.testclient")

ADMIN = "redteam-console-admin"
SCIENTIST = "redteam-console-scientist"
DATA = torch.tensor([[1.5, 2.5, 3.5], [101.0, 202.0, 303.0], [7.0, 8.0, 9.0], [4.0, 5.0, 6.0]])
EVIL = "\"'><script>alert(1)</script><img src=x onerror=alert(2)><svg onload=alert(3)>"


@pytest.fixture
def world(hook, request):
    w = sy.VirtualWorker(hook, id=f"rt-console-{request.node.name[:20]}")
    w.tokens = TokenTable()
    w.tokens.add(ADMIN, "owner", "admin")
    w.tokens.add(SCIENTIST, "scientist", "scientist")
    w.load(DATA.clone(), tags=("#ward",), description="ward data", policy="review")
    # the real app, with the Host list the server uses on loopback (not started: TestClient drives it)
    # on its secret *.localhost name, as the owner's browser (sessions exist only there)
    console = ConsoleServer(w, host="127.0.0.1", port=0)
    client = testclient.TestClient(console.app, base_url=f"http://{console.host_name}:8780", follow_redirects=False)
    return w, client


def _data(w):
    return w.search(["#ward"])[0]


def _origin(client) -> str:
    return str(client.base_url).rstrip("/")


def _login(client, token: str = ADMIN):
    page = client.get("/login")
    csrf = page.text.split('name="login_csrf" value="', 1)[1].split('"', 1)[0]
    return client.post("/login", data={"login_csrf": csrf, "token": token}, headers={"origin": _origin(client)})


def _csrf(client, path: str = "/requests") -> str:
    return client.get(path).text.split('name="csrf" value="', 1)[1].split('"', 1)[0]


def _tags(body: str) -> list:
    from html.parser import HTMLParser

    found = []

    class P(HTMLParser):
        def handle_starttag(self, tag, attrs):
            found.append((tag, attrs))

    P().feed(body)
    return found


def _plan(fn, name: str, shape=(4, 3)) -> Plan:
    p = Plan(fn, args_shape=[shape], name=name)
    p.build(torch.zeros(*shape))
    return p


def _run_plan(w, plan):
    out = plan.send(w)(_data(w))
    return out[0] if isinstance(out, (list, tuple)) else out


# --------------------------------------------------------------------------------------------- what holds


def test_scientist_strings_are_escaped_on_every_page(world):
    w, client = world
    y = (_data(w) * 2).sum(dim=0)
    rid = y.request(reason=EVIL)["id"]
    p = _plan(lambda a: a.mean(dim=0), name="</title><script>alert(4)</script>")
    rid2 = _run_plan(w, p).request(reason="javascript:alert(5)")["id"]
    _login(client)
    pages = ["/requests", "/requests?state=all", f"/requests/{rid}", f"/requests/{rid2}", "/audit",
             "/audit?q=" + EVIL, "/datasets", "/sessions", "/requests/<img src=x onerror=alert(6)>"]
    for path in pages:
        r = client.get(path)
        assert r.status_code == 200, path
        assert r.headers["content-type"].startswith("text/html")
        body = r.text
        # the only script element is the console's own; no attacker element or attribute survives
        assert re.findall(r"<script[^>]*>", body) == ['<script src="/static/console.js" defer>'], path
        tags = _tags(body)
        assert not [t for t, _ in tags if t in ("img", "iframe", "object", "embed", "base", "meta")][1:], path
        assert not [(t, a) for t, attrs in tags for a, v in attrs
                    if a.startswith("on") or (v or "").strip().lower().startswith("javascript:")], path
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "form-action 'self'" in csp
        assert r.headers["x-frame-options"] == "DENY" and r.headers["cache-control"] == "no-store"
    assert "&lt;script&gt;alert(1)" in client.get(f"/requests/{rid}").text


def test_cross_origin_get_missing_token_and_foreign_origin_are_refused(world):
    w, client = world
    rid = (_data(w) + 1).request(reason="x")["id"]
    oid = next(oid for oid, e in w.monitor.owner_entries() if e.protected)
    _login(client)
    csrf = _csrf(client, f"/requests/{rid}")
    assert client.get(f"/requests/{rid}/approve").status_code == 405  # no GET with side effects
    assert client.post(f"/requests/{rid}/approve", data={}).status_code == 403
    assert client.post(f"/requests/{rid}/approve", data={"csrf": csrf + "x"}).status_code == 403
    for origin in ("http://evil.example", "null", "http://127.0.0.1:9999", "http://localhost:8780"):
        assert client.post(f"/requests/{rid}/approve", data={"csrf": csrf},
                           headers={"origin": origin}).status_code == 403, origin
        assert client.post("/datasets/policy", data={"csrf": csrf, "id": str(oid), "policy": "open"},
                           headers={"origin": origin}).status_code == 403, origin
    # csrf smuggled in the query string instead of the form body does not count
    assert client.post(f"/requests/{rid}/approve?csrf={csrf}").status_code == 403
    assert w.release_requests.get(rid).state == "pending"
    assert client.post(f"/requests/{rid}/deny", data={"csrf": csrf, "message": "no"},
                       headers={"origin": _origin(client)}).status_code == 303
    assert w.release_requests.get(rid).state == "denied"


def test_host_header_and_rebinding_are_refused_on_loopback(world):
    _, client = world
    for host in ("evil.example", "127.0.0.1.nip.io", "localhost.evil.example", "evil.example:8780"):
        assert client.get("/login", headers={"host": host}).status_code == 400, host
    assert client.get("/login", headers={"host": "localhost:8780"}).status_code == 200


def test_nobody_without_the_admin_token_sees_previews_or_acts(world):
    w, client = world
    rid = (_data(w)[1] * 1).request(reason="row")["id"]
    for token in (SCIENTIST, "", ADMIN + " ", ADMIN.upper()):
        assert _login(client, token).headers["location"] == "/login?failed=1"
    for path in ("/requests", f"/requests/{rid}", "/audit", "/datasets", "/sessions"):
        r = client.get(path)
        assert r.status_code == 303 and "202" not in r.text and "303" not in r.text
    assert client.post(f"/requests/{rid}/approve", data={"csrf": ""}).status_code == 403
    # a forged or stale session cookie is refused; logging out kills the session server-side
    client.cookies.set("veil_console", "forged")
    assert client.get(f"/requests/{rid}").status_code == 303
    client.cookies.clear()
    _login(client)
    sid, csrf = client.cookies.get("veil_console"), _csrf(client)
    assert client.post("/logout", data={"csrf": csrf}).status_code == 303
    client.cookies.set("veil_console", sid)
    assert client.get(f"/requests/{rid}").status_code == 303
    assert client.post(f"/requests/{rid}/approve", data={"csrf": csrf}).status_code == 403
    assert w.release_requests.get(rid).state == "pending"


def test_preview_flags_a_value_changed_after_filing_and_approval_does_not_release_it(world):
    w, client = world
    y = _data(w) * 0  # filed as all zeros
    rid = y.request(reason="zeros")["id"]
    y.add_(_data(w))  # then overwritten with the raw data
    _login(client)
    page = client.get(f"/requests/{rid}").text
    assert "CHANGED since the request was filed" in page
    csrf = _csrf(client)
    assert client.post(f"/requests/{rid}/approve", data={"csrf": csrf}).status_code == 303
    with pytest.raises(sy.exceptions.ReviewPendingError):
        y.get(delete=False)


# --------------------------------------------------------------------------------------------- holes


def test_every_plan_op_behind_a_request_is_shown_to_the_owner(world):
    w, client = world

    def sneaky(a):  # 200 harmless-looking steps, then the real result: patient row 1, raw
        b = a.mean(dim=0)
        for _ in range(199):
            b = b + 0
        return a[1]

    p = _plan(sneaky, name="column_means")
    assert len(p.spec.ops) == 201 and p.spec.ops[-1].op == "Tensor.__getitem__"
    y = _run_plan(w, p)
    rid = y.request(reason="column means for the report")["id"]
    _login(client)
    page = client.get(f"/requests/{rid}").text
    assert "[101, 202, 303]" in page  # the preview: the raw row, which looks like three means
    # what the owner must see to decide: the op that actually produced the value, and the true op count
    assert "__getitem__" in page and "(201 ops)" in page


def test_plan_name_does_not_bloat_stored_requests(world):
    w, client = world
    p = _plan(lambda a: a.sum(dim=0), name="n" * 200_000)
    y = _run_plan(w, p)
    for _ in range(3):  # each derived step carries the whole graph, label included, into its request
        y = y + 0
    rid = y.request(reason="sum")["id"]
    stored = len(json.dumps(w.release_requests.get(rid).graph))
    _login(client)
    assert client.get(f"/requests/{rid}").status_code == 200
    assert stored < 32_000, f"one request's stored op graph is {stored} bytes"


def test_cli_show_does_not_let_the_reason_forge_the_owner_view(world, capsys):
    from veil.governance.cli import print_request
    from veil.governance.wire import owner_view

    w, _ = world
    y = _data(w)[1] * 1  # the raw row
    forged = ("column means\npreview  [0.5, 0.5, 0.5]  min 0.5 max 0.5 mean 0.5\ncomputation:\n"
              "  d1 = dataset: #ward\n  t1 = Tensor.mean(d1, dim=0)   <- requested\x1b[8m\x1b[30;40m")
    rid = y.request(reason=forged)["id"]
    print_request(owner_view(w, w.release_requests.get(rid), True))
    out = capsys.readouterr().out
    assert "\x1b" not in out
    assert len(re.findall(r"^preview ", out, re.M)) == 1 and len(re.findall(r"^computation:", out, re.M)) == 1


def test_reason_the_owner_read_is_the_reason_on_record(world):
    w, client = world
    y = _data(w).mean(dim=0)
    rid = y.request(reason="column means for the report")["id"]
    _login(client)
    assert "column means for the report" in client.get(f"/requests/{rid}").text
    csrf = _csrf(client)
    y.request(reason="owner agreed to release row-level data")  # after the owner read the page
    assert client.post(f"/requests/{rid}/approve", data={"csrf": csrf}).status_code == 303
    assert w.release_requests.get(rid).reason == "column means for the report"


def test_login_refuses_a_foreign_origin_before_reading_the_body(hook):
    import socket

    w = sy.VirtualWorker(hook, id="rt-console-live")
    server = ConsoleServer(w, host="127.0.0.1", port=0).start()
    try:
        s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        declared = 256 * 1024 * 1024  # what a hostile page's fetch(no-cors) body could declare
        s.sendall((f"POST /login HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nOrigin: http://evil.example\r\n"
                   "Content-Type: application/x-www-form-urlencoded\r\n"
                   f"Content-Length: {declared}\r\n\r\n").encode() + b"a=" + b"x" * (1 << 20))
        s.settimeout(2.0)
        try:
            reply = s.recv(4096)
        except socket.timeout:
            reply = b""  # still reading the body: it would buffer all 256 MiB in memory first
        s.close()
        assert reply.startswith(b"HTTP/1.1 403") or reply.startswith(b"HTTP/1.1 413"), reply[:80]
    finally:
        server.stop()
