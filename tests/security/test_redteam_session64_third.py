"""Red team (session 64, third pass) of the amplification fixes (``output_bounds.check_view_room`` /
``amplified_bytes``, ``quota.check_transient``, ``beaver._check_work``).

Part 1, false refusals: honest SMPC over real ``veil worker`` processes (alice, bob: parties; dave: the
provider), every one started with ``--max-session-mb 64``, far more than any workload here holds. Any refusal
is a hole: it breaks users.

Part 2, remaining amplification doors: worker functions whose results are larger than their tensor inputs
without views, repeats or broadcasts, and paths around the checks.

Findings:
* Was a hole, fixed in session 64 (``he_agg._check_encryption_room``;
  ``test_encrypt_state_is_sized_before_it_encrypts``): ``veil.fl.encrypt_state`` Paillier-encrypted a state
  whole (184-568 bytes per entry of a 1-byte bool state) before ``store_output`` consults the quota: ~184-568x
  what the session holds, and seconds of CPU, per request.
* Held: every honest workload under a 64 MiB quota (mul, squaring, transposed weight, bmm, (N,1) x (1,N)
  broadcasting mul/add/compare, relu/comparisons/max, a CNN's private inference, two encrypted SGD steps,
  secure aggregation with a tied state, gets of views and of an expanded bias); ``mac_digits`` makes at most 4x
  its limb; ``product_pieces`` refuses pieces past its operands. (At 2^20-entry relu and a 2048 x 2048
  broadcast product the provider's dealt material alone passes 64 MiB of hand-offs: a real cost, not this fix.)
"""

from __future__ import annotations

import copy
import secrets
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import veil as sy

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from worker_processes import peer_mesh_args  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

ULP = 2.0**-16
QUOTA_MB = 64
NAMES = ("alice", "bob", "dave")
SCI = "rs64-third-scientist-" + secrets.token_hex(8)
PEER = "rs64-third-peer-" + secrets.token_hex(8)


def _peer_token(name: str) -> str:
    return f"{PEER}-{name}"


@pytest.fixture(scope="module")
def quota_servers():
    """alice, bob, dave as ``veil worker`` processes under ``--max-session-mb 64``, peered with each other."""
    from veil.workers.websocket_launcher import free_port, start_worker

    procs: dict = {}
    try:
        ports = {n: free_port() for n in NAMES}
        with ThreadPoolExecutor(len(NAMES)) as pool:
            futures = {n: pool.submit(start_worker, n, ["--token", SCI, "--max-session-mb", str(QUOTA_MB),
                                                        *peer_mesh_args(n, ports, _peer_token)], port=ports[n])
                       for n in NAMES}
        for n, f in futures.items():
            procs[n] = f.result()
        yield procs
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            p.stop()


@pytest.fixture
def net(quota_servers, hook):
    """(alice, bob), dave: fresh client sessions (closed afterwards)."""
    made = [sy.WebsocketClientWorker(hook, id=n, host="127.0.0.1", port=quota_servers[n].port, token=SCI,
                                     timeout=60) for n in NAMES]
    yield made[:2], made[2]
    for w in made:
        w.close()


def _shared(t, parties, cp, **kw):
    if t.dtype.is_floating_point:
        return t.fix_precision().share(*parties, crypto_provider=cp, **kw)
    return t.share(*parties, crypto_provider=cp, **kw)


def _plain(x):
    out = x.get()
    return out.float_precision() if isinstance(out, sy.FixedPrecisionTensor) else out


# ------------------------------------------------------------------ part 1: honest use under a quota


def test_honest_fixed_precision_mul_matmul_and_get(net):
    parties, cp = net
    torch.manual_seed(0)
    a, b, c = torch.randn(64, 32), torch.randn(32, 16), torch.randn(64, 32)
    x, y, z = _shared(a, parties, cp), _shared(b, parties, cp), _shared(c, parties, cp)
    assert torch.allclose(_plain(x @ y), a @ b, atol=32 * 4 * ULP * 8)
    assert torch.allclose(_plain(x * z), a * c, atol=10 * ULP)
    assert torch.allclose(_plain(x + z * 2 - 1.5), a + c * 2 - 1.5, atol=4 * ULP)


