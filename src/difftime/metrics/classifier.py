"""A small CNN trained per dataset, whose penultimate layer is the cheap FD feature space.

One configurable architecture serves 8x8 digits and 28x28 MNIST / Fashion-MNIST: a stack of
3x3 conv -> ReLU -> 2x2 max-pool blocks (floor pooling: 28 -> 14 -> 7 -> 3, 8 -> 4 -> 2 -> 1),
a flatten, one hidden ``Linear -> ReLU`` layer (the features) and a 10-way linear head.

Input mapping: a raw level k of an image with L levels becomes (k / (L - 1) - 0.5) / 0.5, i.e.
[-1, 1] with the brightest level at exactly 1, for any L.

Weights are trained by ``scripts/train_classifier.py`` with a fixed seed and committed as
``weights/<dataset>.safetensors`` beside ``weights/<dataset>.json``; the JSON records the
architecture, the seed, the test accuracy, the command and the sha256 of the weights, and
loading refuses weights whose sha256, keys, shapes or values do not match it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from difftime.errors import DifftimeError
from difftime.io import load_state_dict_strict, load_tensors, sha256_file

__all__ = [
    "CLASSIFIER_DATASETS",
    "ClassifierFeatures",
    "FeatureCNN",
    "classifier_accuracy",
    "classifier_config",
    "load_classifier",
    "weights_dir",
]

# Datasets with committed weights (spec -> input geometry and level count).
CLASSIFIER_DATASETS: dict[str, dict[str, int]] = {
    "digits": {"height": 8, "width": 8, "levels": 17},
    "mnist": {"height": 28, "width": 28, "levels": 256},
    "fashion-mnist": {"height": 28, "width": 28, "levels": 256},
}

_DEFAULT_ARCH = {"in_channels": 1, "channels": [16, 32, 32], "hidden": 128, "n_classes": 10}
_CONFIG_KEYS = {"in_channels", "height", "width", "levels", "channels", "hidden", "n_classes"}


def weights_dir() -> Path:
    return Path(__file__).resolve().parent / "weights"


def classifier_config(dataset: str, **overrides: Any) -> dict[str, Any]:
    """The architecture config for ``dataset`` (one of ``CLASSIFIER_DATASETS``)."""
    if dataset not in CLASSIFIER_DATASETS:
        raise DifftimeError(
            f"no classifier architecture for {dataset!r}; expected one of {', '.join(CLASSIFIER_DATASETS)}"
        )
    cfg = {**_DEFAULT_ARCH, **CLASSIFIER_DATASETS[dataset], **overrides}
    cfg["channels"] = [int(c) for c in cfg["channels"]]
    return cfg


def _check_config(cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(cfg, Mapping) or set(cfg) != _CONFIG_KEYS:
        got = sorted(map(str, cfg)) if isinstance(cfg, Mapping) else type(cfg).__name__
        raise DifftimeError(f"{where}: architecture config has keys {got}; expected {sorted(_CONFIG_KEYS)}")
    out = dict(cfg)
    ints = ("in_channels", "height", "width", "levels", "hidden", "n_classes")
    ok = all(isinstance(out[k], int) and not isinstance(out[k], bool) and out[k] >= 1 for k in ints)
    chans = out["channels"]
    ok = ok and isinstance(chans, list) and len(chans) >= 1
    ok = ok and all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in chans)
    if not ok or out["levels"] < 2:
        raise DifftimeError(f"{where}: malformed architecture config {dict(cfg)}; expected positive integers")
    return out


class FeatureCNN(nn.Module):
    """conv3x3-ReLU-maxpool blocks, then Linear-ReLU (features) and a linear head.

    Takes model-ready float input (N, C, H, W) in [-1, 1]; see :class:`ClassifierFeatures` for
    the version that takes raw integer levels.
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        cfg = _check_config(config, "FeatureCNN")
        self.config = cfg
        blocks: list[nn.Module] = []
        c_in, h, w = cfg["in_channels"], cfg["height"], cfg["width"]
        for c in cfg["channels"]:
            if h < 2 or w < 2:
                raise DifftimeError(
                    f"FeatureCNN: {len(cfg['channels'])} pooling blocks shrink a {cfg['height']}x{cfg['width']} "
                    "input below 1x1; expected fewer channels entries"
                )
            blocks += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c_in, h, w = c, h // 2, w // 2
        self.conv = nn.Sequential(*blocks)
        self.fc = nn.Linear(c_in * h * w, cfg["hidden"])
        self.head = nn.Linear(cfg["hidden"], cfg["n_classes"])

    @property
    def feature_dim(self) -> int:
        return int(self.config["hidden"])

    def features(self, x: Tensor) -> Tensor:
        return torch.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def levels_to_input(images: Tensor, levels: int) -> Tensor:
    """Raw levels 0..L-1 -> float32 in [-1, 1] (k / (L - 1) rescaled)."""
    return images.to(torch.float32) * (2.0 / (levels - 1)) - 1.0


