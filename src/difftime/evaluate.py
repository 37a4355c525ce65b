"""Evaluation of a run at a horizon T with a prior: likelihood metrics in bits/dim.

Every figure comes with its standard error over examples, and every result records what it
was computed from (T, eps, prior, N, split, seeds, tolerances), so numbers can be compared.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from difftime.errors import DifftimeError
from difftime.io import Run
from difftime.likelihood import bits_per_dim, elbo, ode_log_likelihood

LIKELIHOOD_METRICS = ("elbo", "nll")


def resolve_prior(run: Run, family: str, T: float):
    """The run's prior of ``family`` at T: built for ``standard``, loaded from priors/ otherwise."""
    from difftime.priors import StandardPrior, load_prior, prior_dir

    T, _ = run.sde.check_horizon(T)
    if family == "standard":
        return StandardPrior.for_sde(run.sde, T, run.shape)
    directory = prior_dir(run.path, family, T)
    if not directory.is_dir():
        raise DifftimeError(
            f"{run.path} has no {family} prior at T={T:g}; fit one first with "
            f"`difftime fit-prior {run.path} --T {T:g} --prior {family}`"
        )
    prior = load_prior(directory)
    if not math.isclose(prior.T, T, rel_tol=1e-9) or tuple(prior.shape) != tuple(run.shape):
        raise DifftimeError(f"{directory} holds a prior for T={prior.T:g}, shape {prior.shape}; "
                            f"expected T={T:g}, shape {run.shape}")
    prior.eval()
    return prior


def _summary(values: Tensor) -> tuple[float, float]:
    """Mean and standard error over the first axis."""
    values = values.double()
    se = values.std(correction=1).item() / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return values.mean().item(), se


@torch.no_grad()
def prior_improvement(run: Run, prior, x0: Tensor, T: float, n_draws: int = 8,
                      generator: torch.Generator | None = None) -> Tensor:
    """Per-example E log nu(x_T) - E log N(x_T), with both priors on the same draws of x_T.

    Its mean equals KL(p_T || N) - KL(p_T || nu), so it is a measured lower bound on KL(p_T || N).
    """
    from difftime.priors import StandardPrior

    standard = StandardPrior.for_sde(run.sde, T, run.shape)
    reps = x0.repeat_interleave(n_draws, dim=0)
    t = torch.full((len(reps),), T, dtype=reps.dtype)
    x_T, _ = run.sde.marginal_sample(reps, t, generator)
    diff = prior.log_prob(x_T).double() - standard.log_prob(x_T).double()
    return diff.reshape(len(x0), n_draws).mean(1)


def likelihood_metrics(
    run: Run,
    prior,
    prior_name: str,
    raw: Tensor,
    T: float,
    metrics: tuple[str, ...] = LIKELIHOOD_METRICS,
    *,
    eps: float | None = None,
    dequant_repeats: int = 1,
    n_t: int = 64,
    n_prior: int = 8,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    divergence: str = "auto",
    batch: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """ELBO terms and PF-ODE NLL of ``raw`` examples (data space) in bits/dim, with errors."""
    unknown = set(metrics) - set(LIKELIHOOD_METRICS)
    if unknown:
        raise DifftimeError(f"unknown likelihood metrics {sorted(unknown)}; expected {LIKELIHOOD_METRICS}")
    T, eps = run.sde.check_horizon(T, eps)
    scaler = run.scaler
    d = math.prod(run.shape)
    levels, a = scaler.levels, scaler.a
    repeats = dequant_repeats if levels is not None else 1
    gen = torch.Generator().manual_seed(seed)
    n = len(raw)
    per_metric: dict[str, list[Tensor]] = {k: [] for k in ("elbo", "prior", "score", "constant", "nll",
                                                          "nfe", "improvement")}
    chunks = [(r, s) for r in range(repeats) for s in range(0, n, batch)]
    bar = tqdm(chunks, desc=f"evaluate T={T:g} {prior_name}", disable=not progress, unit="batch")
    for _, start in bar:
        x = scaler.encode(raw[start:start + batch], generator=gen)
        if "elbo" in metrics:
            terms = elbo(run.model, run.sde, x, T, prior, eps=eps, n_t=n_t, n_prior=n_prior, generator=gen)
            per_metric["elbo"].append(terms.total)
            per_metric["prior"].append(terms.prior)
            per_metric["score"].append(terms.score)
            per_metric["constant"].append(terms.constant)
            if prior_name != "standard":
                per_metric["improvement"].append(prior_improvement(run, prior, x, T, n_prior, gen))
        if "nll" in metrics:
            logp, nfe, _ = ode_log_likelihood(run.model, run.sde, x, T, prior, eps=eps, rtol=rtol, atol=atol,
                                              divergence=divergence, generator=gen)
            per_metric["nll"].append(logp.double())
            per_metric["nfe"].append(torch.full((len(x),), float(nfe)))

    def per_example(key: str) -> Tensor:
        """Average the dequantization repeats of each example: one value per example."""
        return torch.cat(per_metric[key]).reshape(repeats, n).mean(0)

    def to_bits(nats: Tensor, offset: bool = True) -> Tensor:
        bits = -nats / (d * math.log(2))
        return bits_per_dim(nats, d, levels, a) if offset else bits

    result: dict[str, Any] = {"T": T, "eps": eps, "prior": prior_name, "n": n, "dequant_repeats": repeats,
                              "dim": d, "levels": levels, "a": a}
    if "elbo" in metrics:
        total = per_example("elbo")
        bpd, bpd_se = _summary(to_bits(total))
        result["elbo"] = {
            "bpd": bpd, "bpd_se": bpd_se, "nats": _summary(total)[0],
            # Additive contributions to the bits/dim: prior + score + constant + dequantization = bpd.
            "prior_bpd": _summary(to_bits(per_example("prior"), offset=False))[0],
            "score_bpd": _summary(-to_bits(per_example("score"), offset=False))[0],
            "constant_bpd": _summary(to_bits(per_example("constant"), offset=False))[0],
            "dequantization_bpd": float(bits_per_dim(0.0, d, levels, a)),
            "prior_nats": _summary(per_example("prior"))[0],
            "score_nats": _summary(per_example("score"))[0],
            "constant_nats": _summary(per_example("constant"))[0],
            "n_t": n_t, "n_prior": n_prior,
        }
        if per_metric["improvement"]:
            mean, se = _summary(per_example("improvement"))
            result["prior_improvement"] = {"nats": mean, "se": se, "bpd": mean / (d * math.log(2)),
                                           "meaning": "E log nu(x_T) - E log N(x_T): a lower bound on KL(p_T||N)"}
    if "nll" in metrics:
        logp = per_example("nll")
        bpd, bpd_se = _summary(to_bits(logp))
        result["nll"] = {"bpd": bpd, "bpd_se": bpd_se, "nats": -_summary(logp)[0],
                         "nfe_mean": torch.cat(per_metric["nfe"]).mean().item(),
                         "rtol": rtol, "atol": atol, "divergence": divergence}
    return result