def test_honest_squaring_names_one_share_twice(net):
    parties, cp = net
    a = torch.randn(128, 64)
    x = _shared(a, parties, cp)
    assert torch.allclose(_plain(x * x), a * a, atol=20 * ULP)
    i = torch.arange(-50, 50)
    xi = _shared(i, parties, cp)
    assert torch.equal((xi * xi).get(), i * i)


def test_honest_matmul_by_a_transposed_weight(net):
    parties, cp = net
    a, w = torch.randn(32, 24), torch.randn(16, 24)
    x, k = _shared(a, parties, cp), _shared(w, parties, cp)
    assert torch.allclose(_plain(x @ k.t()), a @ w.t(), atol=24 * 4 * ULP * 8)
    assert torch.allclose(_plain(x.matmul(k.transpose(0, 1))), a @ w.t(), atol=24 * 4 * ULP * 8)


def test_honest_batched_matmul(net):
    parties, cp = net
    a, b = torch.randn(4, 8, 6), torch.randn(4, 6, 5)
    x, y = _shared(a, parties, cp), _shared(b, parties, cp)
    assert torch.allclose(_plain(x @ y), a @ b, atol=6 * 4 * ULP * 8)
    assert torch.allclose(_plain(torch.bmm(x, y)), torch.bmm(a, b), atol=6 * 4 * ULP * 8)


def test_honest_broadcasting_mul_of_a_column_by_a_row(net):
    parties, cp = net
    n = 256
    a, b = torch.randn(n, 1), torch.randn(1, n)
    x, y = _shared(a, parties, cp), _shared(b, parties, cp)
    assert torch.allclose(_plain(x * y), a * b, atol=10 * ULP)
    i, j = torch.arange(n).view(n, 1), torch.arange(n).view(1, n)
    assert torch.equal((_shared(i, parties, cp) * _shared(j, parties, cp)).get(), i * j)


def test_honest_broadcasting_add_and_compare_of_a_column_and_a_row(net):
    parties, cp = net
    n = 128
    a, b = torch.randn(n, 1) * 5, torch.randn(1, n) * 5
    x, y = _shared(a, parties, cp), _shared(b, parties, cp)
    assert torch.allclose(_plain(x + y), a + b, atol=4 * ULP)
    ea, eb = a.fix_precision().child, b.fix_precision().child
    assert torch.equal(_plain(x > y), (ea > eb).float())


def test_honest_relu_and_comparisons(net):
    parties, cp = net
    a, b = torch.randn(16, 12) * 10, torch.randn(16, 12) * 10
    b[0, :3] = a[0, :3]
    x, y = _shared(a, parties, cp), _shared(b, parties, cp)
    ea, eb = a.fix_precision().child, b.fix_precision().child
    for op in ("gt", "lt", "ge", "le", "eq"):
        assert torch.equal(_plain(getattr(x, f"__{op}__")(y)), getattr(torch, op)(ea, eb).float()), op
    assert torch.allclose(_plain(F.relu(x)), F.relu(a), atol=ULP)
    values, _ = torch.max(x, dim=1)
    assert torch.allclose(_plain(values), a.max(dim=1).values, atol=ULP)


def test_honest_private_inference_of_a_small_cnn(net):
    parties, cp = net
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    images = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        expected = model(images)
    private = copy.deepcopy(model)
    private.fix_precision().share(*parties, crypto_provider=cp)
    with torch.no_grad():
        out = _plain(private(_shared(images, parties, cp)))
    assert torch.allclose(out, expected, atol=5e-3)


