"""Evaluation of a run at a horizon T with a prior: likelihood metrics in bits/dim.

Every figure comes with its standard error over examples, and every result records what it
was computed from (T, eps, prior, N, split, seeds, tolerances), so numbers can be compared.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from difftime import distributed
from difftime.errors import DifftimeError
from difftime.gridopt import GRID_METHODS, TimeGrid, gaussian_grid, gits_grid
from difftime.likelihood import bits_per_dim, elbo_across_T, full_precision, ode_flow, prior_draws_across_T
from difftime.priors import Prior, StandardPrior, load_prior, prior_dir
from difftime.rng import stream_seed
from difftime.run import Run
from difftime.sampling import (
    DEFAULT_SAMPLER,
    DEFAULT_SPACING,
    check_spacing,
    default_sample_eps,
    default_spacing,
    sample,
    zero_eps,
)
from difftime.sde import SDE
from difftime.stats import Difference, mean_se, paired_difference

LIKELIHOOD_METRICS = ("elbo", "nll")
SAMPLE_PRECISIONS = ("fp32", "bf16")


def resolve_prior(run: Run, family: str, T: float) -> Prior:
    """The run's prior of ``family`` at T: built for ``standard``, loaded from priors/ otherwise, on
    the run's device (``run.device``)."""
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
    return prior.to(run.device).eval()


class DrawnSamples(NamedTuple):
    """What ``draw_samples`` returns; it unpacks as ``x, nfe, wall_s = ...``."""

    x: np.ndarray  # the samples in data space (the scaler's decode)
    nfe: int  # network calls per sample, the Tweedie call included
    wall_s: float  # wall seconds of the sampling


def draw_samples(
    run: Run,
    prior: Prior,
    T: float,
    sampler: str,
    steps: int,
    n: int,
    *,
    seed: int = 0,
    eps: float | None = None,
    batch: int = 500,  # chosen by measurement on CPU (docs/design.md §5)
    precision: str = "fp32",
    shard: bool = False,
    **options: Any,
) -> DrawnSamples:
    """n data-space samples: x_T ~ prior, the reverse ``sampler`` on [eps, T], then unscaled.

    ``difftime.sampling.sample`` on the run's network and SDE, with its argument rule: (run, prior, T)
    lead as (model, sde, prior, T) do there. ``sampler``, ``steps`` and ``n`` may still be given by
    position too, as the benchmarks do. ``eps`` defaults to ``default_sample_eps(run.sde)`` and
    ``options`` go to ``sample`` (``spacing``, ``denoise``, an explicit grid ``ts``, sampler options).

    Returns ``DrawnSamples(x, nfe, wall_s)``: the samples, the NFE per sample and the wall seconds.
    One generator drives the prior draw and every sampler batch, so a seed fixes the samples
    whatever the batch size. ``precision`` "bf16" runs the network under bfloat16 autocast (faster per
    call on CPU, docs/design.md §5); the sampler's own arithmetic stays in float32. The sampler runs on
    ``run.device`` with the prior's draw and the noise from a CPU generator (difftime.rng's rule), so a
    seed gives the same samples on every device up to float error. ``shard`` shares the batches
    among torchrun's ranks (``sample``'s rule): the same samples at any world size, on every rank.
    """
    if precision not in SAMPLE_PRECISIONS:
        raise DifftimeError(f"precision must be one of {', '.join(SAMPLE_PRECISIONS)}, got {precision!r}")
    if options.get("ts") is None:
        T, eps = run.sde.check_horizon(T, default_sample_eps(run.sde) if eps is None else eps)
    generator = torch.Generator().manual_seed(seed)
    model = _BF16Network(run.model) if precision == "bf16" else run.model
    start = time.perf_counter()
    x0, nfe = sample(model, run.sde, _Shaped(prior, run.shape), T, n=n, eps=eps, sampler=sampler, steps=steps,
                     generator=generator, batch=batch, shard=shard, **options)
    wall = time.perf_counter() - start
    return DrawnSamples(run.scaler.decode(x0.cpu()).numpy(), nfe, wall)


