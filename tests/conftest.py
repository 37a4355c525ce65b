"""Shared fixtures: thread pinning in one place, and one tiny trained digits run per test session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

# A 6-step U-Net on sklearn digits: enough for every command to run end to end, built once.
TINY_DIGITS = {
    "net": {"kind": "unet", "ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1, "mid_attention": False},
    "train": {"steps": 6, "batch_size": 16, "warmup": 2, "log_every": 2, "ckpt_every": 3},
}


class CountingModel(torch.nn.Module):
    """Wraps an eps-network and counts its calls: the NFE a sampler reports must equal ``calls``."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x, t):
        self.calls += 1
        return self.inner(x, t)


@pytest.fixture(scope="module")
def one_thread():
    """One torch and one BLAS thread for a module: its models are tiny, and on a shared 2-core
    machine two OpenMP threads stall each other (every small op waits for a descheduled thread,
    ~10-80x slower). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.json"
    path.write_text(json.dumps(TINY_DIGITS))
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_config) -> Path:
    """A trained digits run directory (written by the CLI, as a user would); treat it as read-only."""
    from difftime.cli import main

    out = tmp_path_factory.mktemp("runs") / "digits"
    assert main(["train", "--data", "digits", "--config", str(tiny_config), "--out", str(out), "--no-progress"]) == 0
    return out