def test_honest_encrypted_sgd_step(net):
    parties, cp = net
    torch.manual_seed(3)
    plain = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    model = copy.deepcopy(plain)
    x, y = torch.randn(12, 6), torch.randn(12, 3)
    model.fix_precision().share(*parties, crypto_provider=cp, requires_grad=True)
    xs, ys = _shared(x, parties, cp), _shared(y, parties, cp)
    opt = torch.optim.SGD(model.parameters(), lr=0.1).fix_precision()
    popt = torch.optim.SGD(plain.parameters(), lr=0.1)
    losses, expected = [], []
    for _ in range(2):
        opt.zero_grad()
        loss = F.mse_loss(model(xs), ys)
        loss.backward()
        opt.step()
        losses.append(loss.get().float_precision().item())
        popt.zero_grad()
        ploss = F.mse_loss(plain(x), y)
        ploss.backward()
        popt.step()
        expected.append(ploss.item())
    assert losses == pytest.approx(expected, abs=1e-3)
    model.get().float_precision()
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.allclose(p, q, atol=1e-3)


def test_honest_secure_aggregation_end_to_end(net):
    from veil.federated.secure_agg import ClientInput, secure_aggregate

    parties, cp = net
    workers = [*parties, cp]
    g = torch.Generator().manual_seed(7)
    states = {w.id: [torch.randn(64, 32, generator=g), torch.randn(32, generator=g)] for w in workers}
    weights = {w.id: float(3 + i) for i, w in enumerate(workers)}
    inputs = {w.id: ClientInput(w, [t.send(w) for t in states[w.id]], weights[w.id]) for w in workers}
    result = secure_aggregate(inputs, tag=secrets.randbelow(1 << 30) + 1, threshold=2)
    assert sorted(result.survivors) == sorted(w.id for w in workers)
    for k in range(2):
        want = sum(weights[w.id] * states[w.id][k] for w in workers)
        torch.testing.assert_close(result.total[k], want, atol=1e-4, rtol=0)


def test_honest_secure_aggregation_of_a_tied_state(net):
    """A model with tied weights names one stored tensor twice in its state: that is not an attack."""
    from veil.federated.secure_agg import ClientInput, secure_aggregate

    parties, cp = net
    workers = [*parties, cp]
    g = torch.Generator().manual_seed(8)
    states = {w.id: torch.randn(128, 64, generator=g) for w in workers}
    inputs = {}
    for i, w in enumerate(workers):
        p = states[w.id].send(w)
        inputs[w.id] = ClientInput(w, [p, p], 1.0 + i)
    result = secure_aggregate(inputs, tag=secrets.randbelow(1 << 30) + 1, threshold=2)
    want = sum((1.0 + i) * states[w.id] for i, w in enumerate(workers))
    for k in range(2):
        torch.testing.assert_close(result.total[k], want, atol=1e-4, rtol=0)


def test_honest_gets_of_views_and_expanded_bias(net):
    parties, cp = net
    a = torch.randn(256, 256)
    p = a.send(parties[0])
    assert torch.equal(p.t().get(), a.t())
    assert torch.equal(p[:, :7].get(), a[:, :7])
    bias = torch.randn(1, 256)
    b = bias.send(parties[0])
    assert torch.equal(b.expand(256, 256).get(), bias.expand(256, 256))
    x = _shared(a, parties, cp)
    xb = _shared(bias, parties, cp)
    assert torch.allclose(_plain(x + xb.expand(256, 256)), a + bias, atol=4 * ULP)


def test_the_quota_is_on(net):
    """Sanity: these sessions are held to --max-session-mb (a refusal past it), so part 1 tested the checks."""
    from veil.workers.quota import QuotaExceededError

    parties, _ = net
    one = torch.zeros(1, dtype=torch.int64).send(parties[0])
    with pytest.raises(QuotaExceededError):
        one.expand(4096, 4096).get()  # 128 MiB past 8 bytes


# ------------------------------------------------------------------ part 2: remaining amplification doors


def _paillier_key():
    import phe

    if not _KEY:
        _KEY.append(phe.generate_paillier_keypair(n_length=512)[0])
    return _KEY[0]


_KEY: list = []


