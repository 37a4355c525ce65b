"""The study across processes: one process at 2 threads against ``torchrun --nproc-per-node 2`` at
1 thread per rank, on the same reduced per-T digits study, and the scaling on N ranks projected
from a finished study's stage times.

The two studies run one after the other on an otherwise idle machine, each as the user would start
it. Compared: the total wall time, rank 0's wall clock per stage (``results.json: stage_wall_s``),
and whether the samples and the results are identical (they are at equal threads per process; the
thread count itself may change float rounding in the network's kernels, so across 2 and 1 threads
the check reports what it finds).

The projection reads a study directory (default docs/mnist-study): each stage's recorded work,
split into what the ranks share (training a network per T, prior fits, the likelihood's batches of
64, the sampling batches, the headline's draws) and what stays serial (the classifier metrics,
counted whole although their feature batches are shared too, and the prior headroom). The
headline's Inception FIDs share their feature batches (25 images) but not their bootstrap, and
the records do not split the two, so the projection is given twice: with the Inception stage
serial (a bound from above) and shared (from below). A stage of k units runs on min(N, k) ranks, so
time(N) = serial + sum(stage / min(N, k)); the speed-up is time(1) / time(N) (Amdahl's law per stage,
with no communication cost).

    python benchmarks/study_ranks.py [--project docs/mnist-study] [--skip-runs]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import HERE, row, standalone

from difftime.metrics.inception import InceptionFeatures

CONFIG = {
    "train": {"steps": 400},
    "study": {"mode": "per-T", "T_grid": [0.4, 1.0], "priors": ["standard", "gaussian"], "samplers": ["em"],
              "n_samples": 300, "sample_batch": 75, "n_likelihood": 256, "n_pfode": 128, "n_t": 16,
              "prior_steps": 200, "steps_per_unit_time": 50, "fixed_steps": 0, "frontier_samplers": ["dpm++2m"],
              "nfe_budgets": [6, 10], "headroom_n": 0, "fid_headline": 0, "bootstrap": 50},
}
LIKELIHOOD_BATCH = 64  # difftime.evaluation.likelihood_across_T's batch: the likelihood's unit of sharing
INCEPTION_BATCH = InceptionFeatures.BATCH_SIZE


def _study(out: Path, ranks: int, threads: int, cwd: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] if ranks > 1 else []
    cmd = [sys.executable, *launch, "-m", "difftime.cli", "study", "--preset", "digits", "--config", "config.json",
           "--out", str(out), "--no-progress", "--device", "cpu"]
    print(f"{ranks} process(es) x {threads} thread(s): {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True)
    return time.perf_counter() - start


def _identical(a: Path, b: Path) -> bool:
    for path in sorted((a / "samples").glob("*.npz")):
        with np.load(path) as x, np.load(b / "samples" / path.name) as y:
            if not np.array_equal(x["samples"], y["samples"]):
                return False
    with np.load(a / "likelihood.npz") as x, np.load(b / "likelihood.npz") as y:
        return all(np.array_equal(x[k], y[k]) for k in ("elbo", "nll"))


def project(study: Path, ranks: tuple[int, ...] = (1, 2, 4, 8, 16), sample_batch: int | None = None,
            inception_shared: bool = False) -> dict[str, Any]:
    """Each stage's work in ``study`` (seconds, as recorded), its unit count, and the projected
    time and speed-up on N ranks; ``sample_batch`` replaces the study's (a what-if: the sampling
    work is the same, in more units)."""
    r = json.loads((study / "results.json").read_text())
    s, cells = r["settings"], r["cells"]
    if sample_batch is not None:
        s = {**s, "sample_batch": sample_batch}
    headline = [json.loads(p.read_text()) for p in sorted((study / "fid").glob("*.json"))]
    fits = sum(1 for c in cells if c["prior_info"].get("fitted_now"))
    shared = {  # stage -> (work seconds, units the ranks share)
        "training": (sum(t["wall_s"] for t in r["training"].values()),
                     len(r["training"]) if s["mode"] == "per-T" else math.inf),  # one run: DDP over the batch
        "prior fits": (sum(c["wall"]["prior_fit_s"] for c in cells), max(fits, 1)),
        "likelihood": (r["likelihood_wall_s"], math.ceil(s["n_likelihood"] / LIKELIHOOD_BATCH)),
        "sampling": (sum(c["wall"]["sampling_s"] for c in cells),
                     math.ceil(s["n_samples"] / s.get("sample_batch", 500))),
        "headline draws": (sum(h["sample_wall_s"] for h in headline),
                           math.ceil(s["fid_headline"] / s.get("sample_batch", 500)) if headline else 1),
    }
    serial = {"quality metrics": sum(c["wall"]["quality_metrics_s"] for c in cells),
              "prior headroom": sum(h["model"]["wall_s"] for h in r.get("headroom") or [])}
    inception = (sum(h["fid_wall_s"] for h in headline), math.ceil(s["fid_headline"] / INCEPTION_BATCH))
    if inception_shared:
        shared["headline Inception FID"] = inception
    else:
        serial["headline Inception FID"] = inception[0]
    total_serial = sum(serial.values())

    def time_on(n: int) -> float:
        return total_serial + sum(work / min(n, units) for work, units in shared.values())

    one = time_on(1)
    return {"study": str(study.relative_to(HERE.parent)) if study.is_relative_to(HERE.parent) else str(study),
            "shared_s": {k: round(v[0], 1) for k, v in shared.items()},
            "units": {k: (v[1] if math.isfinite(v[1]) else "DDP") for k, v in shared.items()},
            "serial_s": {k: round(v, 1) for k, v in serial.items()}, "serial_fraction": total_serial / one,
            "sample_batch": s.get("sample_batch", 500),
            "projection": [{"ranks": n, "time_s": round(time_on(n), 1), "speedup": one / time_on(n)}
                           for n in ranks]}


def section(result: dict[str, Any]) -> str:
    """The BENCHMARKS.md section: the two runs stage by stage and the projections."""
    lines = ["## The study across processes", "",
             "From `benchmarks/study_ranks.py` (not part of `make bench`): a reduced per-T digits study run by one "
             "process at 2 threads and by `torchrun --nproc_per_node 2` at 1 thread per rank, one after the other.", ""]
    if "stage_wall_s" in result:
        a, b = result["stage_wall_s"]["1x2"], result["stage_wall_s"]["2x1"]
        lines += ["| stage | 1 process x 2 threads, s | 2 ranks x 1 thread, s | ratio |", "|---|---|---|---|"]
        lines += [f"| {k} | {a[k]:.1f} | {b[k]:.1f} | {b[k] / a[k]:.2f} |" for k in a if a[k] > 1.0]
        walls = result["command_wall_s"]
        lines += [f"| whole command | {walls['1x2']:.1f} | {walls['2x1']:.1f} | "
                  f"{walls['2x1'] / walls['1x2']:.2f} |", "",
                  f"Samples and per-example likelihoods bitwise identical across the two: {result['identical']} "
                  "(the thread count changes the kernels' float rounding, from the first training step on; at "
                  "equal threads per process the results are identical, tests/test_study_ranks.py).", ""]
    for key, what in (("projection", "Inception FID serial"), ("projection_inception_shared", "Inception features "
                      "shared"), ("projection_sample_batch_125", "Inception shared and study.sample_batch 125")):
        p = result[key]
        lines.append(f"Projected from `{p['study']}` ({what}; serial fraction {p['serial_fraction']:.2f}): "
                     + ", ".join(f"{q['ranks']} ranks {q['time_s'] / 60:.0f} min (x{q['speedup']:.2f})"
                                 for q in p["projection"]) + ".")
        lines.append("")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--project", type=Path, default=HERE.parent / "docs" / "mnist-study",
                        help="the study directory whose stage times are projected onto N ranks")
    parser.add_argument("--skip-runs", action="store_true", help="only the projection")


def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {
        "config": CONFIG, "projection": project(args.project),
        "projection_inception_shared": project(args.project, inception_shared=True),
        "projection_sample_batch_125": project(args.project, sample_batch=125, inception_shared=True), "rows": []}
    for key in ("projection", "projection_inception_shared", "projection_sample_batch_125"):
        for p in result[key]["projection"]:
            print(f"  {key}: {p['ranks']} ranks: {p['time_s'] / 60:.1f} min, speed-up {p['speedup']:.2f}")
    if args.skip_runs:
        return result
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        (cwd / "config.json").write_text(json.dumps(CONFIG))
        walls = {"1x2": _study(cwd / "one", 1, 2, cwd), "2x1": _study(cwd / "two", 2, 1, cwd)}
        stages = {name: json.loads((cwd / d / "results.json").read_text())["stage_wall_s"]
                  for name, d in (("1x2", "one"), ("2x1", "two"))}
        result.update(command_wall_s=walls, stage_wall_s=stages, identical=_identical(cwd / "one", cwd / "two"))
    result["rows"] = [row("study_ranks", "reduced digits per-T study, whole command", walls["2x1"], walls["1x2"],
                          "s", "torchrun 2 ranks x 1 thread", "1 process x 2 threads")]
    result["rows"] += [row("study_ranks", f"stage: {stage}", stages["2x1"][stage], stages["1x2"][stage], "s",
                           "torchrun 2 ranks x 1 thread", "1 process x 2 threads")
                       for stage in stages["1x2"] if stages["1x2"][stage] > 1.0]
    print(f"  samples and likelihoods identical across 1x2 and 2x1: {result['identical']}")
    return result


if __name__ == "__main__":
    standalone("study_ranks", add_arguments, run, __doc__)
