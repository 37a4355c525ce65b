"""How much a better prior at T could still gain: the headroom of each fitted prior.

The diffusion model defines its own density at every t: the baseline N(0, std^2 I) at T_max
carried down by the probability-flow ODE. At T its log-density is, from one ODE solve T -> T_max,

    log p_model_T(x_T) = log N(x_{T_max}; 0, std^2 I) + int_T^{T_max} div F(x_t, t) dt.

For x_T ~ p_T (held-out data pushed forward with fresh noise), the headroom of a prior nu is the
paired difference of cross-entropies

    H(nu) = E[-log nu(x_T)] - E[-log p_model_T(x_T)] = KL(p_T || nu) - KL(p_T || p_model_T).

If the score were exact and p_{T_max} = N, p_model_T = p_T and H(nu) = KL(p_T || nu) >= 0: what
the best possible prior could still gain over nu. H(nu) <= 0 within its interval says nu already
matches the model's own marginal, and fitting nu harder gains nothing that shows up in the model.
It is reported beside the measured lower bound on KL(p_T || N), E log nu - E log N (same x_T).
Both are per-example paired means with a normal interval (``stats.paired_difference``); with
Hutchinson divergences the probe noise is part of each example's value, so the interval covers it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from difftime.distributed import module_device
from difftime.errors import DifftimeError
from difftime.likelihood import full_precision, ode_log_likelihood
from difftime.ode import resolve_divergence
from difftime.priors import StandardPrior, heldout_set
from difftime.run import Run
from difftime.sde import SDE
from difftime.stats import mean_se, paired_difference

HEADROOM_SEED_OFFSET = 1  # x_T noise other than the fit's early-stopping set (fit_prior uses seed + 0)


@full_precision
def model_marginal_log_prob(
    model: nn.Module,
    sde: SDE,
    x_T: Tensor,
    T: float,
    *,
    rtol: float = 1e-4,
    atol: float = 1e-4,
    divergence: str = "auto",
    n_probes: int = 1,
    batch: int = 256,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, int]:
    """log p_model_T(x_T) per example (float64, (B,)) and the NFE summed over batches.

    One PF-ODE solve from t = T (the start) up to T_max per batch; at T = T_max no solve is
    needed and the model's marginal is the baseline prior itself.
    """
    T = float(T)
    sde.check_horizon(T)
    shape = tuple(x_T.shape[1:])
    top = StandardPrior.for_sde(sde, sde.T_max, shape)
    if T >= sde.T_max - 1e-12:
        return top.log_prob(x_T).double(), 0
    logs, nfe = [], 0
    for chunk in x_T.split(int(batch)):
        # The PF-ODE log-likelihood with T as the start time and the standard prior at T_max.
        result = ode_log_likelihood(model, sde, chunk, top, sde.T_max, eps=T, rtol=rtol, atol=atol,
                                    divergence=divergence, generator=generator, n_probes=n_probes)
        logs.append(result.log_p.double())
        nfe += int(result.nfe)
    return torch.cat(logs), nfe


def _ce(values: Tensor) -> dict[str, float]:
    """Cross-entropy -mean(log q) with its standard error over examples (nats)."""
    mean, se = mean_se(values)
    return {"nats": -mean, "se": se}


def _per_dim(diff: dict[str, Any], d: int) -> dict[str, Any]:
    """A paired difference in nats per example, also per dimension (nats and bits)."""
    out = dict(diff)
    for key in ("mean", "se", "lo", "hi"):
        out[f"{key}_per_dim"] = diff[key] / d
        out[f"{key}_bits_per_dim"] = diff[key] / (d * math.log(2))
    return out


@torch.no_grad()
def prior_headroom(
    model: nn.Module,
    sde: SDE,
    priors: Mapping[str, Any],
    x_T: Tensor,
    T: float,
    *,
    rtol: float = 1e-4,
    atol: float = 1e-4,
    divergence: str = "auto",
    n_probes: int = 1,
    batch: int = 256,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Headroom of each prior at T on the samples ``x_T`` (drawn from p_T), JSON-ready.

    Returns {"T", "n", "dim", "model": {cross_entropy, nfe, wall_s, solver settings},
    "priors": {name: {"cross_entropy": {nats, se}, "headroom": paired difference CE(nu) - CE(model),
    "kl_lower_bound": paired difference E log nu - E log N (a lower bound on KL(p_T||N))}}}.
    Paired differences hold mean, se, lo, hi, n (nats per example) and the same per dimension.
    """
    if not priors:
        raise DifftimeError("prior_headroom needs at least one prior")
    T, _ = sde.check_horizon(T)
    if not isinstance(x_T, Tensor) or x_T.dim() < 2 or len(x_T) < 2:
        raise DifftimeError(f"prior_headroom: x_T must be a batch of at least 2 examples, got "
                            f"{tuple(x_T.shape) if isinstance(x_T, Tensor) else type(x_T).__name__}")
    x_T = x_T.float().to(module_device(model, x_T.device))  # the priors must live on the model's device too
    d = x_T[0].numel()
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(int(seed))  # a CPU stream: the same probes on every device
    log_model, nfe = model_marginal_log_prob(model, sde, x_T, T, rtol=rtol, atol=atol, divergence=divergence,
                                             n_probes=n_probes, batch=batch, generator=gen)
    wall = time.perf_counter() - start
    standard = StandardPrior.for_sde(sde, T, tuple(x_T.shape[1:]))
    log_standard = standard.log_prob(x_T).double()
    result: dict[str, Any] = {
        "T": T, "n": len(x_T), "dim": d, "level": level,
        "model": {"cross_entropy": _ce(log_model), "nfe": nfe, "wall_s": wall, "rtol": rtol, "atol": atol,
                  "divergence": resolve_divergence(divergence, d),
                  "n_probes": n_probes},
        "priors": {},
    }
    for name, prior in {"standard": standard, **priors}.items():
        log_nu = torch.cat([prior.log_prob(c).double() for c in x_T.split(int(batch))])
        # CE(nu) - CE(model) = mean(log p_model - log nu), per example on the same x_T.
        head = paired_difference(log_model, log_nu, level).to_dict()
        entry = {"cross_entropy": _ce(log_nu), "headroom": _per_dim(head, d)}
        if name != "standard":
            entry["kl_lower_bound"] = _per_dim(paired_difference(log_nu, log_standard, level).to_dict(), d)
        result["priors"][name] = entry
    return result


