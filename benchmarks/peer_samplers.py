"""Peer samplers: difftime's truncated sampler against diffusers' DPM-Solver++ and DDIM, on the
same trained eps-network (the digits preset), at equal NFE budgets, in one run.

difftime starts at T in {0.4, 0.6} from a flow prior fitted to p_T and integrates the PF-ODE
with Euler (steps = NFE - 1: exactly the budget) and the reverse SDE with Euler-Maruyama
(steps = NFE - 1), plus Heun at the first T (steps = (NFE - 1) // 2, so NFE = budget - 1: 2 per
step and the final denoising call); Euler-Maruyama from T = 1 with N(0, I) is the reference
for what the truncation and the prior change. The peers start at T = 1 from
N(0, I) with diffusers' defaults (DPM-Solver++ 2M, `algorithm_type="dpmsolver++"`; DDIM with
eta = 0, clip_sample, and `timestep_spacing="trailing"` so that it starts at the last step
like DPM-Solver++); scheduler step k calls our network at the continuous t whose m(t)^2 is
alphas_cumprod[k] (`DDPMSchedule.step_times`), the digits model's beta(t) = 0.1 + 19.9 t being
the continuous limit of the linear 1e-4..0.02 schedule with N = 1000. Quality is the
classifier FD against the 300 test images, with the same n samples for every method, averaged
over independent seeds (one FD of a few hundred samples moves by about 1-2 between draws);
wall time covers drawing x_T, the solver and decoding. The summary rows set the deterministic
PF-ODE Euler sampler at each T against DPM-Solver++ (chosen beforehand, not by their scores).

    python benchmarks/peer_samplers.py [--run RUN] [--n 400] [--seeds 3] [--nfe 10,20,50,100]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from common import digits_run, flow_prior, row, standalone

from difftime.data import load_data
from difftime.evaluation import draw_samples, resolve_prior
from difftime.metrics import quality_metrics
from difftime.nets.diffusers import DDPMSchedule
from difftime.run import Run

SCHEDULE = DDPMSchedule(1000, 1e-4, 0.02)
PEERS = {"dpm++": "diffusers DPM-Solver++ (2M), T=1", "ddim": "diffusers DDIM, T=1"}


def ours_label(sampler: str, T: float, prior: str) -> str:
    return f"difftime {sampler}, {prior} prior, T={T:g}"


def diffusers_sample(run: Run, kind: str, nfe: int, n: int, seed: int = 0) -> tuple[np.ndarray, float]:
    """n data-space samples from a diffusers scheduler driving ``run``'s network; (samples, wall seconds)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    ours = run.sde.to_config()
    theirs = SCHEDULE.sde().to_config()
    if (ours["kind"], ours["b0"], ours["b1"]) != (theirs["kind"], theirs["b0"], theirs["b1"]):
        raise SystemExit(f"{run.path}: {ours} is not the continuous limit of the linear 1e-4..0.02 DDPM schedule")
    common = {"num_train_timesteps": SCHEDULE.num_train_timesteps, "beta_start": SCHEDULE.beta_start,
              "beta_end": SCHEDULE.beta_end, "beta_schedule": "linear"}
    if kind == "dpm++":
        scheduler = DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++")
    else:
        scheduler = DDIMScheduler(**common, timestep_spacing="trailing")
    step_t = SCHEDULE.step_times().float()
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    with torch.no_grad():
        scheduler.set_timesteps(nfe)
        assert len(scheduler.timesteps) == nfe
        x = torch.randn(n, *run.shape, generator=generator) * scheduler.init_noise_sigma
        for k in scheduler.timesteps:
            eps_hat = run.model(x, step_t[k].expand(n))
            x = scheduler.step(eps_hat, k, x).prev_sample
        samples = run.scaler.decode(x).numpy()
    return samples, time.perf_counter() - start


