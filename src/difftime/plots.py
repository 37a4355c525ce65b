"""Figures, built as ``matplotlib.figure.Figure`` (no pyplot, so importing difftime never switches
a notebook's backend) and written atomically as PNG."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from difftime.errors import DifftimeError
from difftime.io import atomic_write_bytes


def image_grid(images: np.ndarray, ncols: int | None = None) -> np.ndarray:
    """Tile (N, C, H, W) images into one (rows*H, cols*W[, C]) array with 1-pixel gutters."""
    n, c, h, w = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = np.zeros((nrows * (h + 1) + 1, ncols * (w + 1) + 1, c), dtype=images.dtype)
    for i, img in enumerate(images):
        r, col = divmod(i, ncols)
        grid[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + col * (w + 1): 1 + col * (w + 1) + w] = img.transpose(1, 2, 0)
    return grid[..., 0] if c == 1 else grid


def save_figure(fig: Figure, path: str | Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def save_samples_figure(samples: np.ndarray, path: str | Path, title: str = "") -> None:
    """A grid for images (N, C, H, W), a scatter plot for 2-D points (N, 2)."""
    if samples.ndim == 4:
        grid = image_grid(samples)
        fig = Figure(figsize=(6, 6))
        ax = fig.subplots()
        ax.imshow(grid, cmap="gray" if grid.ndim == 2 else None, interpolation="nearest")
        ax.axis("off")
    elif samples.ndim == 2 and samples.shape[1] == 2:
        fig = Figure(figsize=(5, 5))
        ax = fig.subplots()
        ax.scatter(samples[:, 0], samples[:, 1], s=2, alpha=0.5)
        ax.set_aspect("equal")
    else:
        raise DifftimeError(f"cannot plot samples of shape {samples.shape}: need images or 2-D points")
    if title:
        ax.set_title(title)
    save_figure(fig, path)
