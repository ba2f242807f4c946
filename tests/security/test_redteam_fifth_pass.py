"""Red team, fifth pass: the fixes of 0fa3594 (encrypted aggregation with two aggregators, checked client
updates) and ccd7f80 (model files checked before allocation, cluster file, serving inputs, CSV).

Every test asserts the SAFE behaviour. Holes this pass found (fixed unless said otherwise):

1. Clients dropped during training left ``aggregate`` one id: the sole survivor's update was decrypted alone.
   Fixed: ``aggregate(started=...)`` needs a majority (and >= 2) of the clients the round started with.
2. A hostile aggregator refused the others' hand-overs, they were dropped, and the pair's sum was decrypted.
   Fixed: a failed hand-over refuses the round (no telling whose fault), and the majority rule.
3. A client sending its two copies differently aborts the round, and the error named the honest aggregators.
   Fixed since by per-client commitments (``fl.he_commitments``): that client alone is dropped
   (tests/security/test_redteam_he_commitments.py).
4. NaN/inf mean losses were accepted: fixed, ``pooled.loss_value`` requires a finite one.
5. ``.pt`` files had no layer cap: fixed, ``MAX_LAYERS`` and at most 2^27 output elements over all layers.
6. Hard-linked Keras weights were counted once: fixed, counted per layer variable as Keras reads them.
7. CSV rows of another width than the header were taken silently: fixed, refused in one line.

The other tests are attacks that are correctly refused.
In-process VirtualWorkers; a hostile client is a VirtualWorker whose messages are rewritten (what a hostile
``veil worker`` process could do). Scratch files go to pytest's tmp_path.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import time
import zipfile

import phe
import pytest
import torch

import veil as sy
from veil.exceptions import ConnectionLostError, VeilError
from veil.federated import trainer as fl
from veil.federated.he_agg import EncryptedAggregation, EncryptedAggregationError
from veil.he.paillier import PaillierTensor
from veil.messaging import messages as m
from veil.messaging import serde
from veil.messaging.serde import deserialize, serialize
from veil.serving.errors import ModelConversionError

from fl_helpers import pick_aggregators as _pick
from fl_helpers import (attempt, honest_fedavg, make_model, make_parts, pooled_with_hostile, sequential_with_hostile,
                        uid)


@pytest.fixture(scope="module")
def paillier():
    return phe.generate_paillier_keypair(n_length=512)


def _he(paillier):
    pub, priv = paillier
    return EncryptedAggregation(public_key=pub, private_key=priv)


def _train(model, workers, parts, **kw):
    fed = sy.FederatedDataset([sy.BaseDataset(x, y).send(w) for (x, y), w in zip(parts, workers)])
    return attempt(lambda: fl.train(model, fed, rounds=1, lr=0.05, batch_size=8, progress=False, **kw))


# ================================================================== (a) encrypted aggregation


class FailsTraining(sy.VirtualWorker):
    """Goes away when the coordinator loads the global state (before it trains or encrypts anything)."""

    def _recv_msg(self, data):
        if b"veil.plan.load_state" in bytes(data):
            raise ConnectionLostError(f"client {self.id!r} went away")
        return super()._recv_msg(data)


def test_he_single_training_survivor_is_not_decrypted_alone(hook, paillier):
    victim = sy.VirtualWorker(hook, id=uid("he5-victim"))
    gone = [FailsTraining(hook, id=uid("he5-gone")) for _ in range(2)]
    parts = make_parts(3)
    model = make_model()
    hist, err, _ = _train(model, [victim, *gone], parts, encrypted_aggregation=_he(paillier))
    alone = honest_fedavg(parts[:1])
    leaked = err is None and torch.allclose(model.weight.detach(), alone[0], atol=1e-5) and \
        torch.allclose(model.bias.detach(), alone[1], atol=1e-5)
    assert not leaked, ("3 clients trained, 2 dropped before encrypting: the coordinator decrypted the victim's "
                        "update alone and made it the global model (sent to every client next round)")
    if err is not None:
        assert isinstance(err, (VeilError, RuntimeError)), repr(err)


class RefusesHandOvers(sy.VirtualWorker):
    """An aggregating client that refuses every ciphertext handed to it except the other aggregator's:
    the coordinator blames (and drops) each sender, so only the two aggregators survive."""

    accept_from = None

    def _recv_msg(self, data):
        msg, sender, _ = deserialize(bytes(data))
        if type(msg) is m.ObjectMessage and sender != self.accept_from and any(
                isinstance(getattr(o, "obj", None), PaillierTensor) for o in msg.objects):
            raise ConnectionLostError("connection reset")
        return super()._recv_msg(data)


def test_he_hostile_aggregator_cannot_shrink_the_round_to_the_pair(hook, paillier, monkeypatch):
    agg = RefusesHandOvers(hook, id=uid("he5-agg"))
    victim = sy.VirtualWorker(hook, id=uid("he5-victim"))
    agg.accept_from = victim.id
    others = [sy.VirtualWorker(hook, id=uid("he5-ok")) for _ in range(3)]
    _pick(monkeypatch, agg.id, victim.id)
    parts = make_parts(5)
    model = make_model()
    hist, err, _ = _train(model, [agg, victim, *others], parts, encrypted_aggregation=_he(paillier))
    if err is not None:  # a fix may refuse the round (too few survivors, or blame the aggregator)
        assert isinstance(err, (VeilError, RuntimeError)), repr(err)
        return
    pair_only = honest_fedavg(parts[:2])  # (w_a x_a + w_v x_v) / (w_a + w_v): minus its own x_a, the victim's
    leaked = torch.allclose(model.weight.detach(), pair_only[0], atol=1e-5) and \
        torch.allclose(model.bias.detach(), pair_only[1], atol=1e-5)
    assert not leaked, (f"3 honest clients dropped ({hist.rounds[0].dropped}); the decrypted sum is the two "
                        "aggregators' alone")


class TwoFaced(sy.VirtualWorker):
    """A client that is not an aggregator hands the two aggregators different ciphertexts of its update."""

    sent = 0

    def send_msg(self, msg, location):
        if type(msg) is m.ObjectMessage and any(isinstance(o.obj, PaillierTensor) for o in msg.objects):
            self.sent += 1
            if self.sent == 1:
                msg = m.ObjectMessage([dataclasses.replace(o, obj=o.obj * 2.0) if isinstance(o.obj, PaillierTensor)
                                       else o for o in msg.objects])
        return super().send_msg(msg, location)


def test_he_two_faced_client_is_dropped_without_blaming_the_aggregators(hook, paillier, monkeypatch):
    # Found: one non-aggregator client sending two different copies aborted fl.train, and the error named the
    # honest aggregators. With per-client commitments the copy that does not match is reported, that client
    # alone is dropped, and the round is FedAvg over the honest clients.
    # (one aggregator reports it: dropped where a majority is left without that aggregator, so 5 clients)
    honest = [sy.VirtualWorker(hook, id=uid("he5-h")) for _ in range(4)]
    bad = TwoFaced(hook, id=uid("he5-2face"))
    _pick(monkeypatch, honest[0].id, honest[1].id)
    parts = make_parts(5)
    model = make_model()
    hist, err, _ = _train(model, [*honest, bad], parts, encrypted_aggregation=_he(paillier))
    assert bad.sent == 2, "harness: both copies went out"
    assert err is None and hist.rounds[0].dropped == [bad.id], repr(err)
    ref = honest_fedavg(parts[:4])
    assert torch.allclose(model.weight.detach(), ref[0], atol=1e-5) and \
        torch.allclose(model.bias.detach(), ref[1], atol=1e-5)


class ReturnsOther(sy.VirtualWorker):
    """The first aggregator (the one whose sum is decrypted) answers the fetch of its sum with ``rewrite``
    applied: the same plaintext at another exponent, a plain tensor, or another key's ciphertext."""

    rewrite = None

    def _recv_msg(self, data):
        request = deserialize(bytes(data))[0]
        reply = super()._recv_msg(data)
        if type(request) is m.GetObjectsMessage:
            got = deserialize(reply)[0]
            if type(got) is m.ObjectsReply and any(isinstance(o, PaillierTensor) for o in got.objects):
                return serialize(m.ObjectsReply([self.rewrite(o) for o in got.objects]), sender=self.id)
        return reply