class _BF16Network(torch.nn.Module):
    """The network under bfloat16 autocast, returning float32 (the sampler's updates stay exact)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
            return self.model(x, t).float()


class _Shaped:
    """A prior whose draws are reshaped to the run's example shape, in float32."""

    def __init__(self, prior: Prior, shape: tuple[int, ...]) -> None:
        self.prior, self.shape = prior, shape

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.prior.sample(n, generator=generator).reshape(n, *self.shape).float()


def sampling_defaults(sampler: str | None, spacing: str | None, eps: float | None,
                      sde: SDE) -> tuple[str, str, float]:
    """(sampler, spacing, eps) of a run's samples, the unset ones (None) at the library's defaults
    (difftime.sampling): DEFAULT_SAMPLER; DEFAULT_SPACING for the samplers whose own grid is not
    uniform in t (the classic ones keep theirs unless a spacing is given); and the sampling end time
    ``default_sample_eps(sde)`` = max(DEFAULT_SAMPLE_EPS, sde.eps), as ``sample`` uses."""
    sampler = sampler if sampler is not None else DEFAULT_SAMPLER
    own = default_spacing(sampler)
    if spacing is not None:
        check_spacing(spacing)
    spacing = spacing if spacing is not None else own if own == "time" else DEFAULT_SPACING
    eps = eps if eps is not None else default_sample_eps(sde)
    return sampler, spacing, eps


@full_precision
def likelihood_metrics(
    run: Run,
    priors: Mapping[str, Prior],
    raw: Tensor,
    T: float,
    metrics: tuple[str, ...] = LIKELIHOOD_METRICS,
    **options: Any,
) -> dict[str, dict[str, Any]]:
    """ELBO terms and PF-ODE NLL of ``raw`` examples (data space) in bits/dim, per prior, at one T:
    ``likelihood_across_T`` on a one-point grid (see there for the options and the pairing)."""
    T, _ = run.sde.check_horizon(T, options.get("eps"))
    return likelihood_across_T({T: run}, {T: priors}, raw, metrics, **options).summaries[T]


@dataclass
class LikelihoodAcrossT:
    """Likelihood figures on a grid of T x prior, all on the same examples and draws.

    ``summaries[T][prior]`` holds the per-cell figures (``_likelihood_summary``);
    ``per_example[metric]`` is a (len(Ts), len(priors), n) float64 array of bits/dim per example
    ("elbo", "nll"), so any two cells give a paired difference (``difference``).
    """

    Ts: tuple[float, ...]
    priors: tuple[str, ...]
    summaries: dict[float, dict[str, dict[str, Any]]]
    per_example: dict[str, np.ndarray]
    elbo_design: str
    one_solve: bool

    def difference(self, metric: str, a: tuple[float, str], b: tuple[float, str], level: float = 0.95) -> Difference:
        """Paired bits/dim of cell a = (T, prior) minus cell b, with se and interval."""
        values = self.per_example[metric]
        pick = [values[self.Ts.index(T), self.priors.index(p)] for T, p in (a, b)]
        return paired_difference(pick[0], pick[1], level)


