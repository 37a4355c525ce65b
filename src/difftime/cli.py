"""The ``difftime`` command line.

Bad input ends with one line on stderr and exit code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from difftime.allocator import retain_freed_memory
from difftime.cli_grid import add_grid_parser
from difftime.errors import DifftimeError


class _HelpFormatter(argparse.HelpFormatter):
    """Fills {SAMPLERS}, {SPACINGS} and the {DEFAULT_*} names in help texts from difftime.sampling,
    imported (with torch) only when help is shown."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = super()._get_help_string(action)
        if text and "{" in text:
            from difftime import sampling

            for key, value in (("{SAMPLERS}", ", ".join(sampling.SAMPLERS)),
                               ("{SPACINGS}", ", ".join(sampling.SPACINGS)),
                               ("{DEFAULT_SAMPLER}", sampling.DEFAULT_SAMPLER),
                               ("{DEFAULT_SPACING}", sampling.DEFAULT_SPACING),
                               ("{DEFAULT_SAMPLE_EPS}", f"{sampling.DEFAULT_SAMPLE_EPS:g}")):
                text = text.replace(key, value)
        return text


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # one line, exit 2, as for every other bad input
        raise DifftimeError(f"{self.prog}: {message} (see --help)")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1)
_nonnegative_int = _int_at_least(0)


def _check_new_output_dir(out: Path) -> None:
    if (out / "config.json").exists():
        raise DifftimeError(
            f"{out} already holds a run; pass --resume to continue it or choose another --out"
        )
    if out.exists() and not out.is_dir():
        raise DifftimeError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise DifftimeError(f"--out {out} is not empty; choose a new or empty directory")


def _train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    over: dict[str, Any] = {}
    if args.data is not None:
        over["data"] = args.data
    if args.seed is not None:
        over["seed"] = args.seed
    if args.sde is not None:
        over["sde"] = {"kind": args.sde}
    train = {k: v for k, v in {
        "T": args.T, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
        "weighting": args.weighting, "t_distribution": args.t_distribution,
    }.items() if v is not None}
    if args.bf16:
        train["bf16"] = True
    if args.channels_last:
        train["channels_last"] = True
    if train:
        over["train"] = train
    return over


def cmd_train(args: argparse.Namespace) -> int:
    from difftime.distributed import session

    with session(args.device) as device:  # under torchrun: one rank of a DDP group
        return _train(args, device)


def _train(args: argparse.Namespace, device: str) -> int:
    from difftime.config import build_config
    from difftime.training import saved_config, train_run

    if args.resume:
        out = Path(args.resume)
        config = saved_config(out, steps=args.steps)
    else:
        if args.out is None:
            raise DifftimeError("train needs --out RUN (a new directory) or --resume RUN")
        out = Path(args.out)
        _check_new_output_dir(out)
        # Every rank checks before any rank writes (rank 0 creates the lock file and config).
        from difftime.distributed import barrier

        barrier()
        config = build_config(args.preset, args.config, _train_overrides(args))
    result = train_run(config, out, resume=bool(args.resume), device=device, progress=not args.no_progress)
    if _is_main():
        print(json.dumps({"run": result.run, "step": result.step, "last_loss": result.last_loss,
                          "params": result.params, "processes": result.processes,
                          "wall_s": round(result.wall_s, 2)}))
    return 0


def _is_main() -> bool:
    from difftime.distributed import is_main

    return is_main()


def _horizon(run, T: float | None) -> tuple[float, float]:
    return run.sde.check_horizon(T if T is not None else run.T_train)


def cmd_fit_prior(args: argparse.Namespace) -> int:
    from difftime.distributed import session

    with session(args.device) as device:  # under torchrun: gradients averaged across ranks, rank 0 saves
        return _fit_prior(args, device)


