"""Priors that earn their place: the headroom per T, and fitted priors against the Gaussian.

For each T: fit every family with the library's fitting (warm-up + cosine lr, noise-based early
stopping with lr cuts, 4096 held-out x_T, a wall-time cap), then on FRESH held-out x_T (test split,
noise seed + 1, never used for early stopping):
  - the held-out NLL of x_T of each family and the paired differences to the Gaussian (and glow - flow);
  - the headroom: CE(prior) - CE(the model's own PF-ODE marginal at T) on --n-headroom x_T, beside the
    measured lower bound on KL(p_T || N) (E log nu - E log N, same x_T).
Writes OUT/results.json, OUT/results.md and OUT/fit-<family>-T<T>.png (the fit curves). Priors are
stored in RUN/priors/ (an existing one is reused unless --refit).

    python benchmarks/priors_headroom.py --run /work/runs/digits-h --T 0.2,0.4,0.6,0.8 \\
        --families gaussian,flow --batch-size 512 --n-headroom 500 --out docs/priors-headroom/digits
    python benchmarks/priors_headroom.py --run /work/runs/mnist-cpu --T 0.2,0.4 \\
        --families gaussian,flow,glow --steps 3000 --glow-steps 1500 --time-limit 420 --out docs/priors-headroom/mnist
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from difftime.data import load_data
from difftime.evaluation import resolve_prior
from difftime.headroom import HEADROOM_SEED_OFFSET, headroom_table, run_headroom
from difftime.io import save_json
from difftime.priors import fit_run_prior, heldout_set, prior_dir
from difftime.priors.fit import example_nll
from difftime.provenance import versions
from difftime.run import load_run
from difftime.stats import paired_difference

GLOW_28 = {"levels": 2, "steps_per_level": 3, "hidden": 32, "base": "full"}  # 0.18 s/step at batch 256, 1 thread
FLOW = {"flow": "maf", "transforms": 3, "hidden": [128, 128]}


def family_options(family: str, is_image: bool) -> dict[str, Any]:
    if family == "flow":
        return dict(FLOW)
    if family == "glow":
        return dict(GLOW_28) if is_image else {}
    return {}


def fit_or_load(run, family: str, T: float, dataset, args) -> tuple[Any, dict[str, Any], float]:
    """The run's prior: fitted now (wall seconds measured) or loaded with the fit record it stored."""
    folder = prior_dir(run.path, family, T)
    if folder.is_dir() and not args.refit:
        meta = json.loads((folder / "config.json").read_text())
        fit = meta.get("extra", {}).get("fit", {})
        return resolve_prior(run, family, T), fit, float(fit.get("seconds", math.nan))
    start = time.perf_counter()
    steps = args.glow_steps if family == "glow" and args.glow_steps else args.steps
    prior, fit = fit_run_prior(run.path, run.sde, run.shape, family, T, dataset, steps=steps,
                               batch_size=args.batch_size, lr=args.lr, seed=args.seed, progress=False,
                               fit_options={"time_limit": args.time_limit, "eval_every": args.eval_every},
                               **family_options(family, dataset.is_image))
    return prior, fit, time.perf_counter() - start


def heldout_comparison(priors: dict[str, Any], x: torch.Tensor) -> dict[str, Any]:
    """Held-out NLL of each prior on the fresh x_T, and paired differences (nats per example)."""
    nll = {name: example_nll(prior, x) for name, prior in priors.items()}
    out: dict[str, Any] = {"n": len(x), "nll": {name: {"nats": float(v.mean()),
                                                       "se": float(v.std()) / math.sqrt(len(v))}
                                                for name, v in nll.items()}, "paired": {}}
    pairs = [(a, "gaussian") for a in nll if a not in ("gaussian", "standard")]
    if "flow" in nll and "glow" in nll:
        pairs.append(("glow", "flow"))
    for a, b in pairs:
        if b in nll:  # a - b < 0: a has the lower NLL
            out["paired"][f"{a} - {b}"] = paired_difference(nll[a], nll[b]).to_dict()
    return out


