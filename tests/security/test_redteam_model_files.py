"""Red team: files and bytes a model author, requester or client hands to veil outside the message serde.

Covers ``veil serve``'s model loading (``veil.serving.model_file`` for ``.pt``, ``keras_convert`` for
``.keras`` / ``.h5``), the cluster file it writes and clients read (``Cluster.save`` / ``Cluster.load``),
``veil worker --dataset`` CSV files, and the R/numpy input adapters (``veil.serving.inputs``).

Rules checked: nothing in a file runs code (no pickle / torch.load, Keras safe mode), bad input gets
one clear line (``ModelConversionError`` from the API, ``veil serve: error: ...`` and exit 2 from the
CLI, never a traceback), memory stays bounded by what the file really holds (no allocation sized by a
header before it is checked), the converted model computes what the file's model computes, and
nothing the owner stored is changed.

Holes found by this review, each fixed (the tests below assert the safe behaviour):

- .pt layer constructor errors escaped as tracebacks: model_file.build checks sizes, wraps any exception.
- .pt declared layer sizes were allocated before any check: build runs on device="meta", weights checked first.
- .pt files could pass device=/dtype=: build allows only the keywords the recorders write (model_file.KEYWORDS).
- .pt input_shape was never checked: load_model bounds it and dry-runs the model (meta, then zeros) at load.
- Keras RuntimeError/BadZipFile/RecursionError escaped: load_keras wraps every Exception as ModelConversionError.
- Keras built variables the config declared before any check: check_keras_file matches the config with the weights.
- Keras config.json zip bomb: check_keras_file caps each member's declared and read size (config.json 1 MiB).
- Shared Keras layers were converted once: the config/graph must be a chain of layers, each applied once.
- Branching Keras graphs were chained in list order: keras_to_torch accepts only a Sequential or a linear chain.
- Quantized Dense gave a bare IndexError: policy refused, _dense/_conv2d read kernel/bias by name.
- Cluster.save followed a planted '<file>.tmp' symlink: it writes a fresh tempfile.mkstemp file, then os.replace.
- Cluster.save kept an existing tmp file's mode: the mkstemp file is fchmod 0o600, fsynced, then replaced.
- A malformed cluster file gave KeyError/JSONDecodeError: Cluster.load validates it, raising ServingError.
- read_csv let _csv.Error (a field over 128 KiB) escape: it exits with one `veil worker:` line.
- as_shape/as_count raised ValueError/OverflowError for NaN/Inf: they raise ServingError.
- as_tensor dropped the imaginary part of complex inputs: it refuses complex arrays and tensors.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import signal
import stat
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from veil.messaging import serde
from veil.serving.errors import ModelConversionError, ServingError
from veil.serving.model_file import FORMAT, load_model, save_model

from tests.cli_batch import run_veil

ROOT = Path(__file__).resolve().parents[2]
SENTINEL_CODE = "veil-redteam-ran"


# ------------------------------------------------------------------ helpers


def _pt(path: Path, layers, state_dict, input_shape=(1, 4)) -> Path:
    """A hand-made veil model file (what a hostile model author can write)."""
    saved = {"format": FORMAT, "input_shape": list(input_shape) if isinstance(input_shape, tuple) else input_shape,
             "layers": layers, "state_dict": state_dict}
    path.write_bytes(serde.encode_value(saved))
    return path


def _linear_sd(i=4, o=3, value=0.5):
    return {"0.weight": torch.full((o, i), value), "0.bias": torch.full((o,), value)}


@pytest.fixture(scope="module")
def keras():
    from veil.serving.keras_convert import import_keras

    k = import_keras()
    if k.backend.backend() != "torch":
        pytest.skip("keras runs on another backend in this process")
    return k


@pytest.fixture(scope="module")
def keras_base(keras, tmp_path_factory):
    """(members of a small valid .keras archive, its parsed config.json)."""
    d = tmp_path_factory.mktemp("keras")
    inp = keras.Input(shape=(4,))
    keras.Model(inp, keras.layers.Dense(3, activation="relu")(inp)).save(d / "ok.keras")
    with zipfile.ZipFile(d / "ok.keras") as z:
        files = {n: z.read(n) for n in z.namelist()}
    return files, json.loads(files["config.json"])


def _keras_file(path: Path, base, config=None, raw_config: bytes | None = None) -> Path:
    files, _ = base
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            if name == "config.json":
                data = raw_config if raw_config is not None else json.dumps(config).encode()
            z.writestr(name, data)
    return path


@pytest.fixture
def serve_cli(monkeypatch, capsys):
    """Runs ``veil serve MODEL --worker x3`` in this process with the cluster connections faked (no
    network): returns (exit status or "raised: <type>", stderr lines). A traceback shows up as "raised"."""
    from veil import cli
    from veil.serving.cluster import Cluster

    monkeypatch.delenv("VEIL_TRACEBACK", raising=False)
    monkeypatch.setattr(Cluster, "connect", lambda self, hook, token, workers=None, timeout=120.0:
                        [object() for _ in (workers if workers is not None else self.workers)])

    def run(model: Path, cluster_file: Path | None = None):
        old = signal.getsignal(signal.SIGTERM)
        argv = ["serve", str(model), "--worker", "127.0.0.1:9", "--worker", "127.0.0.1:10", "--worker",
                "127.0.0.1:11", "--owner-token", "o" * 32, "--client-token", "c" * 32,
                "--cluster-file", str(cluster_file or model.with_name("cluster.json"))]
        try:
            rc = cli.main(argv)
        except BaseException as e:  # noqa: BLE001 - a traceback is exactly what is being tested for
            rc = f"raised: {type(e).__name__}: {str(e)[:120]}"
        finally:
            signal.signal(signal.SIGTERM, old)
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        return rc, err

    return run


def _assert_one_line(result, cluster_file: Path | None = None):
    rc, err = result
    assert rc == 2, f"expected exit status 2 with one line, got {rc!r} / {err!r}"
    assert len(err) == 1 and err[0].startswith("veil serve: error: "), err
    assert "Traceback" not in err[0]
    if cluster_file is not None:
        assert not cluster_file.exists()  # nothing handed to clients for a model that cannot be served


_PEAK_SCRIPT = textwrap.dedent("""
    import json, os, resource, sys, gc
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import torch
    from veil.serving.model_file import load_model
    if sys.argv[1].endswith((".keras", ".h5")):
        from veil.serving.keras_convert import import_keras
        import_keras()
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        load_model(sys.argv[1])
        outcome = "loaded"
    except Exception as e:
        outcome = type(e).__name__ + ": " + str(e).splitlines()[0][:160] if str(e) else type(e).__name__
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"outcome": outcome, "growth_mb": (peak - before) / 1024}))
""")


def _peak_load(path: Path) -> dict:
    """Loads ``path`` in a fresh process; returns its outcome and how far its peak RSS grew (MiB)."""
    env = {**os.environ, "KERAS_BACKEND": "torch", "VEIL_TRACEBACK": ""}
    proc = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


class _Boom:
    """A pickle payload: unpickling it writes a sentinel file (code execution)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), SENTINEL_CODE))