_OTHER_KEY = phe.generate_paillier_keypair(n_length=512)[0]


@pytest.mark.parametrize("rewrite", [
    lambda s: (s * 0.5) * 2.0,                                       # same plaintext, another exponent/encoding
    lambda s: torch.zeros(4, dtype=torch.float64),                   # a plain tensor instead of a ciphertext
    lambda s: PaillierTensor(_OTHER_KEY, s._ct, s.exponent, s.dtype),  # another public key, same integers
], ids=["exponent", "plain-tensor", "other-key"])
def test_he_aggregator_sum_in_another_encoding_is_refused(hook, paillier, monkeypatch, rewrite):
    agg = ReturnsOther(hook, id=uid("he5-other"))
    agg.rewrite = rewrite
    honest = [sy.VirtualWorker(hook, id=uid("he5-h")) for _ in range(2)]
    _pick(monkeypatch, agg.id, honest[0].id)
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    hist, err, _ = _train(model, [agg, *honest], make_parts(3), encrypted_aggregation=_he(paillier))
    assert isinstance(err, EncryptedAggregationError), repr(err)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "something was decrypted"


def test_paillier_non_canonical_ciphertext_is_refused(paillier):
    from veil.he import paillier_wire
    from veil.he.errors import WireFormatError

    pub, _ = paillier
    from veil.he import encrypt

    t = encrypt(torch.tensor([1.0, 2.0], dtype=torch.float64), protocol="paillier", public_key=pub)
    d = paillier_wire.tensor_to_wire(t)
    nsq = pub.n ** 2
    width = (nsq.bit_length() + 7) // 8
    cts = [int.from_bytes(d["ct"][i * width:(i + 1) * width], "big") for i in range(2)]
    for bad in ([cts[0] + nsq, cts[1]], [0, cts[1]], [cts[0], pub.n]):
        if any(c.bit_length() > width * 8 for c in bad):
            continue  # (c + n^2 does not fit the fixed width: refused by its length)
        forged = dict(d, ct=b"".join(c.to_bytes(width, "big") for c in bad))
        with pytest.raises(WireFormatError):
            paillier_wire.tensor_from_wire(forged)
    assert paillier_wire.tensor_to_wire(paillier_wire.tensor_from_wire(d)) == d  # canonical round trip