class ClassifierFeatures(nn.Module):
    """Feature extractor on raw data-space images: (N, 1, H, W) integer levels -> (N, hidden).

    ``name`` and ``sha256`` (of the weights file) identify it in results and in cache keys.
    """

    def __init__(self, net: FeatureCNN, *, name: str, sha256: str, meta: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.net = net.eval()
        self.name = name
        self.sha256 = sha256
        self.meta = dict(meta or {})
        self.levels = int(net.config["levels"])
        self.feature_dim = net.feature_dim
        self.input_shape = (net.config["in_channels"], net.config["height"], net.config["width"])

    def _prepare(self, images: Tensor) -> Tensor:
        if tuple(images.shape[1:]) != self.input_shape:
            raise DifftimeError(
                f"{self.name}: images have shape {tuple(images.shape)}; "
                f"expected (N, {', '.join(map(str, self.input_shape))})"
            )
        return levels_to_input(images, self.levels)

    @torch.inference_mode()
    def forward(self, images: Tensor) -> Tensor:
        return self.net.features(self._prepare(images))

    @torch.inference_mode()
    def logits(self, images: Tensor) -> Tensor:
        return self.net(self._prepare(images))

    BATCH_SIZE = 1000  # images per network call; also the unit that torchrun's ranks share (metrics.quality)

    def extract(self, images: Tensor, batch_size: int = BATCH_SIZE, progress: bool = True,
                desc: str = "") -> np.ndarray:
        """Features of all ``images`` in batches, as float64 numpy (N, feature_dim)."""
        n = images.shape[0]
        out = np.empty((n, self.feature_dim), dtype=np.float64)
        starts = range(0, n, batch_size)
        bar = tqdm(starts, desc=desc or f"{self.name} features", disable=not progress, unit="batch",
                   total=math.ceil(n / batch_size))
        for s in bar:
            out[s:s + batch_size] = self(images[s:s + batch_size]).numpy()
        return out


def _strict_load(net: nn.Module, tensors: dict[str, Tensor], source: Path) -> None:
    load_state_dict_strict(net, tensors, source, described_by="its JSON sidecar")


_LOADED: dict[tuple[str, str], ClassifierFeatures] = {}


def load_classifier(dataset: str, directory: str | Path | None = None) -> ClassifierFeatures:
    """The committed classifier for ``dataset``, loaded strictly and sha256-checked."""
    directory = Path(directory) if directory is not None else weights_dir()
    meta_path = directory / f"{dataset}.json"
    weights_path = directory / f"{dataset}.safetensors"
    if not meta_path.is_file() or not weights_path.is_file():
        have = sorted(p.stem for p in directory.glob("*.json")) if directory.is_dir() else []
        raise DifftimeError(
            f"no trained classifier for {dataset!r} in {directory} (have: {', '.join(have) or 'none'}); "
            f"train one with `python scripts/train_classifier.py {dataset}`"
        )
    weights_sha = sha256_file(weights_path)
    key = (str(weights_path.resolve()), weights_sha + sha256_file(meta_path))
    if key in _LOADED:
        return _LOADED[key]
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DifftimeError(f"{meta_path} is not readable JSON: {exc}".replace("\n", " ")) from None
    if not isinstance(meta, dict) or not {"sha256", "config", "dataset"} <= set(meta):
        raise DifftimeError(f"{meta_path} lacks the keys sha256, config, dataset; expected a classifier sidecar")
    if meta["dataset"] != dataset:
        raise DifftimeError(f"{meta_path} describes a classifier for {meta['dataset']!r}; expected {dataset!r}")
    if weights_sha != meta["sha256"]:
        raise DifftimeError(
            f"{weights_path} has sha256 {weights_sha[:12]}..., but {meta_path.name} records "
            f"{str(meta['sha256'])[:12]}...: the weights are corrupt or from another training run"
        )
    net = FeatureCNN(meta["config"])
    _strict_load(net, load_tensors(weights_path), weights_path)
    extractor = ClassifierFeatures(net, name=f"classifier:{dataset}", sha256=weights_sha, meta=meta)
    _LOADED[key] = extractor
    return extractor


def classifier_accuracy(extractor: ClassifierFeatures, images: Tensor, labels: Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of the classifier head on raw-level ``images``."""
    correct = 0
    for s in range(0, images.shape[0], batch_size):
        pred = extractor.logits(images[s:s + batch_size]).argmax(1)
        correct += int((pred == labels[s:s + batch_size]).sum())
    return correct / images.shape[0]
