"""The console's HTTP rules without a browser (Starlette TestClient on an in-process worker)."""

from __future__ import annotations

import pytest
import torch

import veil as sy
from veil.exceptions import ReviewPendingError
from veil.governance.console.app import build_app
from veil.workers.websocket_auth import TokenTable

starlette_testclient = pytest.importorskip("starlette.testclient")

ADMIN = "console-admin-token"
SCIENTIST = "console-scientist-token"


@pytest.fixture
def world(hook):
    w = sy.VirtualWorker(hook, id="console-app")
    w.tokens = TokenTable()
    w.tokens.add(ADMIN, "owner", "admin")
    w.tokens.add(SCIENTIST, "scientist", "scientist")
    w.load(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), tags=("#ward",), policy="review")
    ptr = w.search(["#ward"])[0] * 10
    info = ptr.request(reason="<script>alert('x')</script>")
    client = starlette_testclient.TestClient(build_app(w, ["testserver"]), follow_redirects=False)
    return w, ptr, info["id"], client


def _login(client, token: str):
    page = client.get("/login")
    csrf = page.text.split('name="login_csrf" value="', 1)[1].split('"', 1)[0]
    return client.post("/login", data={"login_csrf": csrf, "token": token})


def _csrf(client, path: str) -> str:
    return client.get(path).text.split('name="csrf" value="', 1)[1].split('"', 1)[0]


def test_nothing_without_the_admin_token(world):
    w, ptr, rid, client = world
    assert client.get(f"/requests/{rid}").status_code == 303  # to /login
    assert client.post(f"/requests/{rid}/approve", data={"csrf": "x"}).status_code == 403
    for token in ("", "wrong-token-123", SCIENTIST):
        r = _login(client, token)
        assert r.headers["location"] == "/login?failed=1" and "veil_console" not in r.cookies
    assert client.get("/datasets").status_code == 303
    assert w.release_requests.get(rid).state == "pending"


def test_login_needs_the_form_token_and_sets_a_strict_httponly_cookie(world):
    _, _, _, client = world
    assert client.post("/login", data={"login_csrf": "forged", "token": ADMIN}).status_code == 403
    r = _login(client, ADMIN)
    cookie = r.headers["set-cookie"]
    assert r.status_code == 303 and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert ADMIN not in r.headers["location"] and ADMIN not in cookie


def test_csrf_and_origin_guard_every_action(world):
    w, ptr, rid, client = world
    _login(client, ADMIN)
    csrf = _csrf(client, f"/requests/{rid}")
    assert client.post(f"/requests/{rid}/approve", data={"csrf": "wrong"}).status_code == 403
    assert client.post(f"/requests/{rid}/approve", data={"csrf": csrf},
                       headers={"origin": "http://evil.example"}).status_code == 403
    assert w.release_requests.get(rid).state == "pending"
    with pytest.raises(ReviewPendingError):
        ptr.get(delete=False)
    assert client.post(f"/requests/{rid}/approve", data={"csrf": csrf},
                       headers={"origin": "http://testserver"}).status_code == 303
    assert torch.equal(ptr.get(), torch.tensor([[10.0, 20.0], [30.0, 40.0]]))


def test_scientist_text_is_escaped_and_headers_are_strict(world):
    _, _, rid, client = world
    _login(client, ADMIN)
    page = client.get(f"/requests/{rid}")
    assert "<script>alert" not in page.text and "&lt;script&gt;alert(" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY" and page.headers["cache-control"] == "no-store"
    assert client.get("/requests", headers={"host": "evil.example"}).status_code == 400  # DNS rebinding


def test_policy_change_and_audit_filter(world):
    w, _, _, client = world
    _login(client, ADMIN)
    oid = next(oid for oid, e in w.monitor.owner_entries() if e.protected)
    csrf = _csrf(client, "/datasets")
    assert client.post("/datasets/policy", data={"csrf": csrf, "id": str(oid), "policy": "bogus"}).status_code == 400
    assert client.post("/datasets/policy", data={"csrf": csrf, "id": str(oid), "policy": "open"}).status_code == 303
    assert torch.equal((w.search(["#ward"])[0] * 1).get(), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    page = client.get("/audit?action=policy").text
    assert "review -&gt; open" in page and "console_login" not in page.split('<table id="audit">', 1)[1]