def test_non_finite_mean_loss_drops_the_client(hook):
    model, hist, err, bad, honest = sequential_with_hostile(hook, lambda o: [torch.tensor(float("nan")), o[1], o[2]])
    assert err is None, repr(err)
    assert hist.rounds[0].dropped == [bad.id], f"a NaN loss was averaged in: train_loss {hist.rounds[0].train_loss}"
    model, hist, err, pool, honest, _ = pooled_with_hostile(hook, lambda o: [torch.tensor(float("inf")), *o[1:]])
    assert err is None, repr(err)
    assert list(hist.rounds[0].dropped) == [pool.client_id(1)]


def test_state_of_a_tensor_subclass_or_bool_dtype_is_dropped(hook):
    class Sneaky(torch.Tensor):
        pass

    for tamper in (lambda o: [o[0], o[1].to(torch.bool), o[2]],
                   lambda o: [o[0].reshape(1, 1), o[1], o[2]],          # a 1-element loss of another shape: fine
                   lambda o: [o[0], o[1].as_subclass(Sneaky), o[2]]):   # a subclass travels as a plain tensor
        model, hist, err, bad, honest = sequential_with_hostile(hook, tamper)
        assert err is None, repr(err)
        assert torch.isfinite(model.weight).all()
    model, hist, err, bad, honest = sequential_with_hostile(hook, lambda o: [o[0], o[1].to(torch.bool), o[2]])
    assert hist.rounds[0].dropped == [bad.id]


# ================================================================== (b) model files


def _write_pt(path, layers, input_shape, state_dict=None):
    from veil.serving.model_file import FORMAT

    path.write_bytes(serde.encode_value({"format": FORMAT, "input_shape": input_shape, "layers": layers,
                                         "state_dict": state_dict or {}}))
    return path


def test_pt_layer_count_is_bounded(tmp_path):
    from veil.serving.model_file import load_model

    path = _write_pt(tmp_path / "deep.pt", [["ReLU", {}]] * 5000, [1, 4])
    start = time.monotonic()
    with pytest.raises(ModelConversionError):
        load_model(path)
    assert time.monotonic() - start < 5


