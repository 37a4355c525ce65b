"""Fitting a prior to the forward marginal p_T by maximum likelihood, and held-out NLL.

Every training batch is fresh: x0 is drawn from the training split and dequantized anew, and
x_T = m(T) x0 + sigma(T) z uses new noise, so the prior sees the marginal rather than a fixed
sample. The held-out NLL uses a FIXED set of x_T built from the test split with fixed noise, so
numbers from different priors, or different evaluations of one prior, are directly comparable.

Fitting is deterministic given ``seed``; with a ``checkpoint`` folder it also survives a kill:
a rerun with the same arguments continues from the last evaluation and ends with exactly the
weights an uninterrupted fit would have.
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
from difftime.errors import DifftimeError
from difftime.io import atomic_write_bytes, encode_tensors, load_tensors, read_checked_json, save_checked_json
from difftime.rng import stream_seed
from difftime.sde import SDE

_TRAIN_STREAM = 0
_EVAL_STREAM = 1
_EVAL_BATCH = 1024


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


def _device(prior: Any) -> torch.device:
    if isinstance(prior, torch.nn.Module):
        for t in (*prior.parameters(), *prior.buffers()):
            return t.device
    return torch.device("cpu")


@torch.no_grad()
def mean_nll(prior: Any, x: Tensor) -> float:
    """-E log nu(x) in nats per example, evaluated in float32 batches."""
    was_training = getattr(prior, "training", False)
    if hasattr(prior, "eval"):
        prior.eval()
    try:
        total = 0.0
        device = _device(prior)
        for chunk in x.split(_EVAL_BATCH):
            total += float(prior.log_prob(chunk.to(device)).double().sum())
    finally:
        if was_training:
            prior.train()
    return -total / x.shape[0]


def heldout_nll(prior: Any, sde: SDE, T: float, dataset: Dataset, n_eval: int = 1000, seed: int = 0) -> float:
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
    patience: int = 5,
    n_eval: int = 1000,
    seed: int = 0,
    progress: bool = True,
    grad_clip: float = 1.0,
    schedule: str = "constant",
    checkpoint: str | Path | None = None,
) -> dict[str, Any]:
    """Maximum likelihood on fresh x_T samples with early stopping on the held-out NLL.

    Returns {"test_nll": best held-out NLL (nats/example), "history": [{step, train_nll,
    test_nll}, ...], "steps": optimizer steps taken, "best_step", "seconds"}. The prior ends
    with the weights of its best evaluation (the initial ones count, so fitting never makes the
    held-out NLL worse). Priors without trainable parameters are only evaluated.

    The same held-out set both stops training and scores it, so "test_nll" is slightly
    optimistic; for an unbiased comparison, score with ``heldout_nll(..., seed=seed + 1)``.

    With ``checkpoint``, the whole fitting state is saved in that folder at every evaluation, a
    call with the same prior (initial weights) and arguments resumes from it, and it is removed
    once fitting ends. A folder left by different arguments is ignored and overwritten.

    Under torchrun every rank draws the same global batch and fits on its slice, with the
    gradients averaged across ranks: the same computation as one process, whatever the process
    count. Rank 0 alone writes the checkpoint.
    """
    T = _check(prior, sde, T, dataset)
    for name, value, low in (("steps", steps, 0), ("batch_size", batch_size, 1), ("eval_every", eval_every, 1),
                             ("patience", patience, 1)):
        if int(value) < low:
            raise DifftimeError(f"fit_prior: {name}={value} is invalid; expected {name} >= {low}")
    if schedule not in ("cosine", "constant"):
        raise DifftimeError(f"fit_prior: schedule={schedule!r} is unknown; expected 'cosine' or 'constant'")
    if not (lr > 0 and grad_clip > 0):
        raise DifftimeError(f"fit_prior: lr={lr} and grad_clip={grad_clip} must be > 0")
    start = time.perf_counter()
    x_eval = heldout_set(sde, T, dataset, n_eval, seed)
    best = mean_nll(prior, x_eval)
    history: list[dict[str, Any]] = [{"step": 0, "train_nll": None, "test_nll": best}]
    params = [p for p in prior.parameters() if p.requires_grad] if hasattr(prior, "parameters") else []
    if not params or int(steps) == 0:
        return {"test_nll": best, "history": history, "steps": 0, "best_step": 0,
                "seconds": time.perf_counter() - start}

    gen = torch.Generator().manual_seed(stream_seed(seed, _TRAIN_STREAM))
    opt = torch.optim.Adam(params, lr=lr)
    total = int(steps)
    if schedule == "cosine":  # lr -> 0 at the last step: the late, low-noise steps average the gradient noise
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * min(k, total) / total)))
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0)
    distributed.broadcast(prior.state_dict().values())  # the ranks must start from the same weights
    best_state = {k: v.detach().clone() for k, v in prior.state_dict().items()}
    best_step, bad_evals, step = 0, 0, 0
    running, n_running, skipped = 0.0, 0, 0
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        key = _run_key(prior, T, {"steps": steps, "batch_size": batch_size, "lr": lr, "eval_every": eval_every,
                                  "patience": patience, "n_eval": n_eval, "seed": seed, "grad_clip": grad_clip,
                                  "schedule": schedule})
        saved = _load_fit_state(checkpoint, key, prior, opt, sched, gen)
        if saved is not None:
            best_state, meta = saved
            best, best_step, bad_evals, step, skipped = (meta[k] for k in ("best", "best_step", "bad_evals", "step",
                                                                           "skipped"))
            history = meta["history"]
    n_train = dataset.train.shape[0]
    device = _device(prior)
    prior.train()
    bar = tqdm(total=int(steps), initial=step, desc=f"fit {getattr(prior, 'family', 'prior')} T={T:g}",
               disable=not (progress and distributed.is_main()), leave=False)
    try:
        while step < int(steps):
            idx = torch.randint(n_train, (int(batch_size),), generator=gen)
            xt = distributed.shard(marginal_batch(sde, T, dataset, dataset.train[idx], gen)).to(device)
            loss = -prior.log_prob(xt).mean()
            opt.zero_grad(set_to_none=True)
            global_loss = distributed.mean(loss.detach())  # one skip decision on every rank
            finite = bool(torch.isfinite(global_loss))
            if finite:
                loss.backward()
                distributed.average_gradients(params)
                finite = bool(torch.isfinite(torch.nn.utils.clip_grad_norm_(params, grad_clip)))
            if finite:
                opt.step()
                running += float(global_loss)
                n_running += 1
            else:  # no update: NaN/Inf must never reach the weights
                skipped += 1
                if skipped > 20:
                    raise DifftimeError(
                        f"fit_prior: the training loss or its gradient is NaN/Inf at step {step + 1} "
                        f"({skipped} such steps); lower lr (now {lr})"
                    )
            sched.step()
            step += 1
            bar.update(1)
            if step % int(eval_every) == 0 or step == int(steps):
                test = mean_nll(prior, x_eval)
                train = running / n_running if n_running else None
                history.append({"step": step, "train_nll": train, "test_nll": test})
                running, n_running = 0.0, 0
                if math.isfinite(test) and test < best:
                    best, best_step, bad_evals = test, step, 0
                    best_state = {k: v.detach().clone() for k, v in prior.state_dict().items()}
                else:
                    bad_evals += 1
                bar.set_postfix(test_nll=f"{test:.3f}", best=f"{best:.3f}")
                if bad_evals >= int(patience):
                    break
                if checkpoint is not None and distributed.is_main():
                    _save_fit_state(checkpoint, key, prior, best_state, opt, sched, gen, {
                        "best": best, "best_step": best_step, "bad_evals": bad_evals, "step": step,
                        "skipped": skipped, "history": history})
    finally:
        bar.close()
        prior.load_state_dict(best_state)
        prior.eval()
    if checkpoint is not None and distributed.is_main():
        shutil.rmtree(checkpoint, ignore_errors=True)
    return {"test_nll": best, "history": history, "steps": step, "best_step": best_step,
            "seconds": time.perf_counter() - start}


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