# ------------------------------------------------------------------ .pt files: refused correctly


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_pickled_pt_file_is_refused_without_unpickling(tmp_path, how):
    sentinel = tmp_path / "sentinel"
    path = tmp_path / "model.pt"
    payload = {"format": FORMAT, "boom": _Boom(str(sentinel))}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    assert not sentinel.exists()
    with pytest.raises(ModelConversionError, match="veil model file|save_model"):
        load_model(path)
    assert not sentinel.exists(), "unpickling ran code from the model file"


def test_pt_layer_names_outside_the_table_are_refused(tmp_path):
    for bogus in ("Sequential", "os.system", "Module", "__import__", "Identity"):
        path = _pt(tmp_path / "m.pt", [[bogus, {}]], {})
        with pytest.raises(ModelConversionError, match="unknown layer entry"):
            load_model(path)
    # and a known name with a constructor argument the class does not take
    path = _pt(tmp_path / "m.pt", [["ReLU", {"command": "touch /tmp/x"}]], {})
    with pytest.raises(ModelConversionError, match="bad arguments"):
        load_model(path)


def test_pt_tensor_header_claiming_a_huge_shape_is_refused_before_allocating(tmp_path):
    import msgpack

    from veil.messaging.tensor_payload import encode_tensor

    good = encode_tensor(torch.zeros(3))
    # the same 12 data bytes under a header claiming 2^60 elements
    evil = msgpack.packb(["float32", [2**20, 2**20, 2**20], False, b"\0" * 12])
    saved = serde.encode_value({"format": FORMAT, "input_shape": [1, 4], "layers": [], "state_dict": {"x": torch.zeros(3)}})
    tampered = saved.replace(good, evil)
    assert tampered != saved
    (tmp_path / "m.pt").write_bytes(tampered)
    with pytest.raises(ModelConversionError, match="needs .* bytes|tensor"):
        load_model(tmp_path / "m.pt")