def test_pt_huge_declared_layer_is_refused_before_allocation(tmp_path):
    from veil.serving.model_file import load_model

    start = time.monotonic()
    path = _write_pt(tmp_path / "huge.pt", [["Linear", {"in_features": 1 << 20, "out_features": 1 << 20}]],
                     [1, 1 << 20])
    with pytest.raises(ModelConversionError, match="weights do not fit"):
        load_model(path)
    # the right names with tiny tensors: refused by shape, nothing of 2^40 elements allocated
    path = _write_pt(tmp_path / "huge2.pt", [["Linear", {"in_features": 1 << 20, "out_features": 1 << 20}]],
                     [1, 1 << 20], {"0.weight": torch.zeros(1, 1), "0.bias": torch.zeros(1)})
    with pytest.raises(ModelConversionError, match="needs"):
        load_model(path)
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("layers,shape", [
    ([["Linear", [4, 2]]], [1, 4]),                                               # positional arguments
    ([["Linear", {"in_features": 4, "out_features": 2, "device": "cpu"}]], [1, 4]),
    ([["Linear", {"in_features": 4, "out_features": 2, "dtype": "float64"}]], [1, 4]),
    ([["Linear", {"in_features": True, "out_features": 2}]], [1, 1]),
    ([["MaxPool2d", {"kernel_size": 2, "return_indices": True}]], [1, 1, 4, 4]),
    ([["ReLU", {"inplace": True}]], [1, 4]),
    ([["ReLU", {}]], [1, 0]),
    ([["ReLU", {}]], [1, True]),
    ([["ReLU", {}]], [1, float("nan")]),
    ([["ReLU", {}]], [1, 2.5]),
    ([["ReLU", {}]], [1 << 13, 1 << 13]),
    ([["Conv2d", {"in_channels": 1, "out_channels": 1 << 20, "kernel_size": 1}]], [1, 1, 64, 64]),
], ids=["positional", "device", "dtype", "bool-size", "return-indices", "inplace", "zero-dim", "bool-dim",
        "nan-dim", "fraction-dim", "too-many-elements", "activation-too-big"])
def test_pt_argument_and_shape_tricks_are_refused(tmp_path, layers, shape):
    from veil.serving.model_file import load_model

    with pytest.raises(ModelConversionError):
        load_model(_write_pt(tmp_path / "m.pt", layers, shape))


def _keras_dense_chain(tmp_path, n, d):
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras

    model = keras.Sequential([keras.Input(shape=(d,))] + [keras.layers.Dense(d, name=f"d{i}") for i in range(n)])
    path = tmp_path / "chain.keras"
    model.save(path)
    with zipfile.ZipFile(path) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def _zip(path, members):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members:
            zf.writestr(name, data)
    return path


def test_keras_hard_linked_weights_are_counted_per_layer(tmp_path):
    import h5py

    from veil.serving.keras_files import check_keras_file

    n, d = 30, 256
    members = _keras_dense_chain(tmp_path, n, d)
    path = lambda i: "layers/dense" + (f"_{i}" if i else "")  # noqa: E731  (Keras' own paths)
    out = io.BytesIO()
    with h5py.File(io.BytesIO(members["model.weights.h5"]), "r") as src, h5py.File(out, "w") as dst:
        for k, v in src.attrs.items():
            dst.attrs[k] = v
        for i in range(n):
            group = dst.create_group(path(i) + "/vars")
            for k, v in src[path(i) + "/vars"].attrs.items():
                group.attrs[k] = v
            for k in ("0", "1"):
                if i == 0:
                    group.create_dataset(k, data=src[path(0) + f"/vars/{k}"][()])
                else:
                    group[k] = dst[path(0) + f"/vars/{k}"]  # a hard link: one object, n layers
        for name in src:
            if name != "layers":
                src.copy(name, dst)
    weights = out.getvalue()
    declared = n * (d * d + d) * 4
    assert declared > 10 * len(weights), "harness: the linked file is much smaller than what Keras allocates"
    linked = _zip(tmp_path / "linked.keras", [(k, weights if k == "model.weights.h5" else v)
                                              for k, v in members.items()])
    with pytest.raises(ModelConversionError):
        check_keras_file(linked)