def run_headroom(
    run: Run,
    priors: Mapping[str, Any],
    T: float,
    dataset: Any,
    *,
    n: int = 200,
    seed: int = 0,
    **options: Any,
) -> dict[str, Any]:
    """``prior_headroom`` of a run's model on n held-out x_T: the test split pushed to T with fixed
    noise that differs from the set the priors were early-stopped on (seed + 1)."""
    T, _ = run.sde.check_horizon(T)
    if int(n) < 2:
        raise DifftimeError(f"headroom: n={n} is invalid; expected n >= 2")
    x_T = heldout_set(run.sde, T, dataset, int(n), seed + HEADROOM_SEED_OFFSET)
    out = prior_headroom(run.model, run.sde, priors, x_T, T, seed=seed, **options)
    out["x_T"] = {"split": "test", "n": int(n), "noise_seed": seed + HEADROOM_SEED_OFFSET}
    return out


def headroom_table(results: Sequence[dict[str, Any]]) -> str:
    """A markdown table: one row per (T, prior), nats per example with 95% intervals."""
    rows = ["| T | prior | CE (nats) | headroom CE(nu) - CE(model) (nats) | per dim | KL(p_T‖N) lower bound (nats) |",
            "|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r['T']:g} | model marginal (PF-ODE, NFE {r['model']['nfe']}) | "
                    f"{r['model']['cross_entropy']['nats']:.2f} ± {r['model']['cross_entropy']['se']:.2f} | 0 | 0 | |")
        for name, e in r["priors"].items():
            h = e["headroom"]
            kl = e.get("kl_lower_bound")
            kl_text = f"{kl['mean']:.3f} [{kl['lo']:.3f}, {kl['hi']:.3f}]" if kl else ""
            rows.append(f"| {r['T']:g} | {name} | {e['cross_entropy']['nats']:.2f} ± {e['cross_entropy']['se']:.2f} | "
                        f"{h['mean']:.3f} [{h['lo']:.3f}, {h['hi']:.3f}] | {h['mean_per_dim']:.5f} | {kl_text} |")
    return "\n".join(rows)
