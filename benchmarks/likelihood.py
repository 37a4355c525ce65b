"""PF-ODE likelihood: difftime (torchdiffeq dopri5, one fused drift+divergence pass) against the
score_sde approach (scipy solve_ivp RK45, tensors moved to numpy at every evaluation, drift and
divergence from separate network calls), on the same model, data, probe and tolerance.

    python benchmarks/likelihood.py [--run RUN] [--n 16] [--tol 1e-5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from common import digits_run, row, standalone
from scipy import integrate

from difftime.likelihood import ode_log_likelihood
from difftime.sampling import probability_flow_drift


class StandardNormal:
    def log_prob(self, x):
        return -0.5 * x.flatten(1).pow(2).sum(1) - 0.5 * x[0].numel() * np.log(2 * np.pi)


def score_sde_style(model, sde, x, T, eps, probe, rtol, atol):
    """A faithful transcription of score_sde's likelihood.py loop, with its numpy round trips."""
    shape = x.shape
    nfe = 0

    def drift_fn(sample, t):
        with torch.no_grad():
            return probability_flow_drift(model, sde, sample, t)

    def div_fn(sample, t):
        with torch.enable_grad():
            sample = sample.detach().requires_grad_(True)
            fn_eps = torch.sum(probability_flow_drift(model, sde, sample, t) * probe)
            grad = torch.autograd.grad(fn_eps, sample)[0]
        return torch.sum(grad * probe, dim=tuple(range(1, len(shape))))

    def ode_func(t, state):
        nonlocal nfe
        nfe += 1
        sample = torch.from_numpy(state[: -shape[0]].reshape(shape)).float()
        vec_t = torch.ones(shape[0]) * t
        drift = drift_fn(sample, vec_t).numpy().reshape(-1)
        logp_grad = div_fn(sample, vec_t).numpy().reshape(-1)
        return np.concatenate([drift, logp_grad], axis=0)

    init = np.concatenate([x.numpy().reshape(-1), np.zeros(shape[0])], axis=0)
    solution = integrate.solve_ivp(ode_func, (eps, T), init, rtol=rtol, atol=atol, method="RK45")
    zp = solution.y[:, -1]
    z = torch.from_numpy(zp[: -shape[0]].reshape(shape)).float()
    delta_logp = torch.from_numpy(zp[-shape[0]:]).float()
    return StandardNormal().log_prob(z) + delta_logp, nfe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", help="a trained run dir (default: the cached digits preset model)")
    parser.add_argument("--n", type=int, default=16, help="test images in the batch")
    parser.add_argument("--tol", type=float, default=1e-5)


def run(args: argparse.Namespace) -> dict:
    from difftime.data import load_data

    model_run = digits_run(args.run)
    data = load_data("digits")
    gen = torch.Generator().manual_seed(0)
    x = model_run.scaler.encode(data.test[: args.n], generator=gen)
    probe = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(1)).float() * 2 - 1
    T, eps = 1.0, model_run.sde.eps

    t0 = time.perf_counter()
    ref, ref_nfe = score_sde_style(model_run.model, model_run.sde, x, T, eps, probe, args.tol, args.tol)
    ref_wall = time.perf_counter() - t0
    # The same probe: a generator in the state that produced it.
    probe_gen = torch.Generator().manual_seed(1)
    t0 = time.perf_counter()
    ours, nfe, _ = ode_log_likelihood(model_run.model, model_run.sde, x, T, StandardNormal(), rtol=args.tol,
                                      atol=args.tol, divergence="hutchinson", generator=probe_gen)
    wall = time.perf_counter() - t0
    gap = (ours - ref).abs().max().item()
    result = {"n": args.n, "tol": args.tol, "difftime_wall_s": wall, "difftime_nfe": nfe,
              "score_sde_wall_s": ref_wall, "score_sde_nfe": ref_nfe, "speedup": ref_wall / wall,
              "max_abs_logp_difference_nats": gap, "mean_logp_difftime": ours.mean().item(),
              "mean_logp_score_sde": ref.mean().item()}
    rows = [row("likelihood", f"PF-ODE log p of {args.n} digits, tol {args.tol:g} (NFE {nfe} vs {ref_nfe})",
                wall, ref_wall, "s", "difftime torchdiffeq dopri5", "score_sde-style scipy RK45")]
    return {"run": str(model_run.path), "results": result, "rows": rows}


if __name__ == "__main__":
    standalone("likelihood", add_arguments, run, __doc__.splitlines()[0])
