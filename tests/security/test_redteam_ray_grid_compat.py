"""Red team of veil's Ray scale-out (``sy.ray``: many virtual FL clients in one Ray actor), grid search
(``sy.grid`` / ``PrivateGridNetwork``, ``search``) and the PySyft-0.2 compatibility entry points
(``veil.compat``), as a hostile data scientist (the coordinator) reaches them.

Threat model (README): Ray's transport is the simulation's trusted fabric; what a hosted client executes is
decided by the veil message it decodes, and each client is "an ordinary veil worker" (in-process: it trusts
the claimed sender). The scientist row still holds: no ``.get()``/move of private or DP-only data, no change
or deletion of owner data, and with ``enable_dp(hide_count=True)`` pointers to DP-only data report 0 records.
"""

from __future__ import annotations

import pytest
import torch

import veil as sy
from review_steps import shows_number  # (tests/security is on the path)
from veil.exceptions import PermissionDeniedError
from veil.messaging import messages as m
from veil.messaging.serde import deserialize, serialize

pytestmark = pytest.mark.filterwarnings("ignore")

ROWS = 37  # an odd count: what hide_count must keep from the scientist


@pytest.fixture(scope="module")
def ray_actor():
    """One local Ray and one client-host actor for every Ray test of this module (an actor costs seconds)."""
    sy.ray.init(num_cpus=1)
    import ray

    actor = ray.remote(sy.ray.ClientHost).options(num_cpus=0, max_concurrency=1).remote()
    yield actor
    ray.kill(actor)
    sy.ray.shutdown()


def _reply(hook, data: bytes):
    return deserialize(data, hook.local_worker._decode_ctx)[0]


# ------------------------------------------------------------------------------------ Ray clients

def test_ray_hidden_count_stays_hidden_from_the_coordinator(hook, ray_actor):
    """Attack: the scientist starts Ray clients whose owner-side DP hides the record count
    (``dp={"hide_count": True, "nominal_count": 40, ...}``: pointers to the DP-only data must report 0
    records, the count only through a charged DP count). Must hold: the pointers and the pool's per-client
    sample counts the coordinator holds do not state the exact count, as the client's own search does not
    (``make_dataset`` builds the data inside the actor: the coordinator never held it)."""
    dp = {"max_grad_norm": 1.0, "noise_multiplier": 2.0, "budgets": {"me": (5.0, 1e-4)},
          "hide_count": True, "nominal_count": 40}
    # make_dataset runs inside the actor (the client's own data source): the coordinator never holds the data
    clients = sy.ray.federated_clients(num_clients=1, actors=[ray_actor], hook=hook, prefix="rthc", dp=dp,
                                       make_dataset=lambda i: (torch.randn(ROWS, 3), torch.zeros(ROWS, 1)))
    try:
        found = clients[0].search(["#data"])  # the native door: the worker describes DP-only data as 0 rows
        assert len(found) == 1 and found[0].shape[0] == 0
        with pytest.raises(PermissionDeniedError, match="differential-privacy"):
            (clients.data[0] * 1).sum().get()  # DP-only: no computation either
        leaked = {clients.data[0].shape[0], clients.targets[0].shape[0], clients.num_samples(0)}
        assert ROWS not in leaked, f"the coordinator holds the exact record count {ROWS}"
    finally:
        clients.shutdown()


def test_ray_client_cannot_read_write_or_delete_a_neighbours_data_through_its_own_worker(hook, ray_actor):
    """Attack: two clients share one actor; the scientist routes messages to client A that act on client B's
    private owner data through A's worker (A resolves B in the same actor, as its own deputy): a pointer to
    B's data stored on A and ``remote_get`` there, an in-place op and a ``move`` onto B's id relayed by A,
    a deletion of the stored pointer. Must hold: B's monitor refuses every release and write exactly as
    it refuses the scientist (A's identity adds nothing), and B's data is unchanged and still served."""
    parts = [(torch.full((4, 2), 10.0 * (i + 1)), torch.zeros(4, 1)) for i in range(2)]
    clients = sy.ray.federated_clients(parts, actors=[ray_actor], hook=hook, prefix="rtx")
    try:
        a, b_data = clients[0], clients.data[1]
        b_id = clients.data_ids(1)[0]
        relay = b_data.send(a)  # a pointer, stored on A, to B's private data
        with pytest.raises(PermissionDeniedError, match="private"):
            relay.remote_get()  # A fetches from B with its own name
        with pytest.raises(Exception) as written:
            relay.add_(1.0)  # A forwards an in-place op onto B's owner data
        assert not shows_number(str(written.value), "10") and not shows_number(str(written.value), "20")  # no value
        mine = sy.send(torch.ones(4, 2), a)
        with pytest.raises(PermissionDeniedError, match="in use"):  # A moves its object onto B's data id
            a.hook.local_worker.send_msg(m.MoveMessage([mine.id_at_location], "rtx1", [b_id], None), a)
        del relay  # A lets go of the stored pointer: B's data must not be freed
        import gc

        gc.collect()
        hook.local_worker.flush(a)
        assert float((clients.data[1] * 1).sum().get()) == 20.0 * 8  # B's data: unchanged, still served
        assert float((clients.data[0] * 1).sum().get()) == 10.0 * 8
    finally:
        clients.shutdown()


