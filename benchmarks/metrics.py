"""Sample-quality metrics: feature throughput and the wall time of 10k-vs-10k distances.

Measures, on MNIST:
  * Inception-v3 (FID) features per second, over ``--inception-n`` images, at 1 and at the
    default number of torch threads;
  * classifier features per second over 10,000 images;
  * the wall time of a 10k-vs-10k classifier FD through ``quality_metrics`` with a cold
    reference cache (both feature sets extracted) and with a warm one, plus KID and PR;
  * the 10k-vs-10k Inception FID: the FD algebra on 2048-d features is timed for real (on
    random features), the feature extraction of 20,000 images is EXTRAPOLATED from the
    measured throughput unless ``--full-fid`` is given.

The table rows set the cheap metric (classifier FD) against the standard one (Inception FID).

    python benchmarks/metrics.py [--inception-n 100] [--full-fid]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch
from common import row, standalone
from threadpoolctl import threadpool_limits

from difftime.data import load_data
from difftime.metrics import quality_metrics
from difftime.metrics.classifier import load_classifier
from difftime.metrics.features import (
    feature_statistics,
    frechet_distance_features,
    kernel_inception_distance,
    precision_recall,
)
from difftime.metrics.inception import InceptionFeatures


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def inception_throughput(images: torch.Tensor, threads: int) -> dict:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ex = InceptionFeatures()
        ex(images[:2])  # warm-up: first call builds the TorchScript graph executor
        _, dt = timed(lambda: ex.extract(images, batch_size=25, progress=False))
    finally:
        torch.set_num_threads(before)
    return {"threads": threads, "n_images": len(images), "seconds": round(dt, 2),
            "images_per_second": round(len(images) / dt, 2)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--inception-n", type=int, default=100, help="images to time Inception on")
    parser.add_argument("--full-fid", action="store_true", help="run the 10k-vs-10k Inception FID for real")


def run(args: argparse.Namespace) -> dict:
    os.environ["DIFFTIME_CACHE"] = tempfile.mkdtemp(prefix="difftime-bench-cache-")  # cold cache
    default_threads = torch.get_num_threads()
    mnist = load_data("mnist")
    samples = mnist.train[:10000]
    res: dict = {"default_threads": default_threads, "cpu_count": os.cpu_count(),
                 "load_average_at_start": list(os.getloadavg())}

    # --- Inception throughput
    inc_images = mnist.test[: args.inception_n]
    res["inception_features"] = [inception_throughput(inc_images, t) for t in sorted({1, default_threads})]
    for r in res["inception_features"]:
        print(f"inception: {r['images_per_second']} img/s at {r['threads']} thread(s) ({r['n_images']} images)")
    best_ips = max(r["images_per_second"] for r in res["inception_features"])

    # --- classifier throughput
    ex = load_classifier("mnist")
    ex(samples[:100])
    res["classifier_features"] = []
    for threads in sorted({1, default_threads}):
        torch.set_num_threads(threads)
        feats, dt = timed(lambda: ex.extract(samples, progress=False))
        res["classifier_features"].append({"threads": threads, "n_images": len(samples), "seconds": round(dt, 3),
                                           "images_per_second": round(len(samples) / dt)})
        print(f"classifier: {len(samples) / dt:.0f} img/s at {threads} thread(s)")
    torch.set_num_threads(default_threads)

    # --- classifier FD / KID / PR, 10k vs 10k, through the public entry point
    cold, dt_cold = timed(lambda: quality_metrics(samples, "mnist", ["fd"], progress=False))
    warm, dt_warm = timed(lambda: quality_metrics(samples, "mnist", ["fd"], progress=False))
    assert not cold["reference_cache"]["classifier"]["hit"] and warm["reference_cache"]["classifier"]["hit"]
    ref = ex.extract(mnist.test, progress=False)
    _, dt_fd_only = timed(lambda: frechet_distance_features(feats, ref))
    _, dt_kid = timed(lambda: kernel_inception_distance(feats, ref))
    _, dt_pr = timed(lambda: precision_recall(ref, feats))
    res["classifier_fd_10k_vs_10k"] = {
        "fd": cold["fd"]["value"], "n_samples": cold["n_samples"], "n_reference": cold["n_reference"],
        "reference_split": cold["reference_split"],
        "wall_seconds_cold_cache": round(dt_cold, 2), "wall_seconds_warm_cache": round(dt_warm, 2),
        "fd_algebra_seconds": round(dt_fd_only, 3), "kid_seconds": round(dt_kid, 2), "pr_seconds": round(dt_pr, 2),
    }
    print(f"classifier FD 10k vs 10k = {cold['fd']['value']:.3f}: {dt_cold:.2f}s cold cache, {dt_warm:.2f}s warm; "
          f"KID {dt_kid:.1f}s, PR {dt_pr:.1f}s")

    # --- Inception FID, 10k vs 10k
    rng = np.random.default_rng(0)
    fa = np.maximum(rng.standard_normal((10000, 2048)) * 0.5 + 0.3, 0.0)  # pool3-like: ReLU'd, 2048-d
    fb = np.maximum(rng.standard_normal((10000, 2048)) * 0.5 + 0.35, 0.0)
    stats_b, dt_stats = timed(lambda: feature_statistics(fb))
    algebra = {}
    for blas_threads in (1, None):  # None: numpy's default BLAS threads (contention can hurt a lot here)
        with threadpool_limits(limits=blas_threads):
            _, algebra["1" if blas_threads else "default"] = timed(
                lambda: frechet_distance_features(fa, fb, stats2=stats_b))
    dt_algebra = min(algebra.values())
    fid: dict = {"fd_algebra_seconds_2048d_10k_by_blas_threads": {k: round(v, 2) for k, v in algebra.items()},
                 "covariance_seconds_2048d_10k": round(dt_stats, 2)}
    print(f"FD algebra, 10k x 2048 features: {algebra}")
    if args.full_fid:
        run, dt = timed(lambda: quality_metrics(samples, "mnist", ["fid"], progress=True))
        fid.update({"measured": True, "wall_seconds": round(dt, 1), "fid": run["fid"]["value"]})
    else:
        extract = 20000 / best_ips
        fid.update({
            "measured": False,
            "extrapolated_wall_seconds": round(extract + dt_stats + dt_algebra),
            "basis": f"20,000 images at {best_ips} img/s (the faster thread setting), measured on "
                     f"{args.inception_n} MNIST images, plus the measured covariance and FD algebra on 10k x 2048 "
                     "features (the faster BLAS setting)",
            "extrapolated_wall_seconds_warm_reference_cache": round(10000 / best_ips + dt_stats + dt_algebra),
        })
        print(f"inception FID 10k vs 10k: ~{fid['extrapolated_wall_seconds'] / 60:.0f} min (extrapolated from "
              f"{args.inception_n} images at {best_ips} img/s)")
    res["inception_fid_10k_vs_10k"] = fid
    res["load_average_at_end"] = list(os.getloadavg())
    best_classifier = max(r["images_per_second"] for r in res["classifier_features"])
    fid_s = fid["wall_seconds"] if args.full_fid else fid["extrapolated_wall_seconds"]
    how = "measured" if args.full_fid else f"extrapolated from {args.inception_n} images"
    rows = [
        row("metrics", "feature extraction, per 1,000 MNIST images", 1000 / best_classifier, 1000 / best_ips, "s",
            "classifier (FD features)", f"Inception-v3 (FID features, measured on {args.inception_n})"),
        row("metrics", "10k-vs-10k distance, cold reference cache", dt_cold, fid_s, "s", "classifier FD",
            f"Inception FID ({how})"),
    ]
    return {"results": res, "rows": rows}


if __name__ == "__main__":
    standalone("metrics", add_arguments, run, __doc__.splitlines()[0])
