"""Sampler overhead: a sampler's wall time per network evaluation against one bare forward pass
of the same batch, measured alternately in one run. A ratio of 1.0 means the sampler costs
nothing beyond its network calls.

    python benchmarks/sampler_overhead.py [--run RUN] [--batch 256] [--steps 40]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import digits_run, row, standalone

from difftime.sampling import SAMPLERS, default_spacing, timesteps

NAMES = {"em": "Euler-Maruyama", "pc": "predictor-corrector", "euler": "PF-ODE Euler", "heun": "PF-ODE Heun"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", help="a trained run dir (default: the cached digits preset model)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)


def run(args: argparse.Namespace) -> dict:
    model_run = digits_run(args.run)
    model, sde = model_run.model, model_run.sde
    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn(args.batch, *model_run.shape, generator=gen)
    t = torch.full((args.batch,), 0.5)

    def bare_forward() -> float:
        with torch.no_grad():
            t0 = time.perf_counter()
            for _ in range(10):
                model(x_T, t)
            return (time.perf_counter() - t0) / 10

    bare_forward()
    results, rows = {}, []
    for name in NAMES:
        per_nfe, fwd = [], []
        for _ in range(args.repeats):
            before = bare_forward()
            t0 = time.perf_counter()
            ts = timesteps(sde, 1.0, sde.eps, args.steps, default_spacing(name))
            _, nfe = SAMPLERS[name](model, sde, x_T, ts, generator=gen)
            per_nfe.append((time.perf_counter() - t0) / nfe)
            fwd.append((before + bare_forward()) / 2)  # the forward pass timed on both sides of the sampler
        ours, bare = statistics.median(per_nfe), statistics.median(fwd)
        results[name] = {"nfe": nfe, "s_per_nfe": ours, "forward_s": bare, "overhead_ratio": ours / bare,
                         "batch": args.batch, "steps": args.steps}
        rows.append(row("sampler overhead", f"{NAMES[name]}, {nfe} NFE, batch {args.batch}", ours * 1e3, bare * 1e3,
                        "ms per network evaluation", f"difftime {name}", "bare forward pass"))
    return {"run": str(model_run.path), "results": results, "rows": rows}


if __name__ == "__main__":
    standalone("sampler_overhead", add_arguments, run, __doc__.splitlines()[0])
