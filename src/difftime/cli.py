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

from difftime.errors import DifftimeError


class _Parser(argparse.ArgumentParser):
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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


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
        "weighting": args.weighting,
    }.items() if v is not None}
    if args.bf16:
        train["bf16"] = True
    if args.channels_last:
        train["channels_last"] = True
    if train:
        over["train"] = train
    return over


def cmd_train(args: argparse.Namespace) -> int:
    from difftime.config import build_config, merge, validate
    from difftime.data import load_data
    from difftime.io import read_json_file
    from difftime.train import Trainer

    if args.resume:
        run = Path(args.resume)
        saved = read_json_file(run / "config.json", "run config")
        if not isinstance(saved.get("config"), dict):
            raise DifftimeError(f"{run / 'config.json'} has no 'config' object; is it a difftime run?")
        if not (run / "state.json").is_file():
            raise DifftimeError(f"{run} has no checkpoint (state.json) to resume from")
        config = merge(saved["config"], {"train": {"steps": args.steps}} if args.steps else {})
        validate(config)
        out = run
    else:
        if args.out is None:
            raise DifftimeError("train needs --out RUN (a new directory) or --resume RUN")
        out = Path(args.out)
        _check_new_output_dir(out)
        config = build_config(args.preset, args.config, _train_overrides(args))

    dataset = load_data(config["data"], seed=config["seed"])
    trainer = Trainer(config, dataset, device=args.device)
    if args.resume:
        trainer.load(out)
        print(f"resuming {out} at step {trainer.step} of {config['train']['steps']}", file=sys.stderr)
    else:
        out.mkdir(parents=True, exist_ok=True)
        trainer.write_config(out)
    start = time.perf_counter()
    last = trainer.fit(out, progress=not args.no_progress)
    params = sum(p.numel() for p in trainer.model.parameters())
    print(json.dumps({"run": str(out), "step": trainer.step, "last_loss": last.get("loss"),
                      "params": params, "wall_s": round(time.perf_counter() - start, 2)}))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from difftime.io import atomic_write_bytes, load_run
    from difftime.plots import save_samples_figure
    from difftime.sampling import euler_maruyama

    run = load_run(args.run, weights=args.weights)
    T, eps = run.sde.check_horizon(args.T if args.T is not None else run.config["config"]["train"]["T"])
    if args.steps_per_unit_time is not None:
        steps = max(1, math.ceil(args.steps_per_unit_time * (T - eps)))
    else:
        steps = args.steps
    out = Path(args.out)
    if out.suffix != ".npz":
        raise DifftimeError(f"--out must end in .npz, got {out}")
    generator = torch.Generator().manual_seed(args.seed)
    std = run.sde.prior_std(T)
    x_T = std * torch.randn((args.n, *run.shape), generator=generator)
    start = time.perf_counter()
    x0, nfe = euler_maruyama(run.model, run.sde, x_T, T, eps, steps, generator)
    wall = time.perf_counter() - start
    samples = run.scaler.decode(x0).numpy()
    buf = io.BytesIO()
    np.savez(buf, samples=samples, T=T, eps=eps, nfe=nfe, seed=args.seed)
    atomic_write_bytes(out, buf.getvalue())
    if args.grid:
        save_samples_figure(samples, args.grid, title=f"T={T:g}, NFE={nfe}")
    print(json.dumps({"out": str(out), "n": args.n, "T": T, "eps": eps, "sampler": "em",
                      "steps": steps, "nfe": nfe, "wall_s": round(wall, 3)}))
    return 0


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
    p.add_argument("--weighting", choices=["standard", "likelihood"])
    p.add_argument("--seed", type=_nonnegative_int)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward pass")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="draw samples by integrating the reverse SDE on [eps, T]")
    p.add_argument("run", help="run directory")
    p.add_argument("--T", type=_positive_float, help="horizon to start from (default: training T)")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=_positive_int, default=200)
    steps.add_argument("--steps-per-unit-time", type=_positive_float,
                       help="steps = ceil(K (T - eps)): NFE proportional to T")
    p.add_argument("--n", type=_positive_int, default=64)
    p.add_argument("--seed", type=_nonnegative_int, default=0)
    p.add_argument("--weights", choices=["ema", "model"], default="ema")
    p.add_argument("--out", required=True, help="output .npz (samples in data space)")
    p.add_argument("--grid", help="also write a PNG grid (images) or scatter plot (2-D data)")
    p.set_defaults(func=cmd_sample)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
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
