"""Shared set-up for the benchmarks: the trained digits model, the machine record, result rows.

Every benchmark module has ``add_arguments(parser)`` and ``run(args) -> dict``; the dict holds
its measurements and ``rows``: one entry per comparison, each with our figure, the peer's
figure and their ratio, measured in the same process and run. ``suite.py`` runs them all;
``python benchmarks/<name>.py`` runs one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from difftime.allocator import retain_freed_memory
from difftime.config import build_config
from difftime.data import load_data
from difftime.io import atomic_write_bytes
from difftime.run import Run, load_run
from difftime.training import saved_config, train_run

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CACHE = HERE / ".cache"  # git-ignored: the trained digits model and its priors
_PROCESS = {"malloc": "C library defaults"}  # what set_up_process chose


def digits_run(run_dir: str | None = None) -> Run:
    """``run_dir``, or the `digits` preset model trained once into benchmarks/.cache/digits.

    The same as `difftime train --preset digits --out benchmarks/.cache/digits`; an interrupted
    training resumes, a finished one is reused.
    """
    if run_dir:
        return load_run(run_dir)
    path = CACHE / "digits"
    config = build_config(preset="digits")
    exists = (path / "config.json").is_file()
    model_part = {k: v for k, v in config.items() if k != "study"}  # study settings do not change the model
    if exists and {k: v for k, v in saved_config(path).items() if k != "study"} != model_part:
        raise SystemExit(f"{path} holds a run with another config than the digits preset; delete it")
    if not exists or load_run(path).step < config["train"]["steps"]:
        print(f"training the digits preset into {path}", flush=True)
        train_run(config, path, resume=exists, progress=True)
    return load_run(path)


def flow_prior(run: Run, T: float):
    """The run's flow prior at T, fitted once with the `difftime fit-prior` defaults."""
    from difftime.evaluation import resolve_prior
    from difftime.priors import fit_run_prior, prior_dir

    if not prior_dir(run.path, "flow", T).is_dir():
        print(f"fitting a flow prior at T={T:g} (difftime fit-prior {run.path} --T {T:g} --prior flow)", flush=True)
        data = load_data(run.config["resolved"]["data"], seed=run.config["config"]["seed"])
        fit_run_prior(run.path, run.sde, run.shape, "flow", T, data, steps=2000, batch_size=256, lr=1e-3)
    return resolve_prior(run, "flow", T)


def median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median wall seconds of ``repeats`` calls, and the last call's value."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], out


def row(benchmark: str, measure: str, ours: float, peer: float, units: str, ours_is: str, peer_is: str,
        ours_se: float | None = None, peer_se: float | None = None) -> dict:
    """One comparison: our figure, the peer's figure and ours / peer (lower is better for every measure),
    with standard errors where the figures are means of noisy draws."""
    out = {"benchmark": benchmark, "measure": measure, "ours": ours, "peer": peer, "ratio": ours / peer,
           "units": units, "ours_is": ours_is, "peer_is": peer_is}
    return out if ours_se is None else {**out, "ours_se": ours_se, "peer_se": peer_se}


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        print(f"  {r['benchmark']}: {r['measure']}: ours {r['ours']:.4g} {r['units']} ({r['ours_is']}), "
              f"peer {r['peer']:.4g} ({r['peer_is']}), ratio {r['ratio']:.4g}", flush=True)


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from importlib.metadata import version

    return {"cpu": cpu or "unknown", "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "diffusers": version("diffusers"), "python": platform.python_version(),
            "platform": platform.platform(), "load_average": [round(x, 2) for x in os.getloadavg()],
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "malloc": _PROCESS["malloc"]}


def write_result(name: str, result: dict, wall_s: float, out: Path | None = None) -> Path:
    path = out or RESULTS / f"{name}.json"
    record = {"benchmark": name, "machine": machine(), "wall_s": round(wall_s, 1), **result}
    atomic_write_bytes(path, (json.dumps(record, indent=2) + "\n").encode())
    print(f"wrote {path}", flush=True)
    return path


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: stable ratios on a shared machine)")


def set_up_process(args: argparse.Namespace) -> None:
    """Threads, and the allocator setting of the difftime command (difftime.allocator), so that
    both sides of every comparison run under what a user of the command gets."""
    torch.set_num_threads(args.threads)
    _PROCESS["malloc"] = "glibc, freed memory retained" if retain_freed_memory() else "C library defaults"


def standalone(name: str, add_arguments: Callable, run: Callable, doc: str) -> None:
    """The command line of one benchmark module."""
    parser = argparse.ArgumentParser(description=doc)
    add_common_arguments(parser)
    add_arguments(parser)
    parser.add_argument("--out", type=Path, help=f"result file (default benchmarks/results/{name}.json)")
    args = parser.parse_args()
    set_up_process(args)
    start = time.perf_counter()
    result = run(args)
    print_rows(result["rows"])
    write_result(name, result, time.perf_counter() - start, args.out)
