"""`torchrun ... difftime study`: the stages shared among ranks give the one-process study.

A reduced per-T digits study (two networks, each trained by one rank; standard and gaussian
priors, the gaussian fits dealt to the ranks; em samples in batches of 16, so the ranks replay
each other's noise; dpm++2m on gaussian-optimized grids; the likelihood in three batches; the
headline) runs in one process and under ``torchrun --nproc-per-node 2``, both at one thread per
process. Every sample and every number in results.json must be identical: each figure is computed
by the same code on the same batch whichever rank owns it, and the gathered per-example values are
reduced in the one-process order. Then a 2-rank run is killed mid-study and finished by one process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

CONFIG = {
    "net": {"ch": 8, "ch_mult": [1], "groups": 4, "mid_attention": False},
    "train": {"steps": 20, "batch_size": 32, "bf16": False, "ckpt_every": 10},
    "study": {"mode": "per-T", "T_grid": [0.4, 1.0], "priors": ["standard", "gaussian"], "samplers": ["em"],
              "n_samples": 48, "sample_batch": 16, "n_likelihood": 130, "n_pfode": 70, "n_t": 2, "n_prior": 2,
              "prior_steps": 20, "steps_per_unit_time": 10, "fixed_steps": 0, "tol": 1e-3,
              "frontier_samplers": ["dpm++2m"], "nfe_budgets": [4], "frontier_grids": ["gaussian"],
              "headroom_n": 0, "fid_headline": 32, "bootstrap": 20},
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def study(out: Path, ranks: int, cwd: Path, wait: bool = True) -> subprocess.Popen | subprocess.CompletedProcess:
    args = ["-m", "difftime.cli", "study", "--preset", "digits", "--config", "config.json", "--out", str(out),
            "--no-progress", "--device", "cpu"]
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] if ranks > 1 else []
    cmd = [sys.executable, *launch, *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    done = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


TIMES = ("seconds", "versions", "processes", "resumed_at_step")  # and every *_s and *wall* key


def numbers(value, out: Path):
    """results.json without its wall times (and the cost claim's text, which quotes them) and with
    the study's own path replaced."""
    if isinstance(value, dict):
        if value.get("name") == "cost_proportional_to_T":
            value = {k: v for k, v in value.items() if k != "text"}
        return {k.replace(str(out), "OUT"): numbers(v, out) for k, v in value.items()
                if not (k.endswith("_s") or "wall" in k or k in TIMES)}
    if isinstance(value, list):
        return [numbers(v, out) for v in value]
    if isinstance(value, str):
        return value.replace(str(out), "OUT")
    return value


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("ranks")
    (tmp / "config.json").write_text(json.dumps(CONFIG))
    study(tmp / "one", 1, tmp)
    two = study(tmp / "two", 2, tmp)
    return tmp / "one", tmp / "two", two


def test_two_ranks_give_the_one_process_study_bitwise(studies):
    one, two, done = studies
    assert json.loads(done.stdout.strip().splitlines()[-1])["processes"] == 2  # one line: rank 0 prints
    samples = sorted(p.name for p in (one / "samples").glob("*.npz"))
    assert len(samples) == 4
    for name in samples:
        with np.load(one / "samples" / name) as a, np.load(two / "samples" / name) as b:
            assert a["samples"].shape == (48, 1, 8, 8)
            np.testing.assert_array_equal(a["samples"], b["samples"])
    with np.load(one / "likelihood.npz") as a, np.load(two / "likelihood.npz") as b:
        for key in ("elbo", "nll"):
            np.testing.assert_array_equal(a[key], b[key])
    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert r1["processes"] == 1 and r2["processes"] == 2
    assert set(r2["stage_wall_s"]) >= {"training", "prior fits", "likelihood", "cells (sampling and quality metrics)"}
    assert numbers(r1, one) == numbers(r2, two)
    # Each rank trained one network alone: the weights equal the one-process ones.
    for T in ("T0.4", "T1"):
        weights = [(d / "runs" / T / "ema.safetensors").read_bytes() for d in (one, two)]
        assert weights[0] == weights[1]
    assert r1["fid_headline"]["rows"] and all(c["sampling"] for c in r1["cells"])


def _rank_pids(root: int) -> list[int]:
    """The descendants of ``root`` with LOCAL_RANK=1 in their environment: torchrun's rank 1."""
    parents = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit():  # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    family, grew = {root}, True
    while grew:
        grown = family | {pid for pid, parent in parents.items() if parent in family}
        grew, family = grown != family, grown
    found = []
    for pid in family - {root}:
        try:
            if b"LOCAL_RANK=1\0" in (Path("/proc") / str(pid) / "environ").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks through /proc")
def test_a_rank_killed_mid_study_and_a_one_process_rerun_give_the_uninterrupted_study(studies, tmp_path):
    one, _, _ = studies
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    out = tmp_path / "killed"
    proc = study(out, 2, tmp_path, wait=False)
    deadline = time.monotonic() + 600
    while not (out / "likelihood.json").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the study ended before the kill"
    victims = _rank_pids(proc.pid)
    assert victims, "no rank 1 found"
    os.kill(victims[0], signal.SIGKILL)
    proc.wait(timeout=120)
    assert proc.returncode != 0
    assert not (out / "results.json").exists()
    study(out, 1, tmp_path)  # the same command, another world size
    resumed, uninterrupted = (numbers(json.loads((d / "results.json").read_text()), d) for d in (out, one))
    for r in (resumed, uninterrupted):  # which invocation fitted a prior is provenance, not a result
        for cell in r["cells"]:
            cell.pop("prior_info")
    assert resumed == uninterrupted
