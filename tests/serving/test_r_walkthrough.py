"""Issue #18: the R walkthrough (examples/r) run with Rscript, owner and client in two R processes.

R and reticulate come from Debian (scripts/setup.sh installs them as root); reticulate
runs this test's Python (RETICULATE_PYTHON), so the R scripts use this checkout's veil.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from veil.datasets import load_mnist_5k
from veil.workers.websocket_launcher import free_port

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "r"

pytestmark = pytest.mark.skipif(
    shutil.which("Rscript") is None,
    reason="Rscript is not installed: scripts/setup.sh installs r-base-core and r-cran-reticulate (run it as root)",
)


def _r_env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    env.update({
        "RETICULATE_PYTHON": sys.executable,
        # (tests/exit_collection: a sitecustomize that spares each R process's Python exit a walk over torch)
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), str(ROOT / "tests" / "exit_collection"),
                                                  env.get("PYTHONPATH", "")) if p),
        "VEIL_R_PORTS": ",".join(str(free_port()) for _ in range(3)),
        "VEIL_R_CLUSTER_FILE": str(tmp_path / "cluster.json"),
        "VEIL_R_MODEL_FILE": str(tmp_path / "model.keras"),
        "VEIL_R_PREDICTIONS": str(tmp_path / "predictions.csv"),
        "VEIL_R_STEPS": "40",  # a short training: the test checks equality with the plaintext model, not accuracy
        "KERAS_BACKEND": "torch",
    })
    return env


def _plaintext_predictions(model_file: Path) -> torch.Tensor:
    from veil.serving.keras_convert import import_keras

    keras = import_keras()  # the torch backend, as in owner.R
    model = keras.saving.load_model(model_file, compile=False, safe_mode=True)
    x = load_mnist_5k(scale=False)["x_test"][[0, 100, 200]].reshape(3, 28, 28, 1) / 255  # client.R's picks
    return torch.as_tensor(model.predict(x.numpy(), verbose=0))


def test_r_owner_and_client_scripts(tmp_path):
    env = _r_env(tmp_path)
    owner = subprocess.Popen(["Rscript", str(EXAMPLES / "owner.R")], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = subprocess.run(["Rscript", str(EXAMPLES / "client.R")], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=900)
        owner_out = owner.communicate(timeout=180)[0]
    finally:
        owner.kill()
    assert client.returncode == 0, f"client.R failed:\n{client.stdout[-3000:]}\n{client.stderr[-3000:]}"
    assert owner.returncode == 0, f"owner.R failed:\n{owner_out[-4000:]}"

    got = torch.tensor([[float(v) for v in line.split(",")] for line in
                        (tmp_path / "predictions.csv").read_text().splitlines()])
    expected = _plaintext_predictions(tmp_path / "model.keras")
    assert got.shape == (3, 10)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    assert torch.allclose(got, expected, atol=5e-2)

    # The owner served the three queries holding only pointers, and printed no prediction.
    assert "the owner holds only pointers: TRUE" in owner_out
    assert "served 3 requests and stopped" in owner_out
    assert "model says" not in owner_out
    for row in got:
        assert f"{row[0].item():.4f}"[:6] not in owner_out
    assert client.stdout.count("the encrypted model says") == 3


def test_r_shared_secret_example(tmp_path):
    env = _r_env(tmp_path)
    done = subprocess.run(["Rscript", str(EXAMPLES / "shared_secret.R")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "by hand: 77777 reconstructed: TRUE" in out
    assert "by hand: 77777 + 22223 = 100000" in out
    assert "veil: the shares add up to 77777" in out
    assert "veil: 77777 + 22223 = 100000" in out
    assert "veil: 77777 * 3 = 233331" in out
    assert "veil: a share alone looks uniform: TRUE" in out
