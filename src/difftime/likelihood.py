"""Likelihoods: the ELBO split into its terms, and exact log-densities through the PF-ODE.

All log-likelihoods are in nats per example, for x in model space. ``bits_per_dim`` turns them
into bits/dim of the original discrete data using the dequantization facts the scaler recorded.
Every estimator here runs in float32 with autocast switched off, also inside a caller's bf16
autocast (training's mixed precision never reaches a likelihood).

One argument rule, shared with ``difftime.sampling.sample`` (docs/design.md §5): the leading
positionals are (model, sde, x, prior, T), the prior just before the horizon it belongs to
(``ode_flow`` has no prior: (model, sde, x, T)); everything else is keyword-only. The PF-ODE
results are NamedTuples with shared field names: ``FlowResult(x_T, integral, nfe)`` and
``LikelihoodResult(log_p, x_T, nfe)``, the values first and the NFE last.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import torch
from torch import Tensor, nn

from difftime.errors import DifftimeError
from difftime.ode import DIVERGENCES, ERROR_CONTROLS, ODE_METHODS, ODEOptions, resolve_divergence, solve_rk
from difftime.rng import rand_on, randint_on, randn_on
from difftime.sde import SDE
from difftime.stats import Difference, paired_difference, row_standard_errors

if TYPE_CHECKING:
    from difftime.priors.base import Prior

F = TypeVar("F", bound=Callable)


def full_precision(fn: F) -> F:
    """Run ``fn`` with CPU and CUDA autocast disabled, so a caller's bf16 region cannot lower its precision."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            for device in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
                stack.enter_context(torch.autocast(device, enabled=False))
            return fn(*args, **kwargs)

    return run  # type: ignore[return-value]


def bits_per_dim(log_likelihood_nats: Tensor | float, d: int, levels: int | None, a: float) -> Tensor | float:
    """bpd = -log p_x(x) / (d ln 2) - log2(a) + log2(L) for dequantized data x = a (k + u)/L + b.

    For continuous data (``levels`` None) this is -log p / (d ln 2): bits per dimension of x itself.

    ``log_likelihood_nats`` is log p(x) in nats per example (a tensor or a float), ``d`` the number
    of dimensions of one example, ``levels`` the L of the discrete data and ``a`` the scale of the
    scaler's affine map (docs/design.md §6). Returns the same type as ``log_likelihood_nats``.

    >>> from difftime.likelihood import bits_per_dim
    >>> round(bits_per_dim(-100.0, d=64, levels=17, a=2.0), 4)   # 8x8 digits in [-1, 1], L = 17
    5.3417
    >>> round(bits_per_dim(-100.0, d=64, levels=None, a=1.0), 4)  # continuous data
    2.2542
    """
    bpd = -log_likelihood_nats / (d * math.log(2))
    if levels is not None:
        bpd = bpd - math.log2(a) + math.log2(levels)
    return bpd


@dataclass
class ElboTerms:
    """Per-example estimates (shape (B,)), in nats; ``*_se`` are Monte Carlo standard errors.

    total = prior - score + constant, where
      prior    = E_z log nu(x_T)                                        (P)
      score    = 1/2 int_eps^T (g^2/v) E||eps_hat(x_t, t) - z||^2 dt    (I)
      constant = d/2 ln(v(T) / v(eps))                                  (R)
    """

    prior: Tensor
    score: Tensor
    constant: Tensor
    total: Tensor
    prior_se: Tensor
    score_se: Tensor
    total_se: Tensor


def _normal_draws(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor, chunk: int) -> Tensor:
    """Standard normals of ``shape``, drawn ``chunk`` rows at a time (the stream ``elbo`` has always used)."""
    return torch.cat([randn_on((min(chunk, shape[0] - start), *shape[1:]), generator, dtype=like.dtype,
                               device=like.device)
                      for start in range(0, shape[0], chunk)])