def _fit_prior(args: argparse.Namespace, device: str) -> int:
    from difftime.data import load_data
    from difftime.distributed import is_main
    from difftime.priors import fit_run_prior, prior_dir
    from difftime.run import load_run

    run = load_run(args.run)
    T, _ = run.sde.check_horizon(args.T)
    if args.prior == "standard":
        raise DifftimeError("the standard prior needs no fitting; use --prior gaussian, flow or glow")
    directory = prior_dir(run.path, args.prior, T)
    if (directory / "config.json").exists() and not args.overwrite:
        raise DifftimeError(f"{directory} already holds a prior; pass --overwrite to refit it")
    dataset = load_data(run.config["resolved"]["data"], seed=run.seed)
    options: dict[str, Any] = {}
    if args.prior == "flow":
        options = {k: v for k, v in {"flow": args.flow, "transforms": args.transforms,
                                     "hidden": tuple(args.hidden) if args.hidden else None}.items() if v is not None}
    elif args.prior == "glow":
        options = {k: v for k, v in {"levels": args.levels, "steps_per_level": args.steps_per_level,
                                     "hidden": args.hidden[0] if args.hidden else None,
                                     "base": args.base}.items() if v is not None}
    fit_options = {k: v for k, v in {"n_eval": args.n_eval, "eval_every": args.eval_every, "schedule": args.schedule,
                                     "time_limit": args.time_limit}.items() if v is not None}
    # A killed fit-prior, rerun with the same arguments, resumes.
    _, fit = fit_run_prior(run.path, run.sde, run.shape, args.prior, T, dataset, steps=args.steps,
                           batch_size=args.batch_size, lr=args.lr, seed=args.seed, progress=not args.no_progress,
                           fit_options=fit_options, device=device, **options)
    if is_main():
        print(json.dumps({"prior": str(directory), "family": args.prior, "T": T, "test_nll_nats": fit["test_nll"],
                          "gain_over_start_nats": fit["gain"], "steps": fit["steps"], "best_step": fit["best_step"],
                          "stopped": fit["stopped"], "fit_curve": str(directory / "fit_curve.png"),
                          "seconds": round(fit.get("seconds", 0.0), 2)}))
    return 0


def _sampler_options(args: argparse.Namespace, run) -> tuple[str, str, float, dict[str, Any]]:
    """(sampler, spacing, eps, sampler options) of ``sample`` / ``evaluate`` from their flags; unset
    flags take the library's defaults (``difftime.evaluation.sampling_defaults``)."""
    from difftime.evaluation import sampling_defaults

    sampler, spacing, eps = sampling_defaults(args.sampler, args.spacing, args.eps, run.sde)
    options: dict[str, Any] = {"spacing": spacing, "denoise": not args.no_denoise}
    if sampler == "pc":
        options["snr"] = args.snr
    return sampler, spacing, eps, options


def _check_sampler_flags(args: argparse.Namespace) -> None:
    """Unknown sampler or spacing: one line with the choices, before any run is loaded."""
    from difftime.sampling import check_sampler, check_spacing

    if args.sampler is not None:
        check_sampler(args.sampler)
    if args.spacing is not None:
        check_spacing(args.spacing)


def _frontier_choice(args: argparse.Namespace, run) -> dict[str, Any]:
    """The configuration the study in --study found best for --nfe, checked against RUN."""
    from difftime.study import frontier_choice

    given = [flag for flag, value in (("--T", args.T), ("--prior", args.prior), ("--sampler", args.sampler),
                                      ("--spacing", args.spacing), ("--eps", args.eps), ("--steps", args.steps),
                                      ("--steps-per-unit-time", args.steps_per_unit_time))
             if value is not None] + (["--no-denoise"] if args.no_denoise else [])
    if given:
        raise DifftimeError(f"--nfe takes T, prior, sampler, steps, spacing and eps from the study; drop "
                            f"{', '.join(given)}")
    return frontier_choice(args.study, args.nfe, run)


