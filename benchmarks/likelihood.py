"""PF-ODE likelihood: difftime (torchdiffeq dopri5, one fused drift+divergence pass) against the
score_sde approach (scipy solve_ivp RK45, tensors moved to numpy at every evaluation, drift and
divergence from separate network calls), on the same model, data, probe and tolerance.

    python benchmarks/likelihood.py [--run RUN] [--n 64] [--tol 1e-5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from common import digits_run, write_result
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--tol", type=float, default=1e-5)
    parser.add_argument("--out", default="benchmarks/results/likelihood.json")
    args = parser.parse_args()
    from difftime.data import load_data

    run = digits_run(args.run)
    data = load_data("digits")
    gen = torch.Generator().manual_seed(0)
    x = run.scaler.encode(data.test[: args.n], generator=gen)
    probe = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(1)).float() * 2 - 1
    T, eps = 1.0, run.sde.eps

    t0 = time.perf_counter()
    ref, ref_nfe = score_sde_style(run.model, run.sde, x, T, eps, probe, args.tol, args.tol)
    ref_wall = time.perf_counter() - t0

    # Same probe: reuse the generator state that produced it.
    t0 = time.perf_counter()
    ours, nfe, _ = ode_log_likelihood(run.model, run.sde, x, T, StandardNormal(), rtol=args.tol, atol=args.tol,
                                      divergence="hutchinson", generator=torch.Generator().manual_seed(1))
    wall = time.perf_counter() - t0
    gap = (ours - ref).abs().max().item()
    result = {"n": args.n, "tol": args.tol, "difftime_wall_s": wall, "difftime_nfe": nfe,
              "score_sde_wall_s": ref_wall, "score_sde_nfe": ref_nfe, "speedup": ref_wall / wall,
              "max_abs_logp_difference_nats": gap, "mean_logp_difftime": ours.mean().item(),
              "mean_logp_score_sde": ref.mean().item()}
    print(f"difftime dopri5: {wall:.2f} s ({nfe} NFE); score_sde-style RK45: {ref_wall:.2f} s ({ref_nfe} NFE); "
          f"speedup {ref_wall / wall:.2f}x; max |log p difference| {gap:.2e} nats "
          f"(mean log p {ours.mean():.3f} vs {ref.mean():.3f})")
    write_result(args.out, "likelihood", result)


if __name__ == "__main__":
    main()