@full_precision
def likelihood_across_T(
    runs: Mapping[float, Run],
    priors: Mapping[float, Mapping[str, Prior]],
    raw: Tensor,
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
    elbo_design: str = "auto",
    n_nll: int | None = None,
    progress: bool = True,
    shard: bool = False,
) -> LikelihoodAcrossT:
    """ELBO terms and PF-ODE NLL of ``raw`` (data space) in bits/dim for every T of ``runs`` (T ->
    the run that serves it) and every prior of ``priors[T]`` (the same names at every T).

    Common random numbers everywhere: every cell sees the same dequantization, the same ELBO draws
    (x_T noise, stratified t-uniforms and z, ``elbo_across_T``) and the same Hutchinson probes, so
    a difference between any two cells is estimated per example with a paired standard error.
    Priors at one T share the network calls: the score term and the PF-ODE solve do not involve
    the prior. When one run serves every T (study mode ``truncate``), one PF-ODE solve from eps to
    max T records x_T and the log-det integral at each T. ``elbo_design`` "auto" is "nested" for
    one run, with len(Ts) n_t draws of t per example (the same network calls as n_t per T, and a
    smaller paired se of adjacent-T differences, measured in ``elbo_across_T``), and
    "inverse_cdf" for a run per T (its draws at T do not depend on the rest of the grid).

    The improvement of a prior nu over the standard one, E log nu(x_T) - E log N(x_T) on shared
    draws, equals KL(p_T||N) - KL(p_T||nu): a measured lower bound on KL(p_T||N). Each run computes
    on its own device (``run.device``, with ``priors`` there too: ``resolve_prior``); every draw
    comes from a CPU generator (difftime.rng's rule) and the per-example figures come back to the CPU.

    ``n_nll`` (default: all) solves the PF-ODE for the first ``n_nll`` examples only: the ELBO
    costs a few network calls per example, the PF-ODE hundreds of forward+VJP calls. ``shard``
    shares the batches of 64 examples among torchrun's ranks (k = rank mod world size); each rank
    replays the others' draws with a zero network, so every figure is the one-process figure.
    """
    unknown = set(metrics) - set(LIKELIHOOD_METRICS)
    if unknown:
        raise DifftimeError(f"unknown likelihood metrics {sorted(unknown)}; expected {LIKELIHOOD_METRICS}")
    Ts = tuple(sorted(runs))
    names = tuple(next(iter(priors.values()))) if priors else ()
    if not names or set(priors) != set(Ts) or any(tuple(priors[T]) != names for T in Ts):
        raise DifftimeError("likelihood_across_T needs the same non-empty set of priors at every T of the runs")
    run0 = runs[Ts[0]]
    one_run = all(runs[T] is run0 for T in Ts)
    design = ("nested" if one_run and len(Ts) > 1 else "inverse_cdf") if elbo_design == "auto" else elbo_design
    if design == "nested" and not one_run:
        raise DifftimeError("the nested ELBO design needs one network for every T; use inverse_cdf")
    sde, scaler = run0.sde, run0.scaler
    checked = [sde.check_horizon(T, eps) for T in Ts]
    eps = checked[0][1]
    d = math.prod(run0.shape)
    levels, a = scaler.levels, scaler.a
    repeats = dequant_repeats if levels is not None else 1
    dequant_gen, elbo_gen, ode_gen = (torch.Generator().manual_seed(stream_seed(seed, k)) for k in range(3))
    standard = {T: StandardPrior.for_sde(sde, T, run0.shape) for T in Ts}
    n = len(raw)
    n_nll = n if n_nll is None else n_nll
    if not 2 <= n_nll <= n:
        raise DifftimeError(f"n_nll must be between 2 and the {n} examples, got {n_nll}")
    keys = ("elbo", "prior", "score", "constant", "nll", "improvement")
    chunks = [(r, s) for r in range(repeats) for s in range(0, n, batch)]
    label = f"T={Ts[0]:g}" if len(Ts) == 1 else f"T={Ts[0]:g}..{Ts[-1]:g}"
    bar = tqdm(total=len(chunks), desc=f"likelihood {label} {', '.join(names)}", disable=not progress, unit="batch")
    zero = {T: dataclasses.replace(run, model=zero_eps) for T, run in runs.items()}

    def chunk(k: int, live: bool = True) -> tuple[dict, list[float]]:
        """One batch's per-example terms (nats, on the CPU) and PF-ODE NFEs. ``live=False`` replays
        its random draws with a zero network (every draw depends on shapes only) and keeps nothing."""
        start = chunks[k][1]
        use, use_priors = (runs, priors) if live else (zero, {T: {"standard": standard[T]} for T in Ts})
        per = {(T, p): {key: [] for key in keys} for T in Ts for p in use_priors[Ts[0]]}
        nfes: list[float] = []
        x = scaler.encode(raw[start:start + batch], generator=dequant_gen)
        if "elbo" in metrics:
            _elbo_batch(use, Ts, use_priors, standard, x, per, elbo_gen, one_run, design, n_t=n_t, n_prior=n_prior,
                        eps=eps)
        if "nll" in metrics and start < n_nll:
            solves = [(Ts, use[Ts[0]])] if one_run else [((T,), use[T]) for T in Ts]
            probes = ode_gen.get_state()
            x_nll = x[: n_nll - start]
            for grid, run in solves if live else solves[-1:]:
                ode_gen.set_state(probes)  # the same Hutchinson probes for every solve
                x_T, integral, nfe = ode_flow(run.model, sde, x_nll.to(run.device),
                                              list(grid) if len(grid) > 1 else grid[0],
                                              eps=eps, rtol=rtol, atol=atol, divergence=divergence,
                                              generator=ode_gen)
                if not live:
                    continue
                if len(grid) == 1:
                    x_T, integral = x_T[None], integral[None]
                nfes.append(float(nfe))
                with torch.no_grad():
                    for j, T in enumerate(grid):
                        for p in names:
                            per[T, p]["nll"].append((priors[T][p].log_prob(x_T[j]).double()
                                                     + integral[j].double()).cpu())
        bar.update(1)
        return per, nfes

    with bar:
        parts = (distributed.deal(len(chunks), chunk, functools.partial(chunk, live=False)) if shard
                 else [chunk(k) for k in range(len(chunks))])
    per = {(T, p): {key: [v for part, _ in parts for v in part[T, p][key]] for key in keys} for T in Ts for p in names}
    nfes = [nfe for _, part_nfes in parts for nfe in part_nfes]
    nfe_mean = sum(nfes) / len(nfes) if nfes else math.nan
    summaries = {T: {p: _likelihood_summary(per[T, p], [nfe_mean], p, metrics, T, eps, n, n_nll, repeats, d,
                                            levels, a,
                                            n_t=n_t, n_prior=n_prior, rtol=rtol, atol=atol, divergence=divergence,
                                            design=design, one_solve=one_run and len(Ts) > 1)
                     for p in names} for T in Ts}
    per_example = {m: np.stack([np.stack([_per_example_bits(per[T, p], m, repeats, n if m == "elbo" else n_nll, d,
                                                            levels, a) for p in names])
                                for T in Ts]) for m in metrics}
    return LikelihoodAcrossT(Ts=Ts, priors=names, summaries=summaries, per_example=per_example, elbo_design=design,
                             one_solve=one_run and len(Ts) > 1)


