"""Fitting a prior to the forward marginal p_T by maximum likelihood, and held-out NLL.

Every training batch is fresh: x0 is drawn from the training split and dequantized anew, and
x_T = m(T) x0 + sigma(T) z uses new noise, so the prior sees the marginal rather than a fixed
sample. The held-out NLL uses a FIXED set of x_T built from the test split with fixed noise, so
numbers from different priors, or different evaluations of one prior, are directly comparable.

Training uses its budget: a data-dependent initialisation for priors that have one
(Glow's actnorms, ``data_init``) on top of the warm start at the moment-matched Gaussian; a
learning rate that warms up linearly and then decays on a cosine to zero at ``steps``; and early
stopping against the measured noise of the held-out NLL: only an evaluation worse than the best
by more than ``z`` paired standard errors (per-example differences on the fixed held-out set)
counts against ``patience`` (and only while the NLL is not falling), so a fit whose NLL wanders
within its noise runs to the end of its (cosine) schedule, where the low learning rate averages the gradient noise.

Fitting is deterministic given ``seed`` (without ``time_limit``); with a ``checkpoint`` folder it
also survives a kill: a rerun with the same arguments continues from the last evaluation and ends
with exactly the weights an uninterrupted fit would have.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from difftime import distributed
from difftime.data import Dataset
from difftime.distributed import module_device
from difftime.errors import DifftimeError
from difftime.io import (
    atomic_write_bytes,
    encode_tensors,
    load_tensors,
    read_checked_json,
    save_checked_json,
    save_json,
)
from difftime.rng import stream_seed
from difftime.sde import SDE
from difftime.stats import mean_se

_TRAIN_STREAM = 0
_EVAL_STREAM = 1
_INIT_STREAM = 2
_EVAL_BATCH = 1024
SCHEDULES = ("warmup_cosine", "cosine", "constant")
# Held-out x_T for early stopping: the paired SE of a 0.1-nat gain must be well below 0.05 nats.
# 4096 examples resolve 0.1 nats (1.96 SE) up to a per-example SD of 1.6 nats; the measured SDs of
# log flow - log gaussian are in docs/design.md §7.
DEFAULT_N_EVAL = 4096


def _check(prior: Any, sde: SDE, T: float, dataset: Dataset) -> float:
    T, _ = sde.check_horizon(T)
    if not (hasattr(prior, "log_prob") and hasattr(prior, "sample")):
        raise DifftimeError(f"got {type(prior).__name__} as a prior; expected an object with log_prob and sample")
    prior_T = getattr(prior, "T", None)
    if prior_T is not None and not math.isclose(float(prior_T), T, rel_tol=1e-9, abs_tol=1e-12):
        raise DifftimeError(
            f"the prior was built for T={prior_T:g} but is being fitted at T={T:g}; expected the same T"
        )
    shape = getattr(prior, "shape", None)
    if shape is not None and tuple(shape) != tuple(dataset.shape):
        raise DifftimeError(f"the prior has shape {tuple(shape)} but {dataset.name} has {dataset.shape}")
    return T


def marginal_batch(
    sde: SDE, T: float, dataset: Dataset, raw: Tensor, generator: torch.Generator
) -> Tensor:
    """x_T = m(T) x0 + sigma(T) z for raw examples, dequantized with ``generator``."""
    x0 = dataset.scaler.encode(raw, generator=generator)
    t = torch.full((x0.shape[0],), float(T), dtype=x0.dtype)
    xt, _ = sde.marginal_sample(x0, t, generator)
    return xt


def heldout_set(sde: SDE, T: float, dataset: Dataset, n_eval: int = 1000, seed: int = 0) -> Tensor:
    """A fixed set of n_eval x_T from the test split (cycling through it when n_eval > N_test)."""
    T, _ = sde.check_horizon(T)
    n_eval = int(n_eval)
    if n_eval < 1:
        raise DifftimeError(f"n_eval={n_eval} is invalid; expected n_eval >= 1")
    gen = torch.Generator().manual_seed(stream_seed(seed, _EVAL_STREAM))
    idx = torch.arange(n_eval) % dataset.test.shape[0]
    return marginal_batch(sde, T, dataset, dataset.test[idx], gen)


@torch.no_grad()
def example_nll(prior: Any, x: Tensor) -> Tensor:
    """-log nu(x) per example (float64, (B,)), evaluated in float32 batches in eval mode."""
    was_training = getattr(prior, "training", False)
    if hasattr(prior, "eval"):
        prior.eval()
    try:
        device = module_device(prior)
        out = torch.cat([-prior.log_prob(chunk.to(device)).double().cpu() for chunk in x.split(_EVAL_BATCH)])
    finally:
        if was_training:
            prior.train()
    return out


def mean_nll(prior: Any, x: Tensor) -> float:
    """-E log nu(x) in nats per example, evaluated in float32 batches."""
    return float(example_nll(prior, x).mean())


def lr_factor(schedule: str, step: int, total: int, warmup: int) -> float:
    """The learning-rate multiplier at optimizer step ``step`` (0-based) of ``total``.

    warmup_cosine: (k+1)/warmup for k < warmup, then 1/2 (1 + cos(pi (k - warmup)/(total - warmup)));
    cosine: the same with no warm-up; constant: 1.
    """
    if schedule == "constant":
        return 1.0
    w = warmup if schedule == "warmup_cosine" else 0
    if step < w:
        return (step + 1) / w
    span = max(total - w, 1)
    return 0.5 * (1 + math.cos(math.pi * min(step - w, span) / span))


def bad_count(bad: int, delta: float, se: float, z: float, falling: bool) -> int:
    """The count of bad evaluations after one with NLL ``delta`` above the best (paired SE ``se``).

    Within the noise (delta <= z se) the count restarts; a resolved degradation adds one, except
    while the NLL is still falling (``falling``: a new low since the degradation began): a flow
    leaving its Gaussian start often first rises by a resolved 0.1 nat and then descends below it
    (MNIST, MAF, T = 0.4).
    """
    if delta <= z * se:
        return 0
    return bad if falling else bad + 1


def paired_se(a: Tensor, b: Tensor) -> float:
    """Standard error of mean(a - b) over examples (0 for identical vectors, nan for one example)."""
    return mean_se((a - b).double())[1]


def heldout_nll(prior: Any, sde: SDE, T: float, dataset: Dataset, n_eval: int = DEFAULT_N_EVAL,
                seed: int = 0) -> float:
    """Held-out NLL (nats per example) of x_T built from the test split with fixed noise."""
    T = _check(prior, sde, T, dataset)
    return mean_nll(prior, heldout_set(sde, T, dataset, n_eval, seed))


def fit_prior(
    prior: Any,
    sde: SDE,
    T: float,
    dataset: Dataset,
    *,
    steps: int = 2000,
    batch_size: int = 256,
    lr: float = 1e-3,
    eval_every: int = 100,
    patience: int = 2,
    z: float = 2.0,
    lr_cuts: int = 2,
    n_eval: int = DEFAULT_N_EVAL,
    seed: int = 0,
    progress: bool = True,
    grad_clip: float = 1.0,
    schedule: str = "warmup_cosine",
    warmup: int | None = None,
    data_init: bool = True,
    require_gain: bool = True,
    time_limit: float | None = None,
    checkpoint: str | Path | None = None,
) -> dict[str, Any]:
    """Maximum likelihood on fresh x_T samples with early stopping on the held-out NLL.

    Returns {"test_nll": best held-out NLL (nats/example), "history": [{step, train_nll, test_nll,
    lr, delta_vs_best, se_vs_best}, ...], "steps": optimizer steps taken, "best_step", "seconds",
    "stopped" ("steps", "patience" or "time"), "gain": the paired gain of the best weights over the
    initial ones on the held-out set {mean, se} (nats)}. The prior ends with the weights of its best
    evaluation (the initial ones count, so fitting never makes the held-out NLL worse). Priors
    without trainable parameters are only evaluated.

    Early stopping: an evaluation counts as bad only when its NLL exceeds the best by more than
    ``z`` standard errors of the paired per-example difference and is not below the previous
    evaluation's (within the noise of the best, the count restarts). After ``patience`` consecutive bad
    evaluations the fit returns to its best weights with the learning rate divided by 3 (and fresh
    Adam moments), up to ``lr_cuts`` times; the next such run stops it (the cuts were chosen by
    measurement, docs/design.md §7). ``schedule`` is "warmup_cosine" (``warmup`` steps, default
    min(100, steps // 10), then a cosine to 0 at ``steps``), "cosine" or "constant". With
    ``data_init``, a prior with a ``data_init(x)`` method (Glow's actnorms) is initialised on a batch
    of x_T before training. ``time_limit`` (seconds) stops at the first evaluation past it. With
    ``require_gain``, the fitted weights replace the initial ones only when their held-out gain
    exceeds ``z`` paired standard errors ("kept_start" says when they did not): a best step picked
    from many evaluations with an unresolved gain can be worse than the start on fresh noise
    (measured: docs/design.md §7).

    The same held-out set both stops training and scores it, so "test_nll" is slightly
    optimistic; for an unbiased comparison, score with ``heldout_nll(..., seed=seed + 1)``.

    Arguments: ``prior`` a prior module at horizon ``T`` (trainable or not), ``sde`` the run's SDE and
    ``dataset`` a :class:`difftime.data.Dataset` (training batches from its train split, the
    ``n_eval`` held-out x_T from its test split). ``steps`` optimizer steps of ``batch_size`` fresh
    x_T at peak learning rate ``lr`` with gradients clipped at ``grad_clip``, an evaluation every
    ``eval_every`` steps; ``seed`` fixes data, noise and evaluation set; ``progress`` shows a bar.
    Bad arguments raise DifftimeError. The auxiliary prior fitted to p_T is the paper's,
    https://arxiv.org/abs/2206.05173.

    >>> import difftime as dt
    >>> from difftime.priors import make_prior
    >>> sde, data = dt.VPSDE(), dt.load_data("toy:moons:n=200,n_test=50")
    >>> prior = make_prior("flow", sde, 0.4, data, transforms=1, hidden=[8])
    >>> result = dt.fit_prior(prior, sde, 0.4, data, steps=2, batch_size=32, eval_every=1, n_eval=64,
    ...                       progress=False)
    >>> result["steps"], result["stopped"], sorted(result["gain"])
    (2, 'steps', ['mean', 'resolved', 'se'])

    With ``checkpoint``, the whole fitting state is saved in that folder at every evaluation, a
    call with the same prior (initial weights) and arguments resumes from it, and it is removed
    once fitting ends. A folder left by different arguments is ignored and overwritten.

    Under torchrun every rank draws the same global batch and fits on its slice, with the
    gradients averaged across ranks: the same computation as one process, whatever the process
    count. Rank 0 alone writes the checkpoint.
    """
    T = _check(prior, sde, T, dataset)
    warmup = _check_fit_args(steps, batch_size, eval_every, patience, n_eval, schedule, lr, grad_clip, z, time_limit,
                             warmup)
    start = time.perf_counter()
    x_eval = heldout_set(sde, T, dataset, n_eval, seed)
    init_nll = example_nll(prior, x_eval)
    init = float(init_nll.mean())
    history: list[dict[str, Any]] = [{"step": 0, "train_nll": None, "test_nll": init, "lr": 0.0,
                                      "delta_vs_best": 0.0, "se_vs_best": 0.0}]
    params = [p for p in prior.parameters() if p.requires_grad] if hasattr(prior, "parameters") else []
    if not params or int(steps) == 0:
        return {"test_nll": init, "history": history, "steps": 0, "best_step": 0, "stopped": "steps",
                "gain": {"mean": 0.0, "se": 0.0}, "n_eval": int(n_eval), "seconds": time.perf_counter() - start}

    settings = {"steps": steps, "batch_size": batch_size, "lr": lr, "eval_every": eval_every, "patience": patience,
                "z": z, "lr_cuts": lr_cuts, "n_eval": n_eval, "seed": seed, "grad_clip": grad_clip,
                "schedule": schedule, "warmup": warmup, "data_init": data_init, "require_gain": require_gain,
                "time_limit": time_limit}
    fit = _Fit(prior, sde, T, dataset, x_eval, init_nll, history, params, settings, start)
    key = None
    resumed = False
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        key = _run_key(prior, T, settings)
        resumed = fit.resume(checkpoint, key)
    if not resumed and data_init and hasattr(prior, "data_init"):
        fit.data_init()
    fit.run(progress, checkpoint, key)
    if checkpoint is not None and distributed.is_main():
        shutil.rmtree(checkpoint, ignore_errors=True)
    return fit.result()


def _check_fit_args(steps: int, batch_size: int, eval_every: int, patience: int, n_eval: int, schedule: str,
                    lr: float, grad_clip: float, z: float, time_limit: float | None, warmup: int | None) -> int:
    """The warm-up step count of ``fit_prior``, once every argument it checks is valid (one line otherwise)."""
    for name, value, low in (("steps", steps, 0), ("batch_size", batch_size, 1), ("eval_every", eval_every, 1),
                             ("patience", patience, 1), ("n_eval", n_eval, 2)):
        if int(value) < low:
            raise DifftimeError(f"fit_prior: {name}={value} is invalid; expected {name} >= {low}")
    if schedule not in SCHEDULES:
        raise DifftimeError(f"fit_prior: schedule={schedule!r} is unknown; expected one of {', '.join(SCHEDULES)}")
    if not (lr > 0 and grad_clip > 0 and z > 0):
        raise DifftimeError(f"fit_prior: lr={lr}, grad_clip={grad_clip} and z={z} must be > 0")
    if time_limit is not None and not time_limit > 0:
        raise DifftimeError(f"fit_prior: time_limit={time_limit} is invalid; expected seconds > 0")
    total = int(steps)
    warmup = min(100, total // 10) if warmup is None else int(warmup)
    if warmup < 0:
        raise DifftimeError(f"fit_prior: warmup={warmup} is invalid; expected warmup >= 0")
    return warmup


class _Fit:
    """One ``fit_prior`` call past its checks: the optimizer, its schedule and the training generator,
    the best weights so far and the early-stopping counters (what a checkpoint saves and restores).
    ``settings`` are fit_prior's arguments, with ``warmup`` resolved."""

    def __init__(self, prior: Any, sde: SDE, T: float, dataset: Dataset, x_eval: Tensor, init_nll: Tensor,
                 history: list[dict[str, Any]], params: list[Tensor], settings: dict[str, Any], start: float) -> None:
        self.prior, self.sde, self.T, self.dataset, self.x_eval = prior, sde, T, dataset, x_eval
        self.history, self.params, self.settings, self.start = history, params, settings, start
        total, schedule, warmup = int(settings["steps"]), settings["schedule"], settings["warmup"]
        self.total = total
        self.gen = torch.Generator().manual_seed(stream_seed(settings["seed"], _TRAIN_STREAM))
        self.opt = torch.optim.Adam(params, lr=settings["lr"])
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda k: lr_factor(schedule, k, total, warmup))
        distributed.broadcast(prior.state_dict().values())  # the ranks must start from the same weights
        self.best_state = {k: v.detach().clone() for k, v in prior.state_dict().items()}
        self.init_state, self.init_nll, self.init = self.best_state, init_nll, float(init_nll.mean())
        self.best, self.best_nll = self.init, init_nll
        self.best_step, self.bad_evals, self.step, self.cuts, self.stretch_low = 0, 0, 0, 0, math.inf
        self.running, self.n_running, self.skipped = 0.0, 0, 0
        self.stopped = "steps"

    def resume(self, checkpoint: Path, key: str) -> bool:
        """Continue from the fitting state saved in ``checkpoint`` for ``key``; False when there is none."""
        saved = _load_fit_state(checkpoint, key, self.prior, self.opt, self.sched, self.gen)
        if saved is None:
            return False
        self.best_state, meta = saved
        self.best, self.best_step, self.bad_evals, self.step, self.skipped, self.cuts, stretch_low = (
            meta[k] for k in ("best", "best_step", "bad_evals", "step", "skipped", "cuts", "stretch_low"))
        self.stretch_low = math.inf if stretch_low is None else stretch_low
        self.history = meta["history"]
        current = {k: v.clone() for k, v in self.prior.state_dict().items()}
        self.prior.load_state_dict(self.best_state)
        self.best_nll = example_nll(self.prior, self.x_eval)
        self.prior.load_state_dict(current)
        return True

    def data_init(self) -> None:
        """The prior's data-dependent initialisation on a batch of x_T."""
        # Its own stream, so the training draws are the same with or without it.
        init_gen = torch.Generator().manual_seed(stream_seed(self.settings["seed"], _INIT_STREAM))
        idx = torch.randint(self.dataset.train.shape[0], (max(int(self.settings["batch_size"]), 512),),
                            generator=init_gen)
        x = marginal_batch(self.sde, self.T, self.dataset, self.dataset.train[idx], init_gen)
        self.prior.data_init(x.to(module_device(self.prior)))
        distributed.broadcast(self.prior.state_dict().values())

    def run(self, progress: bool, checkpoint: Path | None, key: str | None) -> None:
        """Train to the end of the budget, to patience or to the time limit; the prior ends with the best weights."""
        s = self.settings
        n_train = self.dataset.train.shape[0]
        device = module_device(self.prior)
        self.prior.train()
        desc = f"fit {getattr(self.prior, 'family', 'prior')} T={self.T:g}"
        bar = tqdm(total=self.total, initial=self.step, desc=desc, disable=not (progress and distributed.is_main()),
                   leave=False)
        try:
            while self.step < self.total:
                current_lr = self.train_step(n_train, device)
                bar.update(1)
                out_of_time = s["time_limit"] is not None and time.perf_counter() - self.start >= s["time_limit"]
                if self.step % int(s["eval_every"]) == 0 or self.step == self.total or out_of_time:
                    test = self.evaluate(current_lr)
                    bar.set_postfix(test_nll=f"{test:.3f}", best=f"{self.best:.3f}")
                    if self.bad_evals >= int(s["patience"]):
                        if self.cuts >= int(s["lr_cuts"]):
                            self.stopped = "patience"
                            break
                        self.cut_lr()
                    if out_of_time:
                        self.stopped = "time"
                        break
                    if checkpoint is not None and distributed.is_main():
                        self.save(checkpoint, key)
        finally:
            bar.close()
            self.prior.load_state_dict(self.best_state)
            self.prior.eval()

    def train_step(self, n_train: int, device: torch.device) -> float:
        """One optimizer step on a fresh batch of x_T, skipped when the loss or its gradient is not finite;
        returns the learning rate it used."""
        idx = torch.randint(n_train, (int(self.settings["batch_size"]),), generator=self.gen)
        xt = distributed.shard(marginal_batch(self.sde, self.T, self.dataset, self.dataset.train[idx],
                                              self.gen)).to(device)
        loss = -self.prior.log_prob(xt).mean()
        self.opt.zero_grad(set_to_none=True)
        global_loss = distributed.mean(loss.detach())  # one skip decision on every rank
        finite = bool(torch.isfinite(global_loss))
        if finite:
            loss.backward()
            distributed.average_gradients(self.params)
            finite = bool(torch.isfinite(torch.nn.utils.clip_grad_norm_(self.params, self.settings["grad_clip"])))
        if finite:
            self.opt.step()
            self.running += float(global_loss)
            self.n_running += 1
        else:  # no update: NaN/Inf must never reach the weights
            self.skipped += 1
            if self.skipped > 20:
                raise DifftimeError(
                    f"fit_prior: the training loss or its gradient is NaN/Inf at step {self.step + 1} "
                    f"({self.skipped} such steps); lower lr (now {self.settings['lr']})"
                )
        current_lr = self.opt.param_groups[0]["lr"]
        self.sched.step()
        self.step += 1
        return current_lr

    def evaluate(self, current_lr: float) -> float:
        """The held-out NLL now, recorded in the history; keeps the best weights and counts bad evaluations."""
        now = example_nll(self.prior, self.x_eval)
        test = float(now.mean())
        train = self.running / self.n_running if self.n_running else None
        delta, se = (test - self.best, paired_se(now, self.best_nll)) if math.isfinite(test) else (math.inf, 0.0)
        self.history.append({"step": self.step, "train_nll": train, "test_nll": test, "lr": current_lr,
                             "delta_vs_best": delta if math.isfinite(delta) else None, "se_vs_best": se})
        self.running, self.n_running = 0.0, 0
        if math.isfinite(test) and test < self.best:
            self.best, self.best_step, self.best_nll = test, self.step, now
            self.best_state = {k: v.detach().clone() for k, v in self.prior.state_dict().items()}
        # "Falling": below every evaluation of the current run of resolved degradations (a
        # random walk rarely makes a new low, a steady descent does at every evaluation).
        started = self.bad_evals == 0
        self.bad_evals = bad_count(self.bad_evals, delta, se, self.settings["z"],
                                   falling=not started and test < self.stretch_low)
        self.stretch_low = test if started else min(self.stretch_low, test)
        return test

    def cut_lr(self) -> None:
        """Back to the best weights with a third of the learning rate, from the same step on."""
        s = self.settings
        self.cuts, self.bad_evals, self.stretch_low = self.cuts + 1, 0, math.inf
        self.prior.load_state_dict(self.best_state)
        self.opt.state.clear()
        self.sched.base_lrs = [b / 3 for b in self.sched.base_lrs]
        for group, base in zip(self.opt.param_groups, self.sched.base_lrs, strict=True):
            group["lr"] = base * lr_factor(s["schedule"], self.step, self.total, s["warmup"])
        self.history[-1]["lr_cut"] = self.cuts

    def save(self, checkpoint: Path, key: str) -> None:
        _save_fit_state(checkpoint, key, self.prior, self.best_state, self.opt, self.sched, self.gen, {
            "best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals, "step": self.step,
            "skipped": self.skipped, "cuts": self.cuts, "history": self.history,
            "stretch_low": self.stretch_low if math.isfinite(self.stretch_low) else None})

    def result(self) -> dict[str, Any]:
        """fit_prior's record; the fitted weights must earn their place (``require_gain``)."""
        s = self.settings
        gain = {"mean": self.init - self.best,
                "se": paired_se(self.best_nll, self.init_nll) if self.best_step else 0.0}
        gain["resolved"] = gain["mean"] > s["z"] * gain["se"]
        kept_start = bool(self.best_step) and s["require_gain"] and not gain["resolved"]
        if kept_start:  # a gain within the noise is selection noise
            self.prior.load_state_dict(self.init_state)
            self.best, self.best_step = self.init, 0
        return {"test_nll": self.best, "history": self.history, "steps": self.step, "best_step": self.best_step,
                "stopped": self.stopped, "gain": gain, "kept_start": kept_start, "n_eval": int(s["n_eval"]),
                "schedule": s["schedule"], "warmup": s["warmup"], "z": s["z"], "lr_cuts": self.cuts,
                "seconds": time.perf_counter() - self.start}


def _run_key(prior: Any, T: float, settings: dict[str, Any]) -> str:
    """Identifies a fit: the prior's initial weights, T and every argument that shapes the result."""
    h = hashlib.sha256(encode_tensors(prior.state_dict()))
    h.update(json.dumps({"T": T, **settings}, sort_keys=True).encode())
    return h.hexdigest()


def _save_fit_state(folder: Path, key: str, prior: Any, best_state: dict[str, Tensor], opt: torch.optim.Optimizer,
                    sched: Any, gen: torch.Generator, meta: dict[str, Any]) -> None:
    """A new tensor file per step, then state.json naming it: whenever a kill lands, state.json and
    the file it names agree."""
    opt_state = opt.state_dict()
    tensors = {"rng": gen.get_state(), **{f"prior.{k}": v for k, v in prior.state_dict().items()},
               **{f"best.{k}": v for k, v in best_state.items()},
               **{f"optim.{i}.{name}": v for i, slots in opt_state["state"].items() for name, v in slots.items()}}
    data = encode_tensors(tensors)
    name = f"state-{meta['step']:08d}.safetensors"
    atomic_write_bytes(folder / name, data)
    save_checked_json(folder / "state.json", {
        **meta, "key": key, "file": name, "sha256": hashlib.sha256(data).hexdigest(),
        "optim_param_groups": opt_state["param_groups"], "schedule": sched.state_dict()})
    for old in folder.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink()


def _load_fit_state(folder: Path, key: str, prior: Any, opt: torch.optim.Optimizer, sched: Any,
                    gen: torch.Generator) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """Restore a fit saved by ``_save_fit_state`` for the same ``key``; None when there is none."""
    if not (folder / "state.json").is_file():
        return None
    meta = read_checked_json(folder / "state.json", "prior fitting state")
    if meta.get("key") != key:
        return None
    try:
        tensors = load_tensors(folder / meta["file"], meta["sha256"])
        prior.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("prior.")})
        best_state = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        slots: dict[int, dict[str, Tensor]] = {}
        for name, value in tensors.items():
            if name.startswith("optim."):
                _, idx, slot = name.split(".", 2)
                slots.setdefault(int(idx), {})[slot] = value
        opt.load_state_dict({"state": slots, "param_groups": meta["optim_param_groups"]})
        sched.load_state_dict(meta["schedule"])
        gen.set_state(tensors["rng"])
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise DifftimeError(f"{folder} holds an unusable prior fitting state: {exc}; delete it to start over") from None
    return best_state, meta