def test_pt_deeply_nested_or_truncated_file_is_a_clean_refusal(tmp_path):
    deep = b"\x91" * 200_000 + b"\xc0"  # 200k nested one-element arrays
    (tmp_path / "deep.pt").write_bytes(deep)
    with pytest.raises(ModelConversionError):
        load_model(tmp_path / "deep.pt")
    whole = serde.encode_value({"format": FORMAT, "input_shape": [1, 4], "layers": [["Linear", {"in_features": 4,
                                "out_features": 3, "bias": True}]], "state_dict": _linear_sd()})
    (tmp_path / "cut.pt").write_bytes(whole[:-5])
    with pytest.raises(ModelConversionError, match="cannot read"):
        load_model(tmp_path / "cut.pt")


def test_nan_and_inf_weights_are_refused_in_one_line_by_veil_serve(tmp_path, serve_cli):
    path = _pt(tmp_path / "nan.pt", [["Linear", {"in_features": 4, "out_features": 3, "bias": True}]],
               {"0.weight": torch.full((3, 4), float("nan")), "0.bias": torch.full((3,), float("inf"))})
    result = serve_cli(path, tmp_path / "cluster.json")
    _assert_one_line(result, tmp_path / "cluster.json")
    assert "NaN or infinite" in result[1][0]


# ------------------------------------------------------------------ .pt files: holes


_BAD_ARCHITECTURES = {
    # nn.Linear(-1, 3): torch raises RuntimeError, which neither load_model nor `veil serve` catches
    "negative_dimension": [["Linear", {"in_features": -1, "out_features": 3, "bias": True}]],
    # 2^50 parameters: the allocation is attempted before any check against the file's weights
    "huge_dimension": [["Linear", {"in_features": 2**40, "out_features": 2**10, "bias": True}]],
    # the file picks the device: AssertionError "Torch not compiled with CUDA enabled"
    "device_cuda": [["Linear", {"in_features": 4, "out_features": 3, "bias": True, "device": "cuda"}]],
}


@pytest.mark.parametrize("case", sorted(_BAD_ARCHITECTURES))
def test_pt_bad_layer_arguments_give_one_line_from_veil_serve(tmp_path, serve_cli, case):
    if case == "device_cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    path = _pt(tmp_path / f"{case}.pt", _BAD_ARCHITECTURES[case], _linear_sd())
    with pytest.raises(ModelConversionError):  # the API names the problem too
        load_model(path)
    _assert_one_line(serve_cli(path, tmp_path / "cluster.json"), tmp_path / "cluster.json")


def test_pt_declared_layer_sizes_do_not_allocate_before_the_weights_are_checked(tmp_path):
    # 2^28 float32 parameters declared, none stored: the file is a few hundred bytes
    path = _pt(tmp_path / "big.pt", [["Linear", {"in_features": 2**14, "out_features": 2**14, "bias": False}]], {})
    assert path.stat().st_size < 1024
    got = _peak_load(path)
    assert got["outcome"].startswith("ModelConversionError"), got
    assert got["growth_mb"] < 256, f"loading a {path.stat().st_size}-byte file grew the process by {got['growth_mb']:.0f} MiB"


