"""Which sampler, grid and end time should `difftime sample` default to? Measured, paired by seed.

For one trained run and a list of NFE budgets, every configuration samples n images from the same
x_T draws (the same seeds; the standard prior at T = train.T) and is scored by the classifier FD
against a real split. Differences to the chosen default are paired per seed, with a 95% t
interval over seeds. The "old defaults" row is what `difftime sample` used before these defaults were measured:
Euler-Maruyama on the uniform-in-t grid down to the training eps (1e-5).

    python benchmarks/sampling_defaults.py --run RUN [--weights ema] [--nfe 10,20] [--n 1000] [--seeds 4]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from difftime.evaluation import draw_samples, resolve_prior
from difftime.io import atomic_write_bytes, save_json
from difftime.metrics import quality_metrics
from difftime.run import load_run

# name -> (sampler, spacing, eps (None: the run's training eps, sde.eps), NFE -> steps)
CONFIGS = {
    "old defaults: em, time grid, eps 1e-5": ("em", "time", None, lambda nfe: nfe - 1),
    "heun, time grid, eps 1e-5": ("heun", "time", None, lambda nfe: (nfe - 1) // 2),
    "dpm++2m, logsnr, eps 1e-5": ("dpm++2m", "logsnr", 1e-5, lambda nfe: nfe - 1),
    "dpm++2m, logsnr, eps 1e-4": ("dpm++2m", "logsnr", 1e-4, lambda nfe: nfe - 1),
    "dpm++2m, logsnr, eps 1e-3": ("dpm++2m", "logsnr", 1e-3, lambda nfe: nfe - 1),
    "dpm++2m, logsnr, eps 1e-2": ("dpm++2m", "logsnr", 1e-2, lambda nfe: nfe - 1),
    "dpm++2m, time grid, eps 1e-3": ("dpm++2m", "time", 1e-3, lambda nfe: nfe - 1),
    "dpm++3m, logsnr, eps 1e-3": ("dpm++3m", "logsnr", 1e-3, lambda nfe: nfe - 1),
    "ipndm, logsnr, eps 1e-3": ("ipndm", "logsnr", 1e-3, lambda nfe: nfe - 1),
    "ddim, logsnr, eps 1e-3": ("ddim", "logsnr", 1e-3, lambda nfe: nfe - 1),
}


def t_interval(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% t interval over seeds."""
    from scipy.stats import t as student

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, student.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--weights", default="ema", choices=("ema", "model"))
    p.add_argument("--nfe", default="10,20")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--reference", default="train", choices=("train", "test"))
    p.add_argument("--default", default="dpm++2m, logsnr, eps 1e-3", help="the row differences are taken against")
    p.add_argument("--only", default="", help="comma-separated substrings of config names to keep")
    p.add_argument("--out", required=True, help="a folder: results.json and results.md")
    args = p.parse_args()
    run = load_run(args.run, weights=args.weights)
    prior = resolve_prior(run, "standard", run.T_train)
    spec = run.config["resolved"]["data"]
    names = [k for k in CONFIGS if not args.only or any(s in k for s in args.only.split(",")) or k == args.default]
    rows = []
    start_all = time.perf_counter()
    for nfe in [int(v) for v in args.nfe.split(",")]:
        fds: dict[str, list[float]] = {}
        for name in names:
            sampler, spacing, eps, steps_of = CONFIGS[name]
            steps = steps_of(nfe)
            fds[name], got = [], None
            for seed in range(args.seeds):
                x, got, _ = draw_samples(run, prior, run.T_train, sampler, steps, args.n, seed=seed,
                                         eps=eps if eps is not None else run.sde.eps, spacing=spacing)
                q = quality_metrics(x, spec, ("fd",), reference_split=args.reference, seed=seed, progress=False)
                fds[name].append(q["fd"]["value"])
            mean, half = t_interval(fds[name])
            rows.append({"nfe_budget": nfe, "config": name, "sampler": sampler, "spacing": spacing,
                         "eps": eps if eps is not None else run.sde.eps, "steps": steps, "nfe": got,
                         "fd": mean, "fd_ci95": half, "fd_per_seed": fds[name]})
            print(f"NFE {nfe:3d} {name:40s} FD {mean:9.3f} +- {half:.3f} (nfe {got})", flush=True)
        base = fds[args.default]
        for r in rows:
            if r["nfe_budget"] == nfe:
                diff = [a - b for a, b in zip(fds[r["config"]], base, strict=True)]
                mean, half = t_interval(diff)
                r["fd_minus_default"], r["fd_minus_default_ci95"] = mean, half
    out = Path(args.out)
    meta = {"run": str(args.run), "weights": args.weights, "data": spec, "n": args.n, "seeds": args.seeds,
            "reference_split": args.reference, "prior": "standard", "T": run.T_train, "default": args.default,
            "wall_s": time.perf_counter() - start_all, "torch_threads": torch.get_num_threads()}
    save_json(out / "results.json", {**meta, "rows": rows})
    lines = [f"Classifier FD of {args.n} samples against the {args.reference} split of `{spec}`, mean +- 95% t "
             f"interval over {args.seeds} seeds (the same x_T per seed for every row); run `{args.run}` "
             f"({args.weights} weights, step {run.step}), standard prior at T = {run.T_train:g}. "
             f"The last column is paired per seed against `{args.default}`.", "",
             "| NFE budget | configuration | NFE | FD | FD - default |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['nfe_budget']} | {r['config']} | {r['nfe']} | {r['fd']:.2f} +- {r['fd_ci95']:.2f} | "
                     f"{r['fd_minus_default']:+.2f} +- {r['fd_minus_default_ci95']:.2f} |")
    atomic_write_bytes(out / "results.md", ("\n".join(lines) + "\n").encode())
    print(json.dumps({**meta, "out": str(out)}))


if __name__ == "__main__":
    main()