def fd(samples: np.ndarray) -> float:
    return quality_metrics(samples, "digits", ["fd"], reference_split="test", seed=0, progress=False)["fd"]["value"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", help="a trained run dir (default: the cached digits preset model)")
    parser.add_argument("--n", type=int, default=400, help="samples per method, budget and seed")
    parser.add_argument("--seeds", type=int, default=3, help="independent draws per method and budget")
    parser.add_argument("--nfe", default="10,20,50,100", help="comma list of NFE budgets")
    parser.add_argument("--T", default="0.4,0.6", help="comma list of difftime horizons")


def methods(horizons: list[float]) -> list[tuple[str, float, str]]:
    """(sampler, T, prior) of every difftime configuration: the truncated ones, then the T = 1 reference."""
    truncated = [(sampler, T, "flow") for T in horizons for sampler in ("em", "euler")]
    return [*truncated, ("heun", horizons[0], "flow"), ("em", 1.0, "standard")]


def steps_for(sampler: str, nfe: int) -> int:
    return (nfe - 1) // 2 if sampler == "heun" else nfe - 1


def summarize(draws: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds of each (method, budget)."""
    out = []
    for key in dict.fromkeys((d["method"], d["nfe_budget"]) for d in draws):
        same = [d for d in draws if (d["method"], d["nfe_budget"]) == key]
        fds = np.array([d["fd"] for d in same])
        out.append({"method": key[0], "nfe_budget": key[1], "nfe": same[0]["nfe"], "seeds": len(same),
                    "fd_mean": float(fds.mean()), "fd_sd": float(fds.std(ddof=1)) if len(fds) > 1 else float("nan"),
                    "wall_s": float(np.mean([d["wall_s"] for d in same]))})
    return out


def summary_rows(table: list[dict], n: int, seeds: int, horizons: list[float]) -> list[dict]:
    """Per budget: difftime's PF-ODE Euler from the flow prior at each T against DPM-Solver++ from T = 1."""
    cell = {(e["method"], e["nfe_budget"]): e for e in table}
    rows = []
    for nfe in sorted({e["nfe_budget"] for e in table}):
        peer = cell[(PEERS["dpm++"], nfe)]
        what = f"NFE budget {nfe}, n={n}, mean of {seeds} seeds"
        for T in horizons:
            ours = cell[(ours_label("euler", T, "flow"), nfe)]
            rows.append(row("peer samplers", f"classifier FD, {what}", ours["fd_mean"], peer["fd_mean"], "FD",
                            ours["method"], peer["method"], ours["fd_sd"] / seeds**0.5, peer["fd_sd"] / seeds**0.5))
        ours = cell[(ours_label("euler", horizons[0], "flow"), nfe)]
        rows.append(row("peer samplers", f"wall time, {what}", ours["wall_s"], peer["wall_s"], "s", ours["method"],
                        peer["method"]))
    return rows


def run(args: argparse.Namespace) -> dict:
    model_run = digits_run(args.run)
    budgets = [int(b) for b in args.nfe.split(",")]
    horizons = [float(T) for T in args.T.split(",")]
    priors = {T: flow_prior(model_run, T) for T in horizons}
    priors[1.0] = resolve_prior(model_run, "standard", 1.0)
    # Real images scored like samples: the FD to expect from a perfect model, and its spread over draws.
    train = load_data("digits").train
    rng = np.random.default_rng(0)
    floors = [fd(train[torch.from_numpy(rng.permutation(len(train))[: args.n])].numpy()) for _ in range(args.seeds)]
    draws: list[dict] = []
    for nfe in budgets:  # every method and seed at one budget back to back, so load drift hits them alike
        for seed in range(args.seeds):
            for sampler, T, prior in methods(horizons):
                samples, used, wall = draw_samples(model_run, priors[T], T, sampler, steps_for(sampler, nfe), args.n,
                                                   seed=seed)
                draws.append({"method": ours_label(sampler, T, prior), "nfe_budget": nfe, "nfe": used, "seed": seed,
                              "fd": fd(samples), "wall_s": wall})
            for kind, label in PEERS.items():
                samples, wall = diffusers_sample(model_run, kind, nfe, args.n, seed)
                draws.append({"method": label, "nfe_budget": nfe, "nfe": nfe, "seed": seed, "fd": fd(samples),
                              "wall_s": wall})
        for e in summarize([d for d in draws if d["nfe_budget"] == nfe]):
            print(f"  NFE {nfe:3d}: {e['method']:40s} NFE {e['nfe']:3d}  FD {e['fd_mean']:7.3f} +- {e['fd_sd']:.3f}  "
                  f"{e['wall_s']:.2f} s", flush=True)
    table = summarize(draws)
    rows = summary_rows(table, args.n, args.seeds, horizons)
    return {"run": str(model_run.path), "n": args.n, "seeds": args.seeds,
            "reference": "digits test split (300 images)", "fd_of_training_images": floors, "table": table,
            "draws": draws, "rows": rows}

if __name__ == "__main__":
    standalone("peer_samplers", add_arguments, run, __doc__.splitlines()[0])