def test_pt_file_cannot_choose_device_and_silently_drop_its_weights(tmp_path):
    path = _pt(tmp_path / "meta.pt", [["Linear", {"in_features": 4, "out_features": 3, "bias": True,
                                                  "device": "meta"}]], _linear_sd(value=0.25))
    try:
        model = load_model(path)
    except ModelConversionError:
        return  # refusing the factory argument is safe
    for p in model.parameters():
        assert p.device.type == "cpu" and bool((p == 0.25).all()), "the served weights are not the file's"


_BAD_INPUT_SHAPES = {
    # does not fit the architecture: RuntimeError in ModelService's dry run, after the cluster started
    "mismatch": ([["Linear", {"in_features": 4, "out_features": 3, "bias": True}]], _linear_sd(), (1, 5)),
    # 4 TiB of zeros for the dry run (no request could ever be that large: 64 MiB per connection)
    "huge": ([["Flatten", {"start_dim": 1, "end_dim": -1}]], {}, (1, 2**40)),
    # MaxPool2d(return_indices=True) returns a tuple: AttributeError in the next layer
    "return_indices": ([["MaxPool2d", {"kernel_size": 2, "stride": 2, "padding": 0, "return_indices": True}],
                        ["Flatten", {"start_dim": 1, "end_dim": -1}]], {}, (1, 1, 4, 4)),
}


@pytest.mark.parametrize("case", sorted(_BAD_INPUT_SHAPES))
def test_pt_input_shape_is_checked_at_load(tmp_path, serve_cli, case):
    layers, sd, shape = _BAD_INPUT_SHAPES[case]
    path = _pt(tmp_path / f"{case}.pt", layers, sd, shape)
    _assert_one_line(serve_cli(path, tmp_path / "cluster.json"), tmp_path / "cluster.json")


# ------------------------------------------------------------------ Keras files: refused correctly


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_keras_lambda_bytecode_never_runs(keras, tmp_path, suffix):
    sentinel = tmp_path / "sentinel"
    code = f"lambda x: (open({str(sentinel)!r}, 'w').write('ran'), x)[1]"
    inp = keras.Input(shape=(4,))
    model = keras.Model(inp, keras.layers.Lambda(eval(code))(keras.layers.Dense(3)(inp)))  # noqa: S307
    path = tmp_path / f"lam{suffix}"
    model.save(path)
    sentinel.unlink(missing_ok=True)  # building the model traced the lambda once
    with pytest.raises(ModelConversionError, match="cannot load Keras model"):
        load_model(path)
    assert not sentinel.exists(), "Keras ran the file's Lambda bytecode"


def test_keras_config_naming_arbitrary_callables_is_refused(keras_base, tmp_path):
    _, base = keras_base
    cases = []
    c = copy.deepcopy(base)
    c["config"]["layers"][1].update({"module": "os", "class_name": "system", "registered_name": "system"})
    cases.append(c)
    c = copy.deepcopy(base)
    c["config"]["layers"][1]["config"]["activation"] = {"module": "builtins", "class_name": "function",
                                                        "config": "exec", "registered_name": "function"}
    cases.append(c)
    c = copy.deepcopy(base)
    c["config"]["layers"][1]["config"]["kernel_initializer"] = {
        "module": "keras.utils", "class_name": "get_file", "registered_name": None,
        "config": {"fname": "x", "origin": "http://127.0.0.1:9/x", "cache_dir": str(tmp_path / "dl")}}
    cases.append(c)
    for i, cfg in enumerate(cases):
        with pytest.raises(ModelConversionError, match="cannot load Keras model"):
            load_model(_keras_file(tmp_path / f"evil{i}.keras", keras_base, cfg))
    assert not (tmp_path / "dl").exists()


# ------------------------------------------------------------------ Keras files: holes