def _elbo_batch(runs: Mapping[float, Run], Ts: tuple[float, ...], priors: Mapping[float, Mapping[str, Prior]],
                standard: Mapping[float, Prior], x: Tensor, per: dict, generator: torch.Generator, one_run: bool,
                design: str, *, n_t: int, n_prior: int, eps: float) -> None:
    """The ELBO terms of one batch for every T and prior, appended to ``per`` (nats per example)."""
    sde = runs[Ts[0]].sde
    names = tuple(priors[Ts[0]])
    start = generator.get_state()
    if one_run:
        groups = [(Ts, runs[Ts[0]])]
        draws_t = n_t * len(Ts) if design == "nested" else n_t
    else:
        groups = [((T,), runs[T]) for T in Ts]
        draws_t = n_t
    end = None
    for grid, run in groups:
        generator.set_state(start)  # every group (a network per T) starts from the same draws
        x_run = x.to(run.device)
        with torch.no_grad():
            base = elbo_across_T(run.model, sde, x_run, {T: standard[T] for T in grid}, grid, eps=eps, n_t=draws_t,
                                 n_prior=n_prior, generator=generator, design=design)
        end = generator.get_state()
        for p in names:
            generator.set_state(start)
            terms = base if p == "standard" else base.with_prior(
                prior_draws_across_T(sde, x_run, {T: priors[T][p] for T in grid}, grid, n_prior=n_prior,
                                     generator=generator))
            for k, T in enumerate(grid):
                cell = per[T, p]
                for key, value in (("elbo", terms.total[k]), ("prior", terms.prior[k]), ("score", terms.score[k]),
                                   ("constant", terms.constant[k])):
                    cell[key].append(value.cpu())
                if p != "standard":
                    cell["improvement"].append((terms.prior[k] - base.prior[k]).cpu())
    generator.set_state(end)


