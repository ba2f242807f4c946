"""Model-file and cluster-file checks that must not refuse what veil itself writes (controls for the red team)."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from veil.messaging import serde
from veil.serving.cluster import Cluster, NetworkWorker
from veil.serving.errors import ModelConversionError, ServingError
from veil.serving.model_file import FORMAT, load_model, save_model


def test_saved_cnn_with_batchnorm_loads_and_runs(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).eval()
    loaded = load_model(save_model(model, tmp_path / "m.pt", (1, 1, 8, 8)))
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(loaded(x), model(x))
    assert all(p.device.type == "cpu" for p in [*loaded.parameters(), *loaded.buffers()])


def test_whole_float_input_shape_from_r_still_loads(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3))
    path = tmp_path / "m.pt"
    path.write_bytes(serde.encode_value({"format": FORMAT, "input_shape": [1.0, 4.0], "layers": [
        ["Linear", {"in_features": 4, "out_features": 3, "bias": True}]], "state_dict": dict(model.state_dict())}))
    assert load_model(path).veil_input_shape == (1, 4)


def test_weight_of_another_dtype_is_named(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3)).double()
    with pytest.raises(ModelConversionError, match="0.weight"):
        load_model(save_model(model, tmp_path / "m.pt", (1, 4)))


def test_a_saved_model_is_private_to_the_owner_and_replaces_a_planted_link(tmp_path):
    """The file holds the owner's weights in the clear: mode 0600 whatever the umask, and a symlink planted
    at the path (by another local user, to a file they can read) is replaced, not written through."""
    model = nn.Sequential(nn.Linear(4, 3))
    bait = tmp_path / "bait"
    bait.write_bytes(b"")
    (tmp_path / "m.pt").symlink_to(bait)
    old = os.umask(0o022)
    try:
        path = save_model(model, tmp_path / "m.pt", (1, 4))
    finally:
        os.umask(old)
    assert not path.is_symlink() and bait.read_bytes() == b""
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert sorted(os.listdir(tmp_path)) == ["bait", "m.pt"]
    x = torch.randn(2, 4)
    assert torch.equal(load_model(path)(x), model(x))


def test_cluster_file_round_trip_leaves_no_temporary_file(tmp_path):
    cluster = Cluster(NetworkWorker("127.0.0.1:1"), NetworkWorker("127.0.0.1:2"), NetworkWorker("127.0.0.1:3"),
                      client_token="c" * 32)
    path = cluster.save(tmp_path / "cluster.json")
    assert os.listdir(tmp_path) == ["cluster.json"]
    loaded = Cluster.load(path)
    assert [w.address for w in loaded.workers] == [w.address for w in cluster.workers]
    assert loaded.client_token == "c" * 32
    path.write_text('{"parties": [["a", "h:1"], ["b", "h:x"]], "crypto_provider": ["c", "h:3"]}')
    with pytest.raises(ServingError, match="cluster.json"):
        Cluster.load(path)
