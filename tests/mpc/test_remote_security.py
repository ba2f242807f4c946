"""Who sees what: shares and triples never reach the orchestrator; clear errors."""

import pytest
import torch

import veil as sy
from veil.messaging import messages as m
from veil.messaging.serde import deserialize
from veil.mpc.errors import MPCError, NotEncodedError, ShareMismatchError


@pytest.fixture
def workers(hook):
    return [sy.VirtualWorker(hook, id=n) for n in ("alice", "bob", "charlie", "crypto_provider")]


def test_triples_go_from_provider_to_parties_directly(workers, hook, monkeypatch):
    alice, bob, _, cp = workers
    me = hook.local_worker
    replies_to_orchestrator = []
    real_recv = cp._recv_msg

    def recording_recv(data):
        reply = real_recv(data)
        replies_to_orchestrator.append(deserialize(reply)[0])
        return reply

    monkeypatch.setattr(cp, "_recv_msg", recording_recv)
    senders_to_alice = []
    alice_recv = alice._recv_msg

    def alice_recording_recv(data):
        senders_to_alice.append(deserialize(data)[1])
        return alice_recv(data)

    monkeypatch.setattr(alice, "_recv_msg", alice_recording_recv)
    monkeypatch.setattr(me, "_recv_msg", lambda data: pytest.fail("the orchestrator received a message"))
    x = torch.randn(20, 5).fix_precision().share(alice, bob, crypto_provider=cp)
    y = torch.randn(5, 3).fix_precision().share(alice, bob, crypto_provider=cp)
    cp_sent_before = cp.stats.bytes_sent
    (x @ y > 0).get()
    # the provider answered the orchestrator with bare acknowledgements only...
    assert replies_to_orchestrator and all(type(r) is m.OkReply for r in replies_to_orchestrator)
    # ...and sent the material itself to the parties
    assert cp.stats.bytes_sent > cp_sent_before
    assert "crypto_provider" in senders_to_alice


def test_seeded_sharing_sends_half_the_bytes_for_two_parties(workers, hook):
    alice, bob, _, cp = workers
    me = hook.local_worker
    value = torch.arange(10_000)
    before = me.stats.bytes_sent
    x = value.share(alice, bob, crypto_provider=cp)
    seeded = me.stats.bytes_sent - before
    assert seeded < 8 * 10_000 * 1.1  # one tensor + one seed, not two tensors
    assert torch.equal(x.get(), value)


def test_float_tensors_must_be_encoded(workers):
    alice, bob, _, cp = workers
    with pytest.raises(NotEncodedError, match="fix_precision"):
        torch.tensor([1.5]).share(alice, bob, crypto_provider=cp)


def test_mixing_parties_or_providers_is_refused(workers, hook):
    alice, bob, charlie, cp = workers
    x = torch.tensor([1]).share(alice, bob, crypto_provider=cp)
    y = torch.tensor([1]).share(alice, charlie, crypto_provider=cp)
    with pytest.raises(ShareMismatchError, match="shared among"):
        x + y
    other_cp = sy.VirtualWorker(hook, id="other_cp")
    z = torch.tensor([1]).share(alice, bob, crypto_provider=other_cp)
    with pytest.raises(ShareMismatchError, match="crypto providers"):
        x * z


def test_provider_cannot_be_a_party(workers):
    alice, bob, _, cp = workers
    with pytest.raises(MPCError, match="cannot also be a party"):
        torch.tensor([1]).share(alice, cp, crypto_provider=cp)


def test_shares_are_not_printed(workers):
    alice, bob, _, cp = workers
    x = torch.tensor([123456]).share(alice, bob, crypto_provider=cp)
    assert "123456" not in repr(x)