def _grid_file_choice(args: argparse.Namespace, run) -> tuple:
    """(T, prior, sampler, steps, eps, options, spacing) from the grid file of --ts."""
    from difftime.gridopt import TimeGrid

    given = [flag for flag, value in (("--nfe", args.nfe), ("--spacing", args.spacing), ("--eps", args.eps),
                                      ("--steps", args.steps), ("--steps-per-unit-time", args.steps_per_unit_time))
             if value is not None] + (["--no-denoise"] if args.no_denoise else [])
    if given:
        raise DifftimeError(f"--ts takes the grid, its sampler, eps and NFE from the file; drop {', '.join(given)}")
    grid = TimeGrid.load(args.ts, run.sde)
    for flag, value, own in (("--T", args.T, grid.T), ("--sampler", args.sampler, grid.sampler)):
        if value is not None and value != own:
            raise DifftimeError(f"{flag} {value} disagrees with the grid file's {own}; drop {flag}")
    family = args.prior or grid.info.get("prior", "standard")
    return (grid.T, family, grid.sampler, len(grid.ts) - 1, grid.eps, {"denoise": grid.denoise, "ts": grid.ts},
            f"{grid.method} grid ({args.ts})")


def cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np

    from difftime.evaluation import draw_samples, resolve_prior
    from difftime.io import atomic_write_bytes
    from difftime.plots import save_samples_figure
    from difftime.run import load_run
    from difftime.sampling import steps_for_horizon

    out = Path(args.out)
    if out.suffix != ".npz":
        raise DifftimeError(f"--out must end in .npz, got {out}")
    if args.grid and Path(args.grid).suffix.lower() != ".png":
        raise DifftimeError(f"--grid writes a PNG image and must end in .png, got {args.grid}")
    if (args.nfe is None) != (args.study is None):
        raise DifftimeError("--nfe N and --study DIR go together: sample with the study's best configuration "
                            "for N network calls")
    _check_sampler_flags(args)
    run = load_run(args.run, weights=args.weights, device=args.device)
    choice = None
    if args.ts is not None:
        T, family, sampler, steps, eps, options, spacing = _grid_file_choice(args, run)
    elif args.nfe is not None:
        choice = _frontier_choice(args, run)
        T, _ = _horizon(run, choice["T"])
        family, sampler, steps, eps = choice["prior"], choice["sampler"], choice["steps"], choice["eps"]
        options: dict[str, Any] = {"denoise": choice.get("denoise", True)}
        if choice.get("grid_file"):  # an optimized grid the study kept in its grids/
            from difftime.gridopt import TimeGrid

            options["ts"] = TimeGrid.load(Path(args.study) / choice["grid_file"], run.sde).ts
        elif choice.get("spacing"):
            options["spacing"] = choice["spacing"]
        spacing = choice.get("spacing")
    else:
        T, _ = _horizon(run, args.T)
        family = args.prior or "standard"
        sampler, spacing, eps, options = _sampler_options(args, run)
        steps = args.steps or 10
        if args.steps_per_unit_time is not None:
            steps = steps_for_horizon(T, args.steps_per_unit_time)
    T, eps = run.sde.check_horizon(T, eps)
    prior = resolve_prior(run, family, T)
    samples, nfe, wall = draw_samples(run, prior, T, sampler, steps, args.n, seed=args.seed, eps=eps, **options)
    buf = io.BytesIO()
    np.savez(buf, samples=samples, T=T, eps=eps, nfe=nfe, seed=args.seed, sampler=sampler, prior=family,
             steps=steps, spacing=str(spacing), denoise=options["denoise"])
    atomic_write_bytes(out, buf.getvalue())
    if args.grid:
        save_samples_figure(samples, args.grid, title=f"T={T:g}, {family} prior, {sampler}, NFE={nfe}")
    report = {"out": str(out), "n": args.n, "T": T, "eps": eps, "prior": family, "sampler": sampler, "steps": steps,
              "spacing": spacing, "denoise": options["denoise"], "nfe": nfe, "wall_s": round(wall, 3)}
    if choice is not None:
        metric = (choice["metric"] or "quality").upper()
        unc = f" +- {choice['uncertainty']:.3g}" if choice.get("uncertainty") is not None else ""
        ref = choice.get("reference")
        against = (f"; T={ref['T']:g} standard scored {metric} {ref['value']:.4g} at NFE {ref['nfe']}"
                   if ref and choice["side"] != "reference" else "")
        print(f"--nfe {args.nfe}: the study's best within NFE {choice['budget']} is T={T:g}, {family} prior, "
              f"{sampler}, {steps} steps, {spacing} spacing, eps {eps:g} ({metric} {choice['value']:.4g}{unc} at "
              f"NFE {choice['nfe']}{against})")
        report["study"] = {"dir": str(args.study), "nfe": args.nfe, "budget": choice["budget"],
                           "metric": choice["metric"], "value": choice["value"], "uncertainty": choice["uncertainty"]}
    print(json.dumps(report))
    return 0


