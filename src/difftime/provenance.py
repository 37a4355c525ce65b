"""What a result was computed with: the versions of difftime and the libraries its numerics depend on."""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version

from difftime import __version__


def versions(*extra: str) -> dict[str, str]:
    """Versions of difftime, python and the numeric libraries, plus any ``extra`` packages installed."""
    found = {"difftime": __version__, "python": sys.version.split()[0]}
    for package in ("torch", "numpy", "torchdiffeq", "zuko", "safetensors", "scipy", *extra):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found