# Fixed (he_agg._check_encryption_room): veil.fl.encrypt_state (veil/federated/he_agg.py), a worker function
# whose result is far larger than its tensor inputs without any view, repeat or broadcast: it flattens the state to float64
# (8x a bool/uint8 state) and Paillier-encrypts every entry (ciphertext_bytes(n_bits) each: 184 bytes at a
# 512-bit key the requester picks, 568 at 2048 bits), and the quota is consulted only by store_output, after
# the whole ciphertext is built (and all the modular exponentiations are done). Measured: a 16 KiB bool state
# under a 1 MiB quota built 2.9 MiB of ciphertexts (184x what the session holds, ~3 s CPU); at 2048 bits a
# 4 KiB state built 2.3 MiB (568x, 30 s CPU) before the refusal. Under --max-session-mb Q a session makes
# ~184-568 x Q per request. Fix: _encrypt_state checks the room before encrypting, as veil.he.op's
# _paillier_operand does (monitor.check_room(principal, count * ciphertext_bytes(n), ...); a CKKS context:
# ciphertexts per slot count times their size). Severity: medium (memory and CPU amplification past the quota).
def test_encrypt_state_is_sized_before_it_encrypts(hook):
    from server_sessions import open_session, quota_worker, run_command, send_tensor

    from veil.he.remote import ciphertext_bytes
    from veil.ids import new_id
    from veil.messaging import messages as m

    quota = 256 << 10
    token = "rs64-third-enc-" + secrets.token_hex(8)
    srv = quota_worker(hook, f"rs64-3-enc-{secrets.token_hex(3)}", token, quota)
    s = open_session(srv, token)
    made = []
    store_output = srv.monitor.store_output

    def spy(oid, obj, *a, **k):
        made.append(obj)
        return store_output(oid, obj, *a, **k)

    srv.monitor.store_output = spy
    n = 4096  # 4 KiB of bools; 4096 ciphertexts of 184 bytes at 512 bits: ~736 KiB
    state = send_tensor(srv, s, torch.ones(n, dtype=torch.bool))
    reply, _ = run_command(srv, s, "veil.fl.encrypt_state", [m.ObjectRef(state)], 1.0, _paillier_key(), new_id())
    assert type(reply) is m.ErrorReply and reply.error == "QuotaExceededError", reply
    built = sum(max(1, getattr(o, "shape", torch.Size([1])).numel()) for o in made) * ciphertext_bytes(512)
    assert built <= quota, f"built {built >> 10} KiB of ciphertexts from {n} bytes before refusing (quota 256 KiB)"


def test_encrypt_state_within_the_room_still_works(hook):
    from server_sessions import open_session, quota_worker, run_command, send_tensor

    from veil.ids import new_id
    from veil.messaging import messages as m

    token = "rs64-third-enc2-" + secrets.token_hex(8)
    srv = quota_worker(hook, f"rs64-3-enc2-{secrets.token_hex(3)}", token, 1 << 20)
    s = open_session(srv, token)
    state = send_tensor(srv, s, torch.arange(8, dtype=torch.float32))
    reply, _ = run_command(srv, s, "veil.fl.encrypt_state", [m.ObjectRef(state)], 2.0, _paillier_key(), new_id())
    assert type(reply) is m.OkReply, reply


def test_unpacking_steps_make_a_bounded_multiple_of_their_input():
    """mac_digits splits a limb in 64/width int64 digits (at most 4x); product_pieces refuses pieces holding more
    entries than the operands; the comparison leaves of the packed layout are smaller than xhat."""
    from veil.mpc.party import PARTY_FUNCTIONS

    limb = torch.randint(-(1 << 62), 1 << 62, (1000,), dtype=torch.int64)
    digits = PARTY_FUNCTIONS["mac_digits"](limb, 16)
    assert sum(d.numel() * d.element_size() for d in digits) <= 4 * limb.numel() * 8
    x = torch.zeros(10, 10, dtype=torch.int64)
    whole = [[0, 0, 10, 1]]  # all ten rows: three of them hold 3x the operand
    with pytest.raises(ValueError, match="more entries"):
        PARTY_FUNCTIONS["product_pieces"](x, None, [whole] * 3, [])