def _per_example_bits(per: dict[str, list[Tensor]], metric: str, repeats: int, n: int, d: int, levels: int | None,
                      a: float) -> np.ndarray:
    """Bits/dim per example (dequantization repeats averaged) of ``metric`` "elbo" or "nll"."""
    nats = torch.cat(per[metric]).detach().reshape(repeats, n).mean(0)
    return np.asarray(bits_per_dim(nats, d, levels, a), dtype=np.float64)


def _likelihood_summary(per_metric: dict[str, list[Tensor]], nfes: list[float], prior_name: str,
                        metrics: tuple[str, ...], T: float, eps: float, n: int, n_nll: int, repeats: int, d: int,
                        levels: int | None, a: float, **settings: Any) -> dict[str, Any]:
    def per_example(key: str) -> Tensor:
        """Average the dequantization repeats of each example: one value per example."""
        return torch.cat(per_metric[key]).reshape(repeats, n_nll if key == "nll" else n).mean(0)

    def to_bits(nats: Tensor, offset: bool = True) -> Tensor:
        bits = -nats / (d * math.log(2))
        return bits_per_dim(nats, d, levels, a) if offset else bits

    result: dict[str, Any] = {"T": T, "eps": eps, "prior": prior_name, "n": n, "dequant_repeats": repeats,
                              "dim": d, "levels": levels, "a": a}
    if "elbo" in metrics:
        total = per_example("elbo")
        bpd, bpd_se = mean_se(to_bits(total))
        result["elbo"] = {
            "bpd": bpd, "bpd_se": bpd_se, "nats": mean_se(total)[0],
            # Additive contributions to the bits/dim: prior + score + constant + dequantization = bpd.
            "prior_bpd": mean_se(to_bits(per_example("prior"), offset=False))[0],
            "score_bpd": mean_se(-to_bits(per_example("score"), offset=False))[0],
            "constant_bpd": mean_se(to_bits(per_example("constant"), offset=False))[0],
            "dequantization_bpd": float(bits_per_dim(0.0, d, levels, a)),
            "prior_nats": mean_se(per_example("prior"))[0],
            "score_nats": mean_se(per_example("score"))[0],
            "constant_nats": mean_se(per_example("constant"))[0],
            "n_t": settings["n_t"], "n_prior": settings["n_prior"], "design": settings["design"],
        }
        if per_metric["improvement"]:
            mean, se = mean_se(per_example("improvement"))
            result["prior_improvement"] = {"nats": mean, "se": se, "bpd": mean / (d * math.log(2)),
                                           "meaning": "E log nu(x_T) - E log N(x_T): a lower bound on KL(p_T||N)"}
    if "nll" in metrics:
        logp = per_example("nll")
        bpd, bpd_se = mean_se(to_bits(logp))
        result["nll"] = {"bpd": bpd, "bpd_se": bpd_se, "nats": -mean_se(logp)[0], "n": n_nll,
                         "nfe_mean": sum(nfes) / len(nfes), "rtol": settings["rtol"], "atol": settings["atol"],
                         "divergence": settings["divergence"], "one_solve": settings["one_solve"]}
    return result