def test_second_federation_on_shared_actors_never_replaces_a_hosted_clients_data(hook, ray_actor):
    """Attack: federations share actors (``actors=earlier.actors``, documented: "client ids must differ:
    prefix"). A second federation with a different prefix, ``"rtp1"``, spells client id ``"rtp10"``, which
    is client 10 of the first federation (prefix ``"rtp"``). Must hold: the actor refuses the taken id, or
    leaves the first federation's client 10 alone: its owner data is never lost or replaced unannounced."""
    first = sy.ray.federated_clients([(torch.full((2, 2), float(i)), torch.zeros(2, 1)) for i in range(11)],
                                     actors=[ray_actor], hook=hook, prefix="rtp")
    second = None
    try:
        assert float((first.data[10] * 1).sum().get()) == 10.0 * 4
        try:
            second = sy.ray.federated_clients([(torch.full((2, 2), -7.0), torch.zeros(2, 1))],
                                              actors=[ray_actor], hook=hook, prefix="rtp1")
        except ValueError as e:  # refusing the overlapping prefix is the safe answer, said clearly
            assert "overlaps the prefix 'rtp'" in str(e)
        assert float((first.data[10] * 1).sum().get()) == 10.0 * 4  # client 10's data: still there, unchanged
    finally:
        if second is not None:
            second.shutdown()
        first.shutdown()


def test_ray_batched_frames_claiming_the_clients_own_name_get_no_owner_rights(hook, ray_actor):
    """Attack: raw frames through the actor's batched entry (``ClientHost.recv_batch``), each claiming to be
    sent by the client worker itself or by its neighbour (in-process workers trust the claimed sender, and
    the owner's data is recorded as created by the worker's own id): fetch, delete and overwrite its private
    data, ``user=`` the worker's own name. Must hold: every release and write is refused with no value in the
    text, the refusals stay per client, and the data is unchanged and still computed on."""
    import ray

    parts = [(torch.full((3, 2), 5.0 + i), torch.zeros(3, 1)) for i in range(2)]
    clients = sy.ray.federated_clients(parts, actors=[ray_actor], hook=hook, prefix="rtn")
    try:
        xid, _ = clients.data_ids(0)
        from veil.ids import new_id

        frames = []
        for sender in ("rtn0", "rtn1"):
            frames += [serialize(m.GetObjectsMessage([xid], True, "rtn0"), sender=sender),
                       serialize(m.MoveMessage([xid], "rtn1", [new_id()], "rtn0"), sender=sender),
                       serialize(m.CommandMessage("Tensor.mul_", (m.ObjectRef(xid), 0.0), {}, [0], False),
                                 sender=sender)]
        replies = ray.get(ray_actor.recv_batch.remote([("rtn0", [f]) for f in frames] +
                                                     [("rtn0", [serialize(m.DeleteMessage([xid]), sender="rtn0")])]))
        decoded = [_reply(hook, rs[0]) for rs in replies]
        assert all(type(r) is m.ErrorReply and r.error == "PermissionDeniedError" for r in decoded[:-1]), decoded
        assert all("5." not in r.message for r in decoded[:-1])
        assert type(decoded[-1]) is m.OkReply  # a deletion of owner data is a silent no-op ...
        assert float((clients.data[0] * 1).sum().get()) == 5.0 * 6  # ... and the data is still there, unchanged
        assert float((clients.data[1] * 1).sum().get()) == 6.0 * 6
    finally:
        clients.shutdown()