def _keras_cases(base):
    _, cfg = base
    huge = copy.deepcopy(cfg)
    huge["config"]["layers"][1]["config"]["units"] = 2**40
    return {
        "huge_units": {"config": huge},  # RuntimeError from torch's allocator (not caught)
        "bad_crc": {"corrupt": True},  # zipfile.BadZipFile (not an OSError/ValueError)
        "deep_json": {"raw_config": b"[" * 100_000 + b"]" * 100_000},  # RecursionError
    }


@pytest.mark.parametrize("case", ["huge_units", "bad_crc", "deep_json"])
def test_malformed_keras_file_gives_one_line_from_veil_serve(keras_base, tmp_path, serve_cli, case):
    spec = _keras_cases(keras_base)[case]
    path = tmp_path / f"{case}.keras"
    if spec.get("corrupt"):
        _keras_file(path, keras_base, keras_base[1])
        raw = bytearray(path.read_bytes())
        at = raw.find(b'"module"')  # inside config.json, stored uncompressed: its CRC no longer matches
        raw[at + 2] ^= 1
        path.write_bytes(bytes(raw))
    else:
        _keras_file(path, keras_base, spec.get("config"), spec.get("raw_config"))
    with pytest.raises(ModelConversionError):
        load_model(path)
    _assert_one_line(serve_cli(path, tmp_path / "cluster.json"), tmp_path / "cluster.json")


def test_keras_declared_sizes_do_not_allocate_before_checks(keras_base, tmp_path):
    cfg = copy.deepcopy(keras_base[1])
    cfg["config"]["layers"][1]["config"]["units"] = 2**25  # (4, 2^25) kernel: 512 MiB; the file holds (4, 3)
    path = _keras_file(tmp_path / "big.keras", keras_base, cfg)
    assert path.stat().st_size < 16 * 1024
    got = _peak_load(path)
    assert got["outcome"].startswith("ModelConversionError"), got
    assert got["growth_mb"] < 256, f"a {path.stat().st_size}-byte file grew the process by {got['growth_mb']:.0f} MiB"


def test_keras_config_zip_bomb_is_refused(keras_base, tmp_path):
    files, _ = keras_base
    path = tmp_path / "bomb.keras"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        for name, data in files.items():
            if name != "config.json":
                z.writestr(name, data)
                continue
            with z.open(name, "w", force_zip64=True) as f:
                block = b" " * (1 << 24)
                for _ in range(32):  # 512 MiB of JSON whitespace before the real config
                    f.write(block)
                f.write(data)
    assert path.stat().st_size < 4 * 2**20
    got = _peak_load(path)
    assert got["outcome"].startswith("ModelConversionError"), got
    assert got["growth_mb"] < 256, f"a {path.stat().st_size}-byte file grew the process by {got['growth_mb']:.0f} MiB"


def _same_function_or_refused(keras_model, path):
    keras_model.save(path)
    try:
        torch_model = load_model(path)
    except ModelConversionError:
        return  # refusing a topology it cannot convert is safe
    x = np.random.default_rng(0).standard_normal((3, 4)).astype("float32")
    want = keras_model.predict(x, verbose=0)
    want = want[0] if isinstance(want, list) else want
    got = torch_model(torch.tensor(x)).detach().numpy()
    assert got.shape == want.shape and np.allclose(got, want, atol=1e-5), \
        "the served model computes another function than the Keras file"


def test_keras_shared_layer_is_not_silently_converted_once(keras, tmp_path):
    inp = keras.Input(shape=(4,))
    dense = keras.layers.Dense(4)
    _same_function_or_refused(keras.Model(inp, dense(dense(inp))), tmp_path / "shared.keras")


def test_keras_branching_graph_is_not_silently_chained(keras, tmp_path):
    inp = keras.Input(shape=(4,))
    h = keras.layers.Dense(4, name="h")(inp)
    side = keras.layers.Dense(4, name="side")(inp)  # reads the input, not h
    out = keras.layers.Dense(4, name="out")(h)
    _same_function_or_refused(keras.Model(inp, [side, out]), tmp_path / "branch.keras")