def test_keras_duplicate_config_member_is_the_one_checked(tmp_path):
    from veil.serving.model_file import load_model

    members = _keras_dense_chain(tmp_path, 2, 4)
    cfg = json.loads(members["config.json"])
    bad = json.loads(members["config.json"])
    bad["config"]["layers"][1]["class_name"] = "Lambda"
    # the checker and Keras both read the last member of a name: the hostile one last is refused
    dup = _zip(tmp_path / "dup.keras", [("config.json", json.dumps(cfg)), ("metadata.json", members["metadata.json"]),
                                        ("model.weights.h5", members["model.weights.h5"]),
                                        ("config.json", json.dumps(bad))])
    with pytest.raises(ModelConversionError, match="Lambda"):
        load_model(dup)


def test_keras_zip_member_declaring_another_size_is_refused(tmp_path):
    from veil.serving.model_file import load_model

    members = _keras_dense_chain(tmp_path, 2, 4)
    path = _zip(tmp_path / "lie.keras", list(members.items()))
    raw = bytearray(path.read_bytes())
    # central directory: declare config.json 1 byte shorter than it inflates (zipfile stops there: bad JSON/CRC)
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("config.json")
    cd = raw.rfind(b"PK\x01\x02", 0, raw.find(b"PK\x05\x06"))
    while cd >= 0:
        name_len = int.from_bytes(raw[cd + 28:cd + 30], "little")
        if raw[cd + 46:cd + 46 + name_len] == b"config.json":
            raw[cd + 24:cd + 28] = (info.file_size + 10**9).to_bytes(4, "little")  # declares ~1 GB
            break
        cd = raw.rfind(b"PK\x01\x02", 0, cd)
    path.write_bytes(bytes(raw))
    with pytest.raises(ModelConversionError):
        load_model(path)


# ================================================================== (b) cluster file, serving inputs, CSV


def test_cluster_save_replaces_a_planted_symlink_not_its_target(tmp_path):
    from veil.serving.cluster import Cluster

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    link = tmp_path / "cluster.json"
    link.symlink_to(victim)
    cluster = Cluster(sy.NetworkWorker("localhost:4000", id="a"), sy.NetworkWorker("localhost:4001", id="b"),
                      crypto_provider=sy.NetworkWorker("localhost:4002", id="c"), client_token="tok")
    cluster.save(link)
    assert victim.read_text() == "keep me"
    assert not link.is_symlink() and (link.stat().st_mode & 0o777) == 0o600
    assert Cluster.load(link).client_token == "tok"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("shape", [(1, float("nan")), (1, True), (1, float("inf")), (1, 2.5), ("1", 2), (1, -1)])
def test_serving_shape_tricks_are_refused(shape):
    from veil.serving.errors import ServingError
    from veil.serving.inputs import as_shape

    with pytest.raises(ServingError):
        as_shape(shape, "input_shape")


def test_serving_complex_input_is_refused():
    import numpy as np

    from veil.serving.errors import ServingError
    from veil.serving.inputs import as_tensor

    for x in (torch.tensor([1 + 2j]), np.array([1 + 2j]), [1 + 2j]):
        with pytest.raises(ServingError):
            as_tensor(x)


def test_csv_nul_and_overlong_fields_are_one_line_errors(tmp_path):
    from veil.workers.websocket_cli import read_csv

    nul = tmp_path / "nul.csv"
    nul.write_bytes(b"a,b,y\n1,2\x00,3\n")
    long = tmp_path / "long.csv"
    long.write_text("a,y\n" + "1" * 200_000 + ",2\n")
    for path in (nul, long):
        with pytest.raises(SystemExit) as e:
            read_csv(path, "y")
        assert "\n" not in str(e.value) and len(str(e.value)) < 1000


def test_csv_rows_of_another_width_than_the_header_are_refused(tmp_path):
    from veil.workers.websocket_cli import read_csv

    short = tmp_path / "short.csv"
    short.write_text("a,b,y\n1,2\n3,4\n")
    long = tmp_path / "long.csv"
    long.write_text("a,b,y\n1,2,3,9\n3,4,5,9\n")
    for path in (short, long):
        with pytest.raises(SystemExit):
            read_csv(path, "y")