QUALITY_METRICS = ("fid", "fd", "kid", "pr", "mmd", "swd")


def _check_headroom_families(families: list[str] | None) -> None:
    from difftime.priors import PRIOR_FAMILIES

    known = tuple(PRIOR_FAMILIES)
    unknown = [f for f in families or () if f not in known]
    if unknown:
        raise DifftimeError(f"--headroom: unknown prior famil{'y' if len(unknown) == 1 else 'ies'} "
                            f"{', '.join(unknown)}; choose from {', '.join(known)}")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from difftime.data import load_data
    from difftime.evaluation import (
        LIKELIHOOD_METRICS,
        draw_samples,
        evaluation_table,
        likelihood_metrics,
        resolve_prior,
    )
    from difftime.io import save_json
    from difftime.provenance import versions
    from difftime.run import load_run
    from difftime.sampling import steps_for_horizon

    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    unknown = [m for m in metrics if m not in LIKELIHOOD_METRICS + QUALITY_METRICS]
    if unknown or not metrics:
        raise DifftimeError(f"--metrics: unknown {unknown}; choose from "
                            f"{', '.join(LIKELIHOOD_METRICS + QUALITY_METRICS)}")
    out = Path(args.out) if args.out else None
    if out is not None and out.suffix != ".json":
        raise DifftimeError(f"--out must end in .json, got {out}")
    _check_headroom_families(args.headroom)
    _check_sampler_flags(args)
    run = load_run(args.run, weights=args.weights, device=args.device)
    T, eps = _horizon(run, args.T)
    prior = resolve_prior(run, args.prior, T)
    # Every prior the headroom needs is loaded now, so a missing fit fails before the likelihood work.
    headroom_priors = {family: resolve_prior(run, family, T) for family in args.headroom or ()}
    data_spec = run.config["resolved"]["data"]
    result: dict[str, Any] = {"T": T, "eps": eps, "prior": args.prior, "n": args.n}
    likelihood = tuple(m for m in metrics if m in LIKELIHOOD_METRICS)
    if likelihood:
        dataset = load_data(data_spec, seed=run.seed)
        raw = (dataset.test if args.split == "test" else dataset.train)[: args.n]
        result.update(likelihood_metrics(
            run, {args.prior: prior}, raw, T, likelihood, eps=eps, dequant_repeats=args.dequant_repeats,
            n_t=args.n_t, rtol=args.tol, atol=args.tol, divergence=args.divergence, seed=args.seed,
            progress=not args.no_progress)[args.prior])
    if args.headroom:
        from difftime.headroom import run_headroom

        # The model's own PF-ODE marginal at T against each prior, on the same held-out x_T.
        result["headroom"] = run_headroom(
            run, headroom_priors, T,
            load_data(data_spec, seed=run.seed), n=args.headroom_n, seed=args.seed, rtol=args.tol, atol=args.tol,
            divergence=args.divergence)
    quality = [m for m in metrics if m in QUALITY_METRICS]
    if quality:
        from difftime.metrics import quality_metrics

        # Sampling ends at its own eps (--eps, default sampling.default_sample_eps); the likelihoods keep the run's.
        sampler, spacing, sample_eps, options = _sampler_options(args, run)
        T, sample_eps = run.sde.check_horizon(T, sample_eps)
        steps = args.steps if args.steps_per_unit_time is None else steps_for_horizon(T, args.steps_per_unit_time)
        samples, nfe, sample_wall = draw_samples(run, prior, T, sampler, steps, args.n, seed=args.seed,
                                                 eps=sample_eps, **options)
        result["sampling"] = {"sampler": sampler, "steps": steps, "spacing": spacing, "eps": sample_eps,
                              "denoise": options["denoise"], "nfe": nfe, "wall_s": sample_wall, "n": args.n}
        result["quality"] = quality_metrics(samples, data_spec, quality, reference_split=args.split,
                                            seed=args.seed, progress=not args.no_progress)
    result.update({"run": str(run.path), "split": args.split, "seed": args.seed, "weights": args.weights,
                   "run_config": run.config["config"], "resolved": run.config["resolved"], "step": run.step,
                   "versions": versions()})
    print(evaluation_table(result))
    if "headroom" in result:
        from difftime.headroom import headroom_table

        print(headroom_table([result["headroom"]]))
    if out is not None:
        save_json(out, result)
        print(f"wrote {out}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from difftime.importers.diffusers import import_diffusers

    kind, _, directory = args.source.partition(":")
    if kind != "diffusers" or not directory:
        raise DifftimeError(f"import: source must be diffusers:DIR (a local diffusers folder), got {args.source!r}")
    out = Path(args.out)
    _check_new_output_dir(out)
    print(json.dumps(import_diffusers(directory, args.data, out, seed=args.seed)))
    return 0


def _comma_list(kind):
    def parse(text: str) -> list:
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        return [kind(item) for item in items]

    return parse


def cmd_study(args: argparse.Namespace) -> int:
    from difftime.study import Study, study_config

    overrides: dict[str, Any] = {"study": {k: v for k, v in {
        "T_grid": args.T_grid, "priors": args.priors, "samplers": args.samplers, "mode": args.mode,
        "n_samples": args.n_samples, "n_likelihood": args.n_likelihood, "fixed_steps": args.fixed_steps,
        "steps_per_unit_time": args.steps_per_unit_time, "prior_steps": args.prior_steps,
        "spacing": args.spacing, "sample_eps": args.eps, "nfe_budgets": args.nfe_budgets,
        "frontier_samplers": args.frontier_samplers, "frontier_grids": args.frontier_grids,
        "fid": True if args.fid else None}.items() if v is not None}}
    if args.steps is not None:
        overrides["train"] = {"steps": args.steps}
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.run is not None and args.steps is not None:
        raise DifftimeError("--steps sets training steps, but --run uses a trained model; drop one of them")
    from difftime.distributed import resolve_device, session

    resolve_device(args.device)  # a bad --device fails before the study starts
    config = study_config(args.preset, args.config, overrides, run=args.run)
    start = time.perf_counter()
    with session(args.device) as device:  # under torchrun: the stages are shared among the ranks
        study = Study(args.out, config, run=args.run, device=device, progress=not args.no_progress)
        summary = study.run()
        main = _is_main()
    if main:
        print(json.dumps({"study": str(study.out), "report": str(study.out / "report.md"),
                          "cells": summary["n_cells"], "processes": summary["processes"],
                          "wall_s": round(time.perf_counter() - start, 1)}))
    return 0


def _comma_list_or_none(text: str) -> list[str]:
    return [] if text.strip().lower() == "none" else _comma_list(str)(text)


def add_device_argument(p: argparse.ArgumentParser) -> None:
    """--device, read by difftime.distributed.resolve_device when the command runs (torch stays unimported
    while parsing)."""
    p.add_argument("--device", default="auto", help="auto (CUDA when torch sees a GPU, else cpu), cpu, cuda or "
                   "cuda:K (default auto); a seed gives the same samples on every device up to float error")


def _sampler_arguments(p: argparse.ArgumentParser, purpose: str = "") -> None:
    """--sampler, --spacing, --eps, --no-denoise and --snr; the defaults live in difftime.sampling."""
    p.add_argument("--sampler", help=f"sampler{purpose}, one of {{SAMPLERS}} (default {{DEFAULT_SAMPLER}})")
    p.add_argument("--spacing", help="time grid, one of {SPACINGS} (default {DEFAULT_SPACING}; samplers whose own "
                   "grid is uniform in t, such as em and heun, keep it unless this is given)")
    p.add_argument("--eps", type=_positive_float, help="sampling end time (default max({DEFAULT_SAMPLE_EPS}, the "
                   "run's eps)); the likelihoods keep the run's eps")
    p.add_argument("--no-denoise", action="store_true", help="end at x_eps, without the final Tweedie step")
    p.add_argument("--snr", type=_positive_float, default=0.16, help="Langevin corrector snr (pc)")


def build_parser() -> argparse.ArgumentParser:
    from difftime import __version__

    parser = _Parser(prog="difftime", description=__doc__)
    parser.add_argument("--version", action="version", version=f"difftime {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train an eps-network with denoising score matching")
    p.add_argument("--data", help="data source, e.g. digits, mnist, toy:moons, npz:FILE")
    p.add_argument("--out", help="new run directory")
    p.add_argument("--resume", metavar="RUN", help="continue the run in RUN from its checkpoint")
    p.add_argument("--preset", help="a named preset from configs/ (e.g. digits, toy)")
    p.add_argument("--config", help="a JSON config file (merged over the preset)")
    p.add_argument("--sde", choices=["vp", "subvp", "ve"])
    p.add_argument("--T", type=_positive_float, help="training horizon: t ~ U[eps, T]")
    p.add_argument("--steps", type=_positive_int, help="total optimizer steps")
    p.add_argument("--batch-size", type=_positive_int)
    p.add_argument("--lr", type=_positive_float)
    p.add_argument("--weighting", choices=["standard", "likelihood", "min-snr", "edm"], help="loss weight w(t)")
    p.add_argument("--t-distribution", choices=["uniform", "log-snr-normal"], help="the draw of t on [eps, T]")
    p.add_argument("--seed", type=_nonnegative_int)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward pass")
    p.add_argument("--channels-last", action="store_true")
    add_device_argument(p)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("fit-prior", help="fit an auxiliary prior to the forward marginal p_T of a run")
    p.add_argument("run", help="run directory")
    p.add_argument("--T", type=_positive_float, required=True, help="horizon in (eps, T_max]")
    p.add_argument("--prior", choices=["gaussian", "flow", "glow", "standard"], required=True)
    p.add_argument("--steps", type=_nonnegative_int, default=2000)
    p.add_argument("--batch-size", type=_positive_int, default=256)
    p.add_argument("--lr", type=_positive_float, default=1e-3)
    p.add_argument("--flow", choices=["maf", "nsf", "realnvp"], help="flow family (flow prior)")
    p.add_argument("--transforms", type=_positive_int, help="number of flow transforms")
    p.add_argument("--hidden", type=_positive_int, nargs="+", help="hidden sizes (flow) or width (glow)")
    p.add_argument("--levels", type=_positive_int, help="glow levels")
    p.add_argument("--steps-per-level", type=_positive_int, help="glow steps per level")
    p.add_argument("--base", choices=["diagonal", "full"], help="glow: standardise with the diagonal or the full "
                   "(ZCA) moment-matched Gaussian")
    p.add_argument("--n-eval", type=_int_at_least(2), help="held-out x_T for early stopping (default 4096)")
    p.add_argument("--eval-every", type=_positive_int, help="optimizer steps between held-out evaluations")
    p.add_argument("--schedule", choices=["warmup_cosine", "cosine", "constant"], help="learning-rate schedule")
    p.add_argument("--time-limit", type=_positive_float, help="stop at the first evaluation after this many seconds")
    p.add_argument("--seed", type=_nonnegative_int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing prior of this family and T")
    add_device_argument(p)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_fit_prior)

    p = sub.add_parser("sample", help="draw x_T from a prior and integrate the reverse SDE/ODE on [eps, T]")
    p.add_argument("run", help="run directory")
    p.add_argument("--T", type=_positive_float, help="horizon to start from (default: training T)")
    p.add_argument("--prior", help="standard (the default), or a fitted family: gaussian, flow, glow")
    _sampler_arguments(p)
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=_positive_int, help="sampler steps (default 10)")
    steps.add_argument("--steps-per-unit-time", type=_positive_float,
                       help="steps = round(K T): NFE proportional to T")
    steps.add_argument("--nfe", type=_positive_int,
                       help="with --study DIR: sample with the configuration (T, prior, sampler, steps, spacing, "
                            "eps) that DIR's quality frontier found best within this many network calls")
    p.add_argument("--study", help="a study directory holding frontier.json (with --nfe)")
    p.add_argument("--ts", help="a grid file from `difftime grid`: its times, sampler, eps and NFE")
    p.add_argument("--n", type=_positive_int, default=64)
    p.add_argument("--seed", type=_nonnegative_int, default=0)
    p.add_argument("--weights", choices=["ema", "model"], default="ema")
    p.add_argument("--out", required=True, help="output .npz (samples in data space)")
    p.add_argument("--grid", help="also write a PNG grid (images) or scatter plot (2-D data)")
    add_device_argument(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("evaluate", help="ELBO terms and PF-ODE likelihood in bits/dim at a horizon T")
    p.add_argument("run", help="run directory")
    p.add_argument("--T", type=_positive_float, help="horizon (default: training T)")
    p.add_argument("--prior", default="standard", help="standard, or a fitted family: gaussian, flow, glow")
    p.add_argument("--metrics", default="elbo,nll",
                   help="comma list of: elbo, nll (likelihood); fid, fd, kid, pr (images); mmd, swd (2-D)")
    _sampler_arguments(p, " for the quality metrics")
    qsteps = p.add_mutually_exclusive_group()
    qsteps.add_argument("--steps", type=_positive_int, default=10)
    qsteps.add_argument("--steps-per-unit-time", type=_positive_float)
    p.add_argument("--split", choices=["test", "train"], default="test")
    p.add_argument("--n", type=_positive_int, default=256, help="number of examples")
    p.add_argument("--dequant-repeats", type=_positive_int, default=1)
    p.add_argument("--n-t", type=_positive_int, default=64, help="(t, z) draws per example for the ELBO")
    p.add_argument("--tol", type=_positive_float, default=1e-5, help="rtol = atol of the PF-ODE solve")
    p.add_argument("--headroom", type=_comma_list(str), metavar="FAMILIES",
                   help="comma list of priors (standard, gaussian, flow, glow) whose headroom at T to measure: "
                        "CE(prior) - CE(the model's own PF-ODE marginal) on the same held-out x_T")
    p.add_argument("--headroom-n", type=_int_at_least(2), default=200, help="held-out x_T for --headroom")
    p.add_argument("--divergence", choices=["auto", "exact", "hutchinson"], default="auto")
    p.add_argument("--seed", type=_nonnegative_int, default=0)
    p.add_argument("--weights", choices=["ema", "model"], default="ema")
    p.add_argument("--out", help="write the full result as JSON here")
    add_device_argument(p)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("study", help="measure the T trade-off over a grid of T x prior x sampler, with a report",
                       epilog="Under torchrun (torchrun --nproc_per_node N -m difftime.cli -- study ...; the -- stops "
                       "torchrun reading --run as its --run-path) the ranks share the training of per-T networks, "
                       "prior fits, grids, likelihood and sampling batches and feature extraction, with the same "
                       "results at any world size.")
    p.add_argument("--preset", help="preset (training + study settings): digits, toy, gaussian, mnist, ...")
    p.add_argument("--config", help="JSON config file merged over the preset")
    p.add_argument("--out", required=True, help="study directory; rerunning with it resumes")
    p.add_argument("--run", help="use this trained run (truncate mode) instead of training one")
    p.add_argument("--T-grid", type=_comma_list(_positive_float), help="comma list of T, e.g. 0.2,0.4,1.0")
    p.add_argument("--priors", type=_comma_list(str), help="comma list of: standard, gaussian, flow, glow")
    p.add_argument("--samplers", type=_comma_list(str), help="comma list of: {SAMPLERS}; ode (= heun), sde (= em)")
    p.add_argument("--spacing", help="time grid of every sampler: auto (each sampler's own, the default) or one of "
                   "{SPACINGS}")
    p.add_argument("--eps", type=_positive_float, help="sampling end time (default: max({DEFAULT_SAMPLE_EPS}, the "
                   "run's eps)); the likelihoods keep the run's eps")
    p.add_argument("--nfe-budgets", type=_comma_list(_positive_int),
                   help="NFE budgets of the quality frontier, e.g. 4,6,10,20")
    p.add_argument("--frontier-grids", type=_comma_list_or_none,
                   help="optimized grids the frontier also tries: gaussian, gits (comma list); none: only spacings")
    p.add_argument("--frontier-samplers", type=_comma_list_or_none,
                   help="samplers run at exactly each NFE budget for the frontier, e.g. dpm++2m,ipndm; none: skip")
    p.add_argument("--mode", choices=["truncate", "per-T"],
                   help="truncate: one model on [eps, 1] serves every T; per-T: one model trained per T")
    p.add_argument("--steps", type=_positive_int, help="training steps per model")
    p.add_argument("--n-samples", type=_positive_int, help="samples per quality measurement")
    p.add_argument("--n-likelihood", type=_positive_int, help="test examples for the likelihoods")
    p.add_argument("--steps-per-unit-time", type=_positive_float, help="budget proportional to T: round(K T) steps")
    p.add_argument("--fixed-steps", type=_positive_int, help="the one step budget shared by every T")
    p.add_argument("--prior-steps", type=_positive_int, help="optimizer steps to fit each auxiliary prior")
    p.add_argument("--fid", action="store_true", help="also compute Inception FID (slow on CPU)")
    p.add_argument("--seed", type=_nonnegative_int)
    add_device_argument(p)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_study)

    add_grid_parser(sub, _positive_float, _positive_int, _nonnegative_int, add_device_argument)

    p = sub.add_parser("import", help="wrap a pretrained DDPM (diffusers:DIR) as a run directory, for every command")
    p.add_argument("source", help="diffusers:DIR, a local UNet2DModel + linear-beta DDPM scheduler (no hub access)")
    p.add_argument("--data", required=True, help="the data the model was trained on, e.g. cifar10:DIR (for fit-prior"
                   " and the metrics); its shape must match the UNet's")
    p.add_argument("--out", required=True, help="new run directory")
    p.add_argument("--seed", type=_nonnegative_int, default=0, help="seed for generated data sources")
    p.set_defaults(func=cmd_import)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    retain_freed_memory()
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except DifftimeError as exc:
        if debug:
            raise
        print(f"difftime: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, MemoryError) as exc:
        if debug:
            raise
        print(f"difftime: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("difftime: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