def save_fit_curve(fit: dict[str, Any], directory: str | Path, title: str = "") -> None:
    """fit_curve.json (the history) and fit_curve.png (held-out NLL against step, with the paired
    2-SE band of each evaluation around the best so far) in ``directory``."""
    from matplotlib.figure import Figure

    from difftime.plots import save_figure

    directory = Path(directory)
    history = fit["history"]
    save_json(directory / "fit_curve.json", fit)
    steps = [h["step"] for h in history]
    test = [h["test_nll"] for h in history]
    fig = Figure(figsize=(5.5, 3.4))
    ax = fig.subplots()
    ax.plot(steps, test, "o-", ms=3, label="held-out NLL")
    train = [(h["step"], h["train_nll"]) for h in history if h.get("train_nll") is not None]
    if train:
        ax.plot(*zip(*train, strict=True), "-", alpha=0.5, label="train NLL (mean since last eval)")
    ax.axhline(test[0], color="grey", ls=":", label="initial (Gaussian warm start)")
    ax.axvline(fit.get("best_step", 0), color="green", ls="--", lw=1, label=f"best step {fit.get('best_step', 0)}")
    finite = [v for v in test if math.isfinite(v)]
    if finite:  # keep the interesting range in view; a diverged spike is clipped
        lo, hi = min(finite), test[0]
        pad = max(hi - lo, 0.05) * 0.6
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats per example")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    save_figure(fig, directory / "fit_curve.png")