def _log_prior_draws(sde: SDE, prior: Prior, x: Tensor, T: float, z: Tensor, chunk: int) -> Tensor:
    """log nu(x_T) at x_T = m(T) x + sigma(T) z, for n draws of z per example (rows example-major): (B, n)."""
    reps = x.repeat_interleave(len(z) // len(x), dim=0)
    tT = torch.full((len(reps),), T, dtype=x.dtype, device=x.device)
    logs = []
    for start in range(0, len(reps), chunk):
        end = start + chunk
        xT, _ = sde.marginal_sample(reps[start:end], tT[start:end], z=z[start:end])
        logs.append(prior.log_prob(xT).to(torch.float64))
    return torch.cat(logs).reshape(len(x), -1)


def _score_excess(model: nn.Module, sde: SDE, x: Tensor, t: Tensor, chunk: int,
                  z: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """||eps_hat(x_t, t) - z||^2 - d at x_t = m(t) x + sigma(t) z, n (t, z) per example: (B, n) in float64.

    The z are given, or drawn ``chunk`` rows at a time from ``generator``.
    """
    reps = x.repeat_interleave(len(t) // len(x), dim=0)
    d = x[0].numel()
    excess = []
    with torch.no_grad():
        for start in range(0, len(reps), chunk):
            end = start + chunk
            xt, zz = sde.marginal_sample(reps[start:end], t[start:end], generator,
                                         z=None if z is None else z[start:end])
            eps_hat = model(xt, t[start:end]).to(zz.dtype)
            excess.append(((eps_hat - zz).pow(2).flatten(1).sum(1) - d).to(torch.float64))
    return torch.cat(excess).reshape(len(x), -1)


def _elbo_constant(sde: SDE, T: float, eps: float, d: int) -> float:
    """R(T) = d/2 ln(v(T) / v(eps))."""
    v = sde.v(torch.tensor([eps, T], dtype=torch.float64))
    return 0.5 * d * math.log(v[1] / v[0])


@full_precision
def elbo(
    model: nn.Module,
    sde: SDE,
    x: Tensor,
    prior: Prior,
    T: float,
    *,
    eps: float | None = None,
    n_t: int = 64,
    n_prior: int = 8,
    chunk: int = 4096,
    generator: torch.Generator | None = None,
) -> ElboTerms:
    """Estimate the ELBO of each example of ``x`` and its three terms.

    The score term is estimated in the stable form: with t drawn with density g^2/(v Z) and
    one z per t, (Z/2) (||eps_hat - z||^2 - d) has the same mean as I - dZ/2 but no part that
    diverges as eps -> 0; the deterministic dZ/2 is added back exactly. ``n_t`` (t, z) pairs per
    example estimate it, ``n_prior`` draws of x_T estimate P; ``chunk`` bounds the network batch.
    To compare several T on common random numbers, use ``elbo_across_T``.

    ``model(x, t) -> eps_hat`` is the eps-network, ``x`` (B, ...) the examples in model space,
    ``prior`` any object with ``log_prob`` (the :class:`difftime.priors.Prior` protocol) at horizon
    ``T``, and ``eps`` the start of the horizon (default ``sde.eps``). ``generator`` drives every
    draw. Returns :class:`ElboTerms`: ``total = prior - score + constant`` per example, in nats,
    each with its Monte Carlo se. The decomposition is docs/design.md §3, the paper's lemma
    (https://arxiv.org/abs/2206.05173); the ELBO of score SDEs is from
    https://arxiv.org/abs/2011.13456.

    >>> import math, torch
    >>> import difftime as dt
    >>> sde = dt.VPSDE()
    >>> exact = lambda x, t: sde.sigma(t)[:, None] * x   # the exact eps-network for data N(0, I)
    >>> x = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    >>> terms = dt.elbo(exact, sde, x, dt.StandardPrior((2,), 1.0), 1.0, n_t=8, n_prior=4,
    ...                 generator=torch.Generator().manual_seed(0))
    >>> terms.total.shape, terms.total_se.shape
    (torch.Size([2]), torch.Size([2]))
    >>> bool(torch.allclose(terms.total, terms.prior - terms.score + terms.constant))
    True
    >>> v_eps, v_T = sde.v(torch.tensor([1e-5, 1.0], dtype=torch.float64)).tolist()
    >>> abs(float(terms.constant[0]) - 2 / 2 * math.log(v_T / v_eps)) < 1e-6   # R = d/2 ln(v(T)/v(eps))
    True
    """
    T, eps = sde.check_horizon(T, eps)
    B = len(x)
    d = x[0].numel()
    Z = sde.importance_Z(T, eps)

    # Prior term: E_z log nu(m(T) x + sigma(T) z).
    z_prior = _normal_draws((B * n_prior, *x.shape[1:]), generator, x, chunk)
    prior_draws = _log_prior_draws(sde, prior, x, T, z_prior, chunk)

    # Score term, importance-sampled in t.
    u = rand_on(B * n_t, generator, dtype=torch.float64, device=x.device)
    t = sde.importance_sample_t(u, T, eps).to(x.dtype)
    score_draws = 0.5 * Z * _score_excess(model, sde, x, t, chunk, generator=generator)

    prior_term = prior_draws.mean(1)
    score = score_draws.mean(1) + 0.5 * d * Z
    constant = torch.full_like(prior_term, _elbo_constant(sde, T, eps, d))
    total = prior_term - score + constant
    prior_se, score_se = row_standard_errors(prior_draws), row_standard_errors(score_draws)
    return ElboTerms(prior=prior_term, score=score, constant=constant, total=total,
                     prior_se=prior_se, score_se=score_se,
                     total_se=(prior_se**2 + score_se**2).sqrt())


ELBO_DESIGNS = ("inverse_cdf", "nested")


@dataclass
class ElboAcrossT:
    """Per-example ELBO terms on a grid of T, all from one set of draws per example: (len(Ts), B) each.

    Row k belongs to ``Ts[k]``; the fields mean what ``ElboTerms``' do. Because every T used the
    same draws, ``total[i] - total[j]`` is a per-example difference whose spread over the
    examples gives a paired standard error (``difference``). The ``*_se`` are per-example Monte
    Carlo errors, computed as for independent draws: an upper bound for stratified draws.
    """

    Ts: tuple[float, ...]
    design: str
    prior: Tensor
    score: Tensor
    constant: Tensor
    total: Tensor
    prior_se: Tensor
    score_se: Tensor
    total_se: Tensor

    def terms(self, k: int) -> ElboTerms:
        """The ``ElboTerms`` of ``Ts[k]``."""
        return ElboTerms(prior=self.prior[k], score=self.score[k], constant=self.constant[k], total=self.total[k],
                         prior_se=self.prior_se[k], score_se=self.score_se[k], total_se=self.total_se[k])

    def difference(self, i: int, j: int, term: str = "total", level: float = 0.95) -> Difference:
        """Paired mean over the examples of ``term`` at Ts[i] minus at Ts[j], with se and interval."""
        values = getattr(self, term)
        return paired_difference(values[i], values[j], level)

    def with_prior(self, prior_draws: Tensor) -> ElboAcrossT:
        """The same estimate with another prior: ``prior_draws`` (len(Ts), B, n_prior) from
        ``prior_draws_across_T`` on the generator state this estimate started from, so the new
        prior sees the same x_T draws and the score term (the network calls) is reused."""
        prior_term = prior_draws.mean(-1)
        prior_se = row_standard_errors(prior_draws)
        return replace(self, prior=prior_term, total=prior_term - self.score + self.constant, prior_se=prior_se,
                       total_se=(prior_se**2 + self.score_se**2).sqrt())


def _prior_at(priors: Any, T: float) -> Prior:
    if isinstance(priors, Mapping):
        if T not in priors:
            raise DifftimeError(f"no prior for T={T:g}; priors has T = {sorted(priors)}")
        return priors[T]
    if hasattr(priors, "log_prob") and not isinstance(priors, type):  # one prior object (a class is a factory)
        return priors
    if callable(priors):
        return priors(T)
    raise DifftimeError("priors must map T to a prior, be a callable T -> prior, or be one prior with log_prob")


@full_precision
def prior_draws_across_T(sde: SDE, x: Tensor, priors: Any, Ts: Sequence[float], *, n_prior: int = 8,
                         chunk: int = 4096, generator: torch.Generator | None = None) -> Tensor:
    """log nu_T(m(T) x + sigma(T) z) for ``n_prior`` noises z per example, the same z at every T:
    (len(Ts), B, n_prior). These are the first draws ``elbo_across_T`` makes, so from the same
    generator state they give its prior term for any other ``priors`` (``ElboAcrossT.with_prior``)."""
    z = _normal_draws((len(x) * n_prior, *x.shape[1:]), generator, x, chunk)
    return torch.stack([_log_prior_draws(sde, _prior_at(priors, T), x, T, z, chunk) for T in Ts])


@full_precision
def elbo_across_T(
    model: nn.Module,
    sde: SDE,
    x: Tensor,
    priors: Any,
    Ts: Sequence[float],
    *,
    eps: float | None = None,
    n_t: int = 64,
    n_prior: int = 8,
    chunk: int = 4096,
    generator: torch.Generator | None = None,
    design: str = "inverse_cdf",
) -> ElboAcrossT:
    """The ELBO of each example of ``x`` at every T of ``Ts``, on common random numbers.

    One set of draws per example serves every T: stratified uniforms u_j = (j + U_j)/n_t, one
    noise z_j per j, and ``n_prior`` noises z for x_T = m(T) x + sigma(T) z (the same z at every
    T); the dequantization is shared by passing one ``x``. ``priors`` maps each T to a prior (a
    key per element of ``Ts``), or is a callable T -> prior, or one prior for every T. The
    stable form and the exact constant are ``elbo``'s. Designs for the score term:

    - ``"inverse_cdf"`` (default): t_j = F_T^{-1}(u_j) through each T's own importance CDF, and
      stable part Z(T)/2 mean_j (||eps_hat - z_j||^2 - d). len(Ts) n_t network calls per example.
      Each row is an ordinary stratified estimate at its own T and, for the same generator
      state, B, n_t, n_prior and chunk, does not depend on the rest of the grid: separate calls
      (one network per T, a grid extended later) share the draws too.
    - ``"nested"``: t_j = F_{T_max}^{-1}(u_j) once, and Z(T_max)/2 mean_j 1[t_j <= T] (...) for
      every T. n_t network calls per example in all, but the number of draws inside [eps, T] is
      random, so differences are noisier at equal n_t; at T_max it equals ``"inverse_cdf"``.

    For the paired se of adjacent-T differences, ``"inverse_cdf"`` is the better design at equal
    n_t and ``"nested"`` at equal network calls with one network, because it needs no calls per T
    (measured: docs/design.md §6).
    """
    if design not in ELBO_DESIGNS:
        raise DifftimeError(f"design must be one of {ELBO_DESIGNS}, got {design!r}")
    if len(Ts) == 0:
        raise DifftimeError("Ts must hold at least one T")
    checked = [sde.check_horizon(T, eps) for T in Ts]
    eps = checked[0][1]
    grid = tuple(T for T, _ in checked)
    B, d = len(x), x[0].numel()

    # The common random numbers, one set per example; the x_T noise comes first (prior_draws_across_T).
    prior_draws = prior_draws_across_T(sde, x, priors, grid, n_prior=n_prior, chunk=chunk, generator=generator)
    strata = torch.arange(n_t, dtype=torch.float64, device=x.device).repeat(B)
    u = (strata + rand_on(B * n_t, generator, dtype=torch.float64, device=x.device)) / n_t
    z = _normal_draws((B * n_t, *x.shape[1:]), generator, x, chunk)

    Zs = [sde.importance_Z(T, eps) for T in grid]
    if design == "inverse_cdf":
        score_draws = [0.5 * Z * _score_excess(model, sde, x, sde.importance_sample_t(u, T, eps).to(x.dtype), chunk, z)
                       for T, Z in zip(grid, Zs, strict=True)]
    else:
        T_max = max(grid)
        t = sde.importance_sample_t(u, T_max, eps)
        excess = 0.5 * sde.importance_Z(T_max, eps) * _score_excess(model, sde, x, t.to(x.dtype), chunk, z)
        score_draws = [excess * (t <= T).reshape(B, n_t) for T in grid]
    score_draws = torch.stack(score_draws)

    prior_term = prior_draws.mean(-1)
    score = score_draws.mean(-1) + 0.5 * d * torch.tensor(Zs, dtype=torch.float64, device=x.device)[:, None]
    constant = torch.tensor([_elbo_constant(sde, T, eps, d) for T in grid], dtype=torch.float64,
                            device=x.device)[:, None].expand(-1, B)
    total = prior_term - score + constant
    prior_se, score_se = row_standard_errors(prior_draws), row_standard_errors(score_draws)
    return ElboAcrossT(Ts=grid, design=design, prior=prior_term, score=score, constant=constant.clone(), total=total,
                       prior_se=prior_se, score_se=score_se, total_se=(prior_se**2 + score_se**2).sqrt())


def _divergence_exact(f: Tensor, x: Tensor, max_rows: int = 1024) -> Tensor:
    """div_x f per example, exactly: the trace of the Jacobian from d basis VJPs.

    The VJPs are batched (``is_grads_batched``, i.e. vmap over the cotangents) in groups of at
    most ``max_rows`` (direction, example) pairs, so one backward pass serves many directions.
    ``f`` must still hold its graph; it is kept (the caller lets it go).
    """
    n, d = len(x), x[0].numel()
    div = torch.zeros(n, dtype=x.dtype, device=x.device)
    per = max(1, min(d, max_rows // max(n, 1)))
    for start in range(0, d, per):
        k = min(per, d - start)
        rows = torch.arange(k, device=x.device)
        cols = torch.arange(start, start + k, device=x.device)
        cot = torch.zeros(k, n, d, dtype=f.dtype, device=x.device)
        cot[rows, :, cols] = 1
        grads = torch.autograd.grad(f, x, cot.reshape(k, *f.shape), retain_graph=True, is_grads_batched=True)[0]
        div = div + grads.reshape(k, n, d)[rows, :, cols].sum(0).to(x.dtype)
    return div


# --- the probability-flow ODE -------------------------------------------------------------------


class FlowResult(NamedTuple):
    """What ``ode_flow`` returns; with several horizons each value gains a leading (len(T),) axis."""

    x_T: Tensor  # the PF-ODE flow of x at T: (B, ...)
    integral: Tensor  # int_eps^T div F(x_t, t) dt per example: (B,)
    nfe: int  # network calls (each one forward pass and its VJPs)


class LikelihoodResult(NamedTuple):
    """What ``ode_log_likelihood`` returns; with several horizons each value gains a leading (len(T),) axis."""

    log_p: Tensor  # log p_eps(x) = log nu(x_T) + integral, per example: (B,)
    x_T: Tensor  # the PF-ODE flow of x at T: (B, ...)
    nfe: int  # network calls (each one forward pass and its VJPs)

ODE_VARIABLES = ("logsnr", "t", "log_sigma")


def _t_from_log_sigma(sde: SDE, u: Tensor) -> Tensor:
    """The t with log sigma(t) = u, in closed form for the library's SDEs."""
    from difftime.sde import VESDE, VPSDE, SubVPSDE

    if isinstance(sde, VPSDE):  # v = 1 - e^-B
        return sde.B_inverse(-torch.log1p(-torch.exp(2 * u)))
    if isinstance(sde, SubVPSDE):  # sigma = 1 - e^-B
        return sde.B_inverse(-torch.log1p(-torch.exp(u)))
    if isinstance(sde, VESDE):  # v = smin^2 expm1(2 r t), i.e. lambda = -log sigma
        return sde.t_from_log_snr(-u)
    raise DifftimeError(f"variable 'log_sigma' has no closed-form inverse for {type(sde).__name__}; use 'logsnr'")


class _Variable:
    """An increasing integration variable s(t) of the PF-ODE, its inverse and dt/ds (float64).

    "t": s = t. "logsnr": s = -lambda(t) = log(sigma/m), so dt/ds = 2 v / g^2 (d lambda/dt =
    -g^2 / (2 v) for every linear-drift SDE). "log_sigma": s = log sigma(t), dt/ds = 2 v / (dv/dt)
    with dv/dt = 2 alpha v + g^2.
    """

    def __init__(self, sde: SDE, name: str) -> None:
        if name not in ODE_VARIABLES:
            raise DifftimeError(f"variable must be one of {ODE_VARIABLES}, got {name!r}")
        self.sde, self.name = sde, name

    def of_t(self, t: Tensor) -> Tensor:
        if self.name == "t":
            return t
        if self.name == "logsnr":
            return -self.sde.log_snr(t)
        return 0.5 * torch.log(self.sde.v(t))

    def t_of(self, s: Tensor) -> Tensor:
        if self.name == "t":
            return s
        if self.name == "logsnr":
            return self.sde.t_from_log_snr(-s)
        return _t_from_log_sigma(self.sde, s)

    def coefficients(self, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(t, a, b) with dx/ds = a x + b eps_hat(x, t), i.e. a = alpha dt/ds, b = g^2 / (2 sigma) dt/ds."""
        sde = self.sde
        t = self.t_of(s)
        alpha, g2, v = sde.alpha(t), sde.g2(t), sde.v(t)
        if self.name == "t":
            dt_ds = torch.ones_like(t)
        elif self.name == "logsnr":
            dt_ds = 2 * v / g2
        else:
            dt_ds = 2 * v / (2 * alpha * v + g2)
        return t, alpha * dt_ds, 0.5 * g2 / v.sqrt() * dt_ds


def _eps_and_divergence(model: nn.Module, x: Tensor, t: Tensor, divergence: str,
                        probes: Tensor | None) -> tuple[Tensor, Tensor]:
    """eps_hat(x, t) and its divergence in x: one forward pass, then one VJP per Hutchinson probe
    (``probes`` is (B, ...) for one, (K, B, ...) for K) or the exact trace.

    Several probes take one backward pass each through the kept graph rather than one vmapped
    backward (``is_grads_batched``) over the K cotangents, and the exact trace, with its d
    directions, takes the vmapped one: both chosen by measurement on CPU (docs/design.md §6).
    """
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        eps_hat = model(xg, t).to(x.dtype)
        if divergence == "exact":
            div = _divergence_exact(eps_hat, xg)
        else:
            many = probes.dim() > x.dim()
            div = torch.zeros(len(x), dtype=x.dtype, device=x.device)
            for k, probe in enumerate(probes if many else [probes]):
                last = not many or k == len(probes) - 1
                vjp = torch.autograd.grad(eps_hat, xg, probe, retain_graph=not last)[0]
                div = div + (vjp * probe).flatten(1).sum(1)
            if many:
                div = div / len(probes)
    return eps_hat.detach(), div.detach()


def _horizons(sde: SDE, T, eps: float | None) -> tuple[list[float], float, bool]:
    """(the horizons as floats, eps, whether T was one number); several must be strictly increasing."""
    import numbers

    single = isinstance(T, numbers.Real) or (isinstance(T, Tensor) and T.dim() == 0)
    values = [float(T)] if single else [float(v) for v in T]
    if not values:
        raise DifftimeError("T must be a number or a non-empty sequence of numbers")
    checked = [sde.check_horizon(v, eps) for v in values]
    if any(b <= a for a, b in zip(values, values[1:], strict=False)):
        raise DifftimeError(f"several horizons T must be strictly increasing, got {values}")
    return [v for v, _ in checked], checked[0][1], single


@full_precision
def ode_flow(
    model: nn.Module,
    sde: SDE,
    x: Tensor,
    T: float | Sequence[float],
    *,
    eps: float | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    divergence: str = "auto",
    noise: str = "rademacher",
    generator: torch.Generator | None = None,
    variable: str = "t",
    method: str = "bosh3",
    error_control: str = "example",
    n_probes: int = 1,
) -> FlowResult:
    """Solve the PF-ODE from x = x_eps up to T: returns ``FlowResult(x_T, integral, nfe)``, the
    integral being int_eps^T div F(x_t, t) dt.

    The solve does not involve the prior, so one solve serves every prior at T: log p_eps(x) =
    log nu(x_T) + the integral. ``divergence`` is "exact" (the trace from d batched VJPs per
    evaluation), "hutchinson" (``n_probes`` probe vectors, drawn once and fixed for the whole
    solve, so the integral is one unbiased estimate; one forward pass and one VJP per probe per
    evaluation), or "auto" (exact up to d = 16).

    ``T`` may also be a strictly increasing sequence of horizons (truncate mode): one solve from
    eps to max(T) lands on each and returns x_T stacked as (len(T), B, ...) and the integrals as
    (len(T), B), with the same probes for every T.

    The solver is an embedded Runge-Kutta pair, ``method`` "bosh3" (Bogacki-Shampine 3(2), 3 network
    calls a step; the default) or "dopri5" (Dormand-Prince 5(4), 6 a step), in the integration
    variable ``variable``: "t" (the default), "logsnr" (s = -lambda(t) = log(sigma/m)) or
    "log_sigma" (s = log sigma(t)). With dt/ds the Jacobian of the change, dx/ds = F(x, t(s)) dt/ds
    and the log-det integrand is div F dt/ds; its part d alpha(t) is integrated in closed form, so
    every variable gives the same log p. On trained image models the network's Fourier time
    features (periods down to 1e-3 in t) make the flow rough at every t, not only stiff near eps:
    there the third-order pair in t needs fewer evaluations than the fifth-order pair for the same
    accuracy, and log-SNR gains nothing, hence the defaults (measured: docs/design.md §6).

    ``error_control`` "example" (default) gives each example its own step size and error test,
    and examples leave the batch when they reach max(T), so on a CPU, where a call costs in
    proportion to its rows, nothing is spent on finished or easy examples; "batch" steps the whole
    batch with the step of its worst example (fewer, fuller calls: the choice on a GPU). The
    tolerances apply per example: ``atol + rtol |x_i|`` per element of x (RMS over the elements)
    and ``d atol + rtol |log-det|`` for the log-det, a sum of d terms, so both mean the same per
    dimension. The NFE counts network calls (each one forward pass and its VJPs, on the examples
    still running).

    ``model(x, t) -> eps_hat`` is the eps-network, ``x`` (B, ...) the examples in model space (x_eps),
    ``eps`` the start (default ``sde.eps``) and ``generator`` draws the Hutchinson probes. Returns
    ``FlowResult(x_T, integral, nfe)``: x_T like x and the integral (B,), in nats. Bad options raise
    DifftimeError. References: the PF-ODE likelihood, https://arxiv.org/abs/2011.13456; Hutchinson's
    estimator as in FFJORD, https://arxiv.org/abs/1810.01367.

    >>> import torch
    >>> import difftime as dt
    >>> sde = dt.VPSDE()
    >>> exact = lambda x, t: sde.sigma(t)[:, None] * x   # data N(0, I): p_t = N(0, I), so F = 0
    >>> x = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    >>> x_T, integral, nfe = dt.ode_flow(exact, sde, x, 1.0)
    >>> bool(torch.allclose(x_T, x)), bool(integral.abs().max() < 1e-4)   # the flow is the identity
    (True, True)
    >>> flows = dt.ode_flow(exact, sde, x, [0.4, 1.0])   # truncate mode: one solve, two horizons
    >>> tuple(flows.x_T.shape), tuple(flows.integral.shape)
    ((2, 2, 2), (2, 2))
    """
    Ts, eps, single = _horizons(sde, T, eps)
    if error_control not in ERROR_CONTROLS:
        raise DifftimeError(f"error_control must be one of {ERROR_CONTROLS}, got {error_control!r}")
    if method not in ODE_METHODS:
        raise DifftimeError(f"method must be one of {ODE_METHODS}, got {method!r}")
    shape, n, d = x.shape[1:], len(x), x[0].numel()
    divergence = resolve_divergence(divergence, d)
    if divergence not in DIVERGENCES:
        raise DifftimeError(f"divergence must be 'exact', 'hutchinson' or 'auto', got {divergence!r}")
    probes = None
    if divergence == "hutchinson":
        if n_probes < 1:
            raise DifftimeError(f"n_probes must be at least 1, got {n_probes}")
        probe_shape = x.shape if n_probes == 1 else (n_probes, *x.shape)
        if noise == "rademacher":
            probes = randint_on(2, probe_shape, generator, device=x.device).to(x.dtype) * 2 - 1
        elif noise == "gaussian":
            probes = randn_on(probe_shape, generator, dtype=x.dtype, device=x.device)
        else:
            raise DifftimeError(f"noise must be 'rademacher' or 'gaussian', got {noise!r}")
    var = _Variable(sde, variable)
    dtype = x.dtype
    cache: list = [None, None]  # the probes of the rows still running, gathered once per change

    def field(s: Tensor, z: Tensor, rows: Tensor) -> Tensor:
        t, a, b = var.coefficients(s)
        xs = z[:, :d].reshape(len(z), *shape)
        probe = probes
        if probes is not None and len(rows) < n:
            if cache[0] is not rows:
                cache[:] = [rows, probes.index_select(probes.dim() - x.dim(), rows)]
            probe = cache[1]
        eps_hat, div = _eps_and_divergence(model, xs, t.to(dtype), divergence, probe)
        a, b = a.to(dtype)[:, None], b.to(dtype)[:, None]
        return torch.cat([a * z[:, :d] + b * eps_hat.reshape(len(z), d), b * div[:, None]], 1)

    ends = var.of_t(torch.tensor([eps, *Ts], dtype=torch.float64, device=x.device))
    z0 = torch.cat([x.detach().reshape(n, d), torch.zeros(n, 1, dtype=dtype, device=x.device)], 1)
    with torch.no_grad():
        out, nfe = solve_rk(field, z0, float(ends[0]), ends[1:], rtol, atol, error_control == "example", method)
        # The part d alpha(t) of div F, integrated in closed form.
        linear = d * sde.int_alpha(torch.full((len(Ts),), eps, dtype=torch.float64, device=x.device),
                                   torch.tensor(Ts, dtype=torch.float64, device=x.device))
        x_T = out[:, :, :d].reshape(len(Ts), n, *shape)
        integral = out[:, :, d] + linear.to(dtype)[:, None]
    return FlowResult(x_T[0], integral[0], nfe) if single else FlowResult(x_T, integral, nfe)


@full_precision
def ode_log_likelihood(
    model: nn.Module,
    sde: SDE,
    x: Tensor,
    prior: Prior | Sequence[Prior],
    T: float | Sequence[float],
    *,
    eps: float | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    divergence: str = "auto",
    noise: str = "rademacher",
    generator: torch.Generator | None = None,
    variable: str = "t",
    method: str = "bosh3",
    error_control: str = "example",
    n_probes: int = 1,
) -> LikelihoodResult:
    """log p_eps(x) = log nu(x_T) + int_eps^T div F(x_t, t) dt; returns ``LikelihoodResult(log_p, x_T, nfe)``.

    See ``ode_flow`` for the solve, its options and the divergence estimators. With several
    horizons T (one solve), ``prior`` is one prior per T (a sequence as long as T) or one prior
    for all; log p is then (len(T), B) and x_T (len(T), B, ...).

    ``prior`` is anything with ``log_prob`` (the :class:`difftime.priors.Prior` protocol). log p is
    in nats per example, for x in model space (``bits_per_dim`` converts it). References: the PF-ODE
    likelihood, https://arxiv.org/abs/2011.13456; FFJORD / Hutchinson,
    https://arxiv.org/abs/1810.01367; docs/design.md §6.

    >>> import torch
    >>> import difftime as dt
    >>> sde = dt.VPSDE()
    >>> exact = lambda x, t: sde.sigma(t)[:, None] * x   # the exact eps-network for data N(0, I)
    >>> x = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    >>> log_p, x_T, nfe = dt.ode_log_likelihood(exact, sde, x, dt.StandardPrior((2,), 1.0), 1.0)
    >>> [round(v, 3) for v in log_p.tolist()]   # log N(x; 0, I): -ln(2 pi) and -ln(2 pi) - 1
    [-1.838, -2.838]
    """
    options = ODEOptions(rtol, atol, divergence, noise, variable, method, error_control, n_probes)
    x_T, integral, nfe = ode_flow(model, sde, x, T, eps=eps, generator=generator, **options.kwargs())
    if x_T.dim() == x.dim():
        return LikelihoodResult(prior.log_prob(x_T).to(integral.dtype) + integral, x_T, nfe)
    priors = [prior] * len(x_T) if hasattr(prior, "log_prob") else list(prior)
    if len(priors) != len(x_T):
        raise DifftimeError(f"got {len(priors)} priors for {len(x_T)} horizons T")
    log_p = torch.stack([p.log_prob(xk).to(integral.dtype) for p, xk in zip(priors, x_T, strict=True)]) + integral
    return LikelihoodResult(log_p, x_T, nfe)
