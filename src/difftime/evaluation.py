"""Evaluation of a run at a horizon T with a prior: likelihood metrics in bits/dim.

Every figure comes with its standard error over examples, and every result records what it
was computed from (T, eps, prior, N, split, seeds, tolerances), so numbers can be compared.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from difftime.errors import DifftimeError
from difftime.likelihood import bits_per_dim, elbo, full_precision, ode_flow
from difftime.priors import StandardPrior, load_prior, prior_dir
from difftime.rng import stream_seed
from difftime.run import Run
from difftime.sampling import sample

LIKELIHOOD_METRICS = ("elbo", "nll")


def resolve_prior(run: Run, family: str, T: float):
    """The run's prior of ``family`` at T: built for ``standard``, loaded from priors/ otherwise."""
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


def draw_samples(
    run: Run,
    prior,
    T: float,
    sampler: str,
    steps: int,
    n: int,
    *,
    seed: int = 0,
    eps: float | None = None,
    batch: int = 1000,
    **options: Any,
) -> tuple[np.ndarray, int, float]:
    """n data-space samples: x_T ~ prior, the reverse ``sampler`` on [eps, T], then unscaled.

    Returns (samples, NFE per sample, wall seconds). One generator drives the prior draw and
    every sampler batch, so a seed fixes the samples whatever the batch size.
    """
    T, eps = run.sde.check_horizon(T, eps)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    x0, nfe = sample(run.model, run.sde, _Shaped(prior, run.shape), n, T, eps, sampler, steps, generator,
                     batch=batch, **options)
    wall = time.perf_counter() - start
    return run.scaler.decode(x0).numpy(), nfe, wall


class _Shaped:
    """A prior whose draws are reshaped to the run's example shape, in float32."""

    def __init__(self, prior: Any, shape: tuple[int, ...]) -> None:
        self.prior, self.shape = prior, shape

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.prior.sample(n, generator=generator).reshape(n, *self.shape).float()


def _summary(values: Tensor) -> tuple[float, float]:
    """Mean and standard error over the first axis."""
    values = values.double()
    se = values.std(correction=1).item() / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return values.mean().item(), se


@full_precision
def likelihood_metrics(
    run: Run,
    priors: Mapping[str, Any],
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
) -> dict[str, dict[str, Any]]:
    """ELBO terms and PF-ODE NLL of ``raw`` examples (data space) in bits/dim, per prior.

    Every prior sees the same dequantization, the same (t, z) and x_T draws and the same
    PF-ODE solve (which does not involve the prior), so differences between priors carry no
    Monte Carlo noise of their own, one solve serves them all, and a prior's figures do not
    depend on which other priors are evaluated with it. The improvement of a prior nu over the
    standard one, E log nu(x_T) - E log N(x_T) on shared draws, equals KL(p_T||N) - KL(p_T||nu):
    a measured lower bound on KL(p_T||N).
    """
    unknown = set(metrics) - set(LIKELIHOOD_METRICS)
    if unknown:
        raise DifftimeError(f"unknown likelihood metrics {sorted(unknown)}; expected {LIKELIHOOD_METRICS}")
    if not priors:
        raise DifftimeError("likelihood_metrics needs at least one prior")
    T, eps = run.sde.check_horizon(T, eps)
    scaler = run.scaler
    d = math.prod(run.shape)
    levels, a = scaler.levels, scaler.a
    repeats = dequant_repeats if levels is not None else 1
    dequant_gen, elbo_gen, ode_gen = (torch.Generator().manual_seed(stream_seed(seed, k)) for k in range(3))
    standard = StandardPrior.for_sde(run.sde, T, run.shape)
    n = len(raw)
    keys = ("elbo", "prior", "score", "constant", "nll", "improvement")
    per_metric: dict[str, dict[str, list[Tensor]]] = {name: {k: [] for k in keys} for name in priors}
    nfes: list[float] = []
    chunks = [(r, s) for r in range(repeats) for s in range(0, n, batch)]
    bar = tqdm(chunks, desc=f"evaluate T={T:g} {', '.join(priors)}", disable=not progress, unit="batch")
    for _, start in bar:
        x = scaler.encode(raw[start:start + batch], generator=dequant_gen)
        if "elbo" in metrics:
            draws = elbo_gen.get_state()
            baseline = None
            for name, prior in {**priors, "standard": priors.get("standard", standard)}.items():
                elbo_gen.set_state(draws)  # the same (t, z) and x_T draws for every prior
                with torch.no_grad():
                    terms = elbo(run.model, run.sde, x, T, prior, eps=eps, n_t=n_t, n_prior=n_prior,
                                 generator=elbo_gen)
                if name == "standard":
                    baseline = terms
                if name in priors:
                    for key, value in (("elbo", terms.total), ("prior", terms.prior), ("score", terms.score),
                                       ("constant", terms.constant)):
                        per_metric[name][key].append(value)
            for name in priors:
                if name != "standard":
                    per_metric[name]["improvement"].append(per_metric[name]["prior"][-1] - baseline.prior)
        if "nll" in metrics:
            x_T, integral, nfe = ode_flow(run.model, run.sde, x, T, eps, rtol=rtol, atol=atol, divergence=divergence,
                                          generator=ode_gen)
            nfes.append(float(nfe))
            with torch.no_grad():
                for name, prior in priors.items():
                    per_metric[name]["nll"].append(prior.log_prob(x_T).double() + integral.double())
    return {name: _likelihood_summary(per_metric[name], nfes, name, metrics, T, eps, n, repeats, d, levels, a,
                                      n_t=n_t, n_prior=n_prior, rtol=rtol, atol=atol, divergence=divergence)
            for name in priors}


def _likelihood_summary(per_metric: dict[str, list[Tensor]], nfes: list[float], prior_name: str,
                        metrics: tuple[str, ...], T: float, eps: float, n: int, repeats: int, d: int,
                        levels: int | None, a: float, **settings: Any) -> dict[str, Any]:
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
            "n_t": settings["n_t"], "n_prior": settings["n_prior"],
        }
        if per_metric["improvement"]:
            mean, se = _summary(per_example("improvement"))
            result["prior_improvement"] = {"nats": mean, "se": se, "bpd": mean / (d * math.log(2)),
                                           "meaning": "E log nu(x_T) - E log N(x_T): a lower bound on KL(p_T||N)"}
    if "nll" in metrics:
        logp = per_example("nll")
        bpd, bpd_se = _summary(to_bits(logp))
        result["nll"] = {"bpd": bpd, "bpd_se": bpd_se, "nats": -_summary(logp)[0],
                         "nfe_mean": sum(nfes) / len(nfes), "rtol": settings["rtol"], "atol": settings["atol"],
                         "divergence": settings["divergence"]}
    return result
