"""The public API at the package root, and what importing difftime must not do."""

from __future__ import annotations

import os
import subprocess
import sys

import difftime as dt

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_the_root_exports_the_public_api():
    for name in ("load_run", "sample", "elbo", "ode_log_likelihood", "fit_prior", "quality_metrics", "Prior",
                 "StandardPrior", "GaussianPrior", "FlowPrior", "GlowPrior", "SAMPLERS", "VPSDE", "train_run"):
        assert callable(getattr(dt, name)) or isinstance(getattr(dt, name), dict), name
    assert set(dt.__all__) <= set(dir(dt))


def test_importing_every_module_changes_neither_the_backend_nor_the_umask():
    """A notebook's matplotlib backend and the process umask are the user's: difftime never switches them."""
    code = (
        "import os, pkgutil, importlib, matplotlib\n"
        "matplotlib.use('svg'); os.umask(0o027)\n"
        "import difftime\n"
        "for m in pkgutil.walk_packages(difftime.__path__, 'difftime.'):\n"
        "    if m.name != 'difftime.__main__': importlib.import_module(m.name)\n"
        "import difftime.study.figures, difftime.plots\n"
        "mask = os.umask(0); print(matplotlib.get_backend(), oct(mask))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["svg", "0o27"]