def markdown(results: dict[str, Any]) -> str:
    lines = [f"# Priors and headroom: {results['run']}", "",
             f"Command: `{results['command']}`", "",
             f"Settings: {json.dumps(results['settings'])}", "",
             "## Held-out NLL of x_T (fresh noise, nats per example) and paired differences (95% interval)", "",
             "| T | family | NLL | fit wall (s) | steps (best) | stopped | lr cuts |", "|---|---|---|---|---|---|---|"]
    for r in results["per_T"]:
        for name, v in r["heldout"]["nll"].items():
            f = r["fits"].get(name, {})
            lines.append(f"| {r['T']:g} | {name} | {v['nats']:.3f} ± {v['se']:.3f} | "
                         f"{f.get('wall_s', 0):.0f} | {f.get('steps', '-')} ({f.get('best_step', '-')}) | "
                         f"{f.get('stopped', '-')} | {f.get('lr_cuts', '-')} |")
        for pair, d in r["heldout"]["paired"].items():
            lines.append(f"| {r['T']:g} | {pair} | {d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}] | | | | |")
    lines += ["", "## Headroom: CE(prior) - CE(model's PF-ODE marginal at T), paired on the same x_T", "",
              headroom_table([r["headroom"] for r in results["per_T"]]), ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--T", required=True, help="comma list")
    p.add_argument("--families", default="gaussian,flow")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--glow-steps", type=int, help="steps of the glow fits (default --steps): size both to the time")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--time-limit", type=float, default=600.0, help="seconds per fit (the issue's cap: 600)")
    p.add_argument("--n-heldout", type=int, default=4096)
    p.add_argument("--n-headroom", type=int, default=200)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--batch", type=int, default=200, help="ODE batch of the headroom solve")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--refit", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = load_run(args.run)
    dataset = load_data(run.config["resolved"]["data"], seed=run.seed)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    results: dict[str, Any] = {
        "run": str(run.path), "data": dataset.name, "dim": math.prod(run.shape), "versions": versions(),
        "command": "python benchmarks/priors_headroom.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (None, False) and k != "refit"),
        "settings": {k: v for k, v in vars(args).items()} | {"threads": torch.get_num_threads(),
                                                             "options": {f: family_options(f, dataset.is_image)
                                                                         for f in families}},
        "per_T": []}
    grid = [float(t) for t in args.T.split(",")]
    if (out / "results.json").is_file():  # keep the other T of an earlier invocation (a partial rerun)
        earlier = json.loads((out / "results.json").read_text())
        results["per_T"] = [r for r in earlier.get("per_T", []) if r["T"] not in grid]
        results["earlier_commands"] = [*earlier.get("earlier_commands", []), earlier["command"]]
    for T in grid:
        priors, fits = {}, {}
        for family in families:
            prior, fit, wall = fit_or_load(run, family, T, dataset, args)
            priors[family] = prior
            fits[family] = {"wall_s": wall, **{k: fit.get(k) for k in ("steps", "best_step", "stopped", "lr_cuts",
                                                                         "gain", "test_nll", "n_eval")}}
            curve = prior_dir(run.path, family, T) / "fit_curve.png"
            if curve.is_file():
                shutil.copyfile(curve, out / f"fit-{family}-T{T:g}.png")
            print(json.dumps({"T": T, "family": family, **fits[family]}), flush=True)
        x = heldout_set(run.sde, T, dataset, args.n_heldout, args.seed + HEADROOM_SEED_OFFSET)
        std = resolve_prior(run, "standard", T)
        heldout = heldout_comparison({"standard": std, **priors}, x)
        print(json.dumps({"T": T, "heldout": heldout["paired"]}), flush=True)
        head = run_headroom(run, priors, T, dataset, n=args.n_headroom, seed=args.seed, rtol=args.tol,
                            atol=args.tol, batch=args.batch)
        print(json.dumps({"T": T, "model_nfe": head["model"]["nfe"], "wall_s": round(head["model"]["wall_s"], 1),
                          "headroom": {k: v["headroom"]["mean"] for k, v in head["priors"].items()}}), flush=True)
        results["per_T"] = sorted([*results["per_T"], {"T": T, "fits": fits, "heldout": heldout, "headroom": head}],
                                  key=lambda r: r["T"])
        save_json(out / "results.json", results)  # after every T: a kill keeps what was measured
        (out / "results.md").write_text(markdown(results))
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")


if __name__ == "__main__":
    main()
