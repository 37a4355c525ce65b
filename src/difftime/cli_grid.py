"""``difftime grid``: optimize a sampler's time grid for a run, a start T, a prior and an NFE budget
(difftime.gridopt), and write it as a JSON file that ``difftime sample --ts`` reads."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from difftime.errors import DifftimeError


def add_grid_parser(sub: Any, positive_float: Any, positive_int: Any, nonnegative_int: Any,
                    add_device_argument: Any) -> None:
    from difftime.gridopt import CALLS_PER_STEP, GRID_METHODS

    p = sub.add_parser("grid", help="optimize a sampler's time grid for a start T, a prior and an NFE budget")
    p.add_argument("run", help="run directory")
    p.add_argument("--T", type=positive_float, help="horizon to start from (default: training T)")
    p.add_argument("--prior", default="standard", help="standard, or a fitted family: gaussian, flow, glow")
    p.add_argument("--sampler", default="dpm++2m", help=f"one of {', '.join(CALLS_PER_STEP)}")
    p.add_argument("--nfe", type=positive_int, required=True, help="network calls per sample, Tweedie included")
    p.add_argument("--method", choices=GRID_METHODS, default="gits",
                   help="gits: from a teacher of the model (minutes); gaussian: model-free (seconds)")
    p.add_argument("--eps", type=positive_float, help="sampling end time (default max(0.001, the run's eps))")
    p.add_argument("--n", type=positive_int, default=128, help="gits: teacher trajectories")
    p.add_argument("--fine-steps", type=positive_int, default=48, help="gits: nodes of the teacher grid")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="gits: the teacher's network")
    p.add_argument("--no-denoise", action="store_true", help="a grid for runs without the final Tweedie step")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--weights", choices=["ema", "model"], default="ema")
    p.add_argument("--out", required=True, help="new grid file (.json)")
    add_device_argument(p)
    p.set_defaults(func=cmd_grid)


def cmd_grid(args: argparse.Namespace) -> int:
    from difftime.evaluation import optimize_grid, resolve_prior
    from difftime.gridopt import steps_for_nfe
    from difftime.run import load_run

    out = Path(args.out)
    if out.suffix != ".json":
        raise DifftimeError(f"--out must end in .json, got {out}")
    if out.exists():
        raise DifftimeError(f"{out} exists; choose another --out (a grid file is never overwritten)")
    steps_for_nfe(args.sampler, args.nfe, not args.no_denoise)  # bad budgets fail before the run loads
    run = load_run(args.run, weights=args.weights, device=args.device)
    T, _ = run.sde.check_horizon(args.T if args.T is not None else run.T_train)
    prior = resolve_prior(run, args.prior, T)
    options = {"n": args.n, "fine_steps": args.fine_steps} if args.method == "gits" else {}
    grid = optimize_grid(run, prior, T, args.sampler, args.nfe, args.method, eps=args.eps, seed=args.seed,
                         precision=args.precision, denoise=not args.no_denoise, **options)
    grid = type(grid)(grid.ts, grid.sampler, grid.nfe, grid.method, grid.denoise,
                      {**grid.info, "prior": args.prior, "seed": args.seed, "run": str(args.run)})
    grid.save(out)
    print(json.dumps({"out": str(out), "T": grid.T, "eps": grid.eps, "sampler": grid.sampler, "nfe": grid.nfe,
                      "method": grid.method, "ts": [round(t, 6) for t in grid.ts],
                      "wall_s": round(grid.info["wall_s"], 2)}))
    return 0