def test_keras_quantized_dense_is_named_not_indexerror(keras, tmp_path):
    inp = keras.Input(shape=(4,))
    model = keras.Model(inp, keras.layers.Dense(3)(inp))
    model.quantize("int8")
    model.save(tmp_path / "q.keras")
    with pytest.raises(ModelConversionError):
        load_model(tmp_path / "q.keras")


# ------------------------------------------------------------------ the cluster file (written by `veil serve`)


def _cluster():
    from veil.serving.cluster import Cluster, NetworkWorker

    return Cluster(NetworkWorker("127.0.0.1:4000"), NetworkWorker("127.0.0.1:4001"), NetworkWorker("127.0.0.1:4002"),
                   owner_token="owner-secret-" + "x" * 20, client_token="client-secret-" + "y" * 20)


def test_cluster_file_holds_no_owner_token_and_is_owner_only(tmp_path):
    path = _cluster().save(tmp_path / "cluster.json")
    text = path.read_text()
    assert "client-secret-" in text and "owner-secret-" not in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not (tmp_path / "cluster.json.tmp").exists()


def test_cluster_save_does_not_follow_a_planted_tmp_symlink(tmp_path):
    victim = tmp_path / "owner_notes.txt"
    victim.write_text("the owner's data\n")
    (tmp_path / "cluster.json.tmp").symlink_to(victim)
    try:
        _cluster().save(tmp_path / "cluster.json")
    except OSError:
        pass  # refusing is safe
    assert victim.read_text() == "the owner's data\n", "the owner's file was overwritten with the cluster file"


def test_cluster_save_is_owner_only_even_if_tmp_exists(tmp_path):
    tmp = tmp_path / "cluster.json.tmp"
    tmp.write_text("")
    tmp.chmod(0o644)
    path = _cluster().save(tmp_path / "cluster.json")
    assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, oct(path.stat().st_mode)


@pytest.mark.parametrize("content", ["{}", "not json", '{"parties": 5, "crypto_provider": []}'])
def test_client_reports_a_malformed_cluster_file_clearly(tmp_path, content):
    from veil.serving.client import ModelClient

    path = tmp_path / "cluster.json"
    path.write_text(content)
    with pytest.raises(ServingError):
        ModelClient(timeout=1).connect_to_model((1, 4), (1, 3), path, token="t" * 32)


# ------------------------------------------------------------------ `veil worker --dataset`


def test_worker_dataset_with_an_oversized_field_is_one_line(tmp_path):
    csv_path = tmp_path / "data.csv"
    csv_path.write_text('a,b\n1,"' + "9" * 200_000 + '"\n')
    env = {**os.environ, "VEIL_TRACEBACK": ""}
    # (in the shared runner, tests/cli_batch.py: as ``python -m veil.cli`` without another import of torch)
    proc = run_veil(["worker", "--id", "rt", "--port", "0", "--max-memory-mb", "0", "--dataset", f"d={csv_path}"],
                    cwd=ROOT, env=env, timeout=60)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode in (1, 2), proc.returncode
    assert "Traceback" not in proc.stderr, proc.stderr[-600:]
    assert len(lines) == 1 and lines[0].startswith("veil worker"), lines


# ------------------------------------------------------------------ R / numpy inputs


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_shape_or_count_is_a_serving_error(bad):
    from veil.serving.inputs import as_count, as_shape

    with pytest.raises(ServingError):
        as_shape([1, bad])
    with pytest.raises(ServingError):
        as_count(bad)


def test_complex_input_is_refused_not_truncated():
    from veil.serving.inputs import as_tensor

    with pytest.raises(ServingError):
        as_tensor(np.array([[1 + 2j, 3 - 1j]]))


def test_pt_round_trip_still_loads(tmp_path):
    """Control: a genuine save_model file loads with its weights (the refusals above are not blanket)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    path = save_model(model, tmp_path / "ok.pt", (1, 4))
    loaded = load_model(path)
    x = torch.randn(2, 4)
    assert torch.equal(loaded(x), model(x)) and loaded.veil_input_shape == (1, 4)