def evaluation_table(r: dict[str, Any]) -> str:
    """The text table ``difftime evaluate`` prints for one result: its likelihoods in bits/dim, the prior
    improvement and the sample quality, each with its standard error where it has one."""
    rows = [f"T={r['T']:g}  eps={r['eps']:g}  prior={r['prior']}  n={r['n']}"
            f"  dequant repeats={r.get('dequant_repeats', '-')}"]
    if "elbo" in r:
        e = r["elbo"]
        rows.append(f"  ELBO bits/dim   {e['bpd']:8.4f} +- {e['bpd_se']:.4f}   = prior {e['prior_bpd']:.4f}"
                    f" + score {e['score_bpd']:.4f} + constant {e['constant_bpd']:.4f}"
                    f" + dequantization {e['dequantization_bpd']:.4f}")
    if "nll" in r:
        q = r["nll"]
        rows.append(f"  PF-ODE bits/dim {q['bpd']:8.4f} +- {q['bpd_se']:.4f}   (mean NFE {q['nfe_mean']:.0f},"
                    f" tol {q['rtol']:g})")
    if "prior_improvement" in r:
        p = r["prior_improvement"]
        rows.append(f"  prior improvement E log nu - E log N = {p['nats']:.3f} +- {p['se']:.3f} nats"
                    f" (a lower bound on KL(p_T || N))")
    if "quality" in r:
        from difftime.metrics import METRICS

        s = r["sampling"]
        rows.append(f"  samples: n={s['n']}  sampler={s['sampler']}  NFE={s['nfe']}  wall {s['wall_s']:.1f} s")
        for name, value in r["quality"].items():
            if isinstance(value, dict) and name in METRICS:
                shown = ", ".join(f"{k}={v:.4g}" for k, v in value.items()
                                  if isinstance(v, float) and k in ("value", "std", "se", "precision", "recall"))
                rows.append(f"  {name:4s} {shown}  (reference: {r['quality'].get('reference_split')} split,"
                            f" n={r['quality'].get('n_reference')})")
    return "\n".join(rows)


def data_variances(run: Run, n: int = 10_000, floor: float = 1e-8) -> Tensor:
    """The eigenvalues of the run's training data covariance in model space (at most ``n`` examples,
    the first ones), floored at ``floor``: the spectrum the ``gaussian`` grid optimizer fits to."""
    from difftime.data import load_data

    dataset = load_data(run.config["resolved"]["data"], seed=run.seed)
    x = run.scaler.encode(dataset.train[:n], generator=torch.Generator().manual_seed(run.seed)).flatten(1).double()
    return torch.linalg.eigvalsh(torch.cov(x.T)).clamp_min(floor)


def optimize_grid(run: Run, prior: Prior, T: float, sampler: str, nfe: int, method: str, *,
                  eps: float | None = None, seed: int = 0, precision: str = "fp32", denoise: bool = True,
                  **options: Any) -> TimeGrid:
    """A :class:`difftime.gridopt.TimeGrid` for the run's sampler at ``nfe`` from ``prior`` at T:
    ``gaussian`` on the data's covariance spectrum (:func:`data_variances`; the prior is not used),
    or ``gits`` with a teacher drawn from ``prior`` by ``seed`` (``options``: n, fine_steps, substeps,
    batch, cost_order). ``precision`` "bf16" runs the teacher's network under bfloat16 autocast."""
    if method not in GRID_METHODS:
        raise DifftimeError(f"unknown grid method {method!r}; choose from {', '.join(GRID_METHODS)}")
    if precision not in SAMPLE_PRECISIONS:
        raise DifftimeError(f"precision must be one of {', '.join(SAMPLE_PRECISIONS)}, got {precision!r}")
    T, eps = run.sde.check_horizon(T, default_sample_eps(run.sde) if eps is None else eps)
    if method == "gaussian":
        return gaussian_grid(run.sde, T, eps, nfe, sampler, variances=data_variances(run), denoise=denoise)
    model = _BF16Network(run.model) if precision == "bf16" else run.model
    return gits_grid(model, run.sde, _Shaped(prior, run.shape), T, eps, nfe, sampler,
                     generator=torch.Generator().manual_seed(seed), denoise=denoise, **options)
