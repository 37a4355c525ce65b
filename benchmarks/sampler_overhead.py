"""Sampler overhead: wall time / (NFE x one bare forward pass of the same batch), in one run.

A ratio of 1.0 means the sampler costs nothing beyond its network calls.

    python benchmarks/sampler_overhead.py [--run RUN] [--batch 256] [--steps 40]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import digits_run, write_result

from difftime.sampling import SAMPLERS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a trained run dir (default: train digits briefly)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/sampler_overhead.json")
    args = parser.parse_args()
    run = digits_run(args.run)
    model, sde = run.model, run.sde
    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn(args.batch, *run.shape, generator=gen)
    t = torch.full((args.batch,), 0.5)

    def bare_forward() -> float:
        with torch.no_grad():
            t0 = time.perf_counter()
            for _ in range(10):
                model(x_T, t)
            return (time.perf_counter() - t0) / 10

    bare_forward()
    results = {}
    for name in ("em", "pc", "euler", "heun"):
        ratios, walls, fwd = [], [], []
        for _ in range(args.repeats):
            f = bare_forward()
            t0 = time.perf_counter()
            _, nfe = SAMPLERS[name](model, sde, x_T, 1.0, sde.eps, args.steps, generator=gen)
            wall = time.perf_counter() - t0
            f = (f + bare_forward()) / 2
            ratios.append(wall / (nfe * f))
            walls.append(wall)
            fwd.append(f)
        ratio = statistics.median(ratios)
        results[name] = {"nfe": nfe, "wall_s": statistics.median(walls), "forward_s": statistics.median(fwd),
                         "overhead_ratio": ratio, "batch": args.batch, "steps": args.steps}
        print(f"{name:6s} NFE {nfe:4d}  wall {statistics.median(walls):.3f} s  "
              f"bare forward {1e3 * statistics.median(fwd):.2f} ms  ratio {ratio:.3f}", flush=True)
    write_result(args.out, "sampler_overhead", results)


if __name__ == "__main__":
    main()
