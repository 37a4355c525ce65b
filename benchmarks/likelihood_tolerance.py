"""PF-ODE tolerance against the error that matters to a study: paired differences between horizons.

A study reports bits/dim at each T and, above all, the paired difference between horizons
(adjacent T, and T against T_ref), whose statistical noise is its paired standard error over
the study's n_pfode examples. The solver's tolerance only has to make the solver's error in those
differences small against that noise; the absolute bits/dim may carry a larger error that cancels
in the difference (one solve from eps lands on every T, so the error made below the smaller T is
shared).

For each model, the same test examples (one dequantization) and one fixed Rademacher probe are
solved in truncate mode (one solve, eps to 1, landing on T = 0.2, 0.4, ..., 1.0, standard prior at
each) by every (method, variable, tolerance), and once by a tight reference (a float64 copy of the
network, dopri5 in log-SNR at --ref-tol, the same probe). Reported per solve: NFE, wall seconds,
the largest per-example |bits/dim error| at T = 1, the error of the mean adjacent-T difference (the
figure the study reports, worst over the adjacent pairs) and of the mean T - 1 difference, and
their ratio to the paired standard error of those differences at the study's n (the reference's
per-example spread / sqrt(n_study)). A tolerance is enough when that ratio is below 0.1: the solver
then adds under 0.5% to the variance of the reported difference.

Cases: the digits preset model (the benchmark cache) and, with --run28, a trained 28x28 run
(runs/mnist-cpu). Run at one thread; with other jobs on the machine the NFE are exact and the
wall times are indicative only.

    python benchmarks/likelihood_tolerance.py [--n 64] [--run28 runs/mnist-cpu] [--n28 24]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import digits_run, row, standalone

from difftime.data import load_data
from difftime.likelihood import ode_flow
from difftime.priors import StandardPrior
from difftime.run import Run, load_run

TS = (0.2, 0.4, 0.6, 0.8, 1.0)
TOLS = (1e-3, 3e-4, 1e-4, 3e-5, 1e-5)
SOLVERS = (("bosh3", "t"), ("dopri5", "t"), ("bosh3", "logsnr"))
ENOUGH = 0.1  # solver error / paired se of the difference below which the tolerance is enough


def _bpd(run: Run, x: torch.Tensor, probe_seed: int, dtype=torch.float32, **solve: Any) -> tuple[np.ndarray, int]:
    """Per-example bits/dim (up to the dequantization offset, which cancels) at every T of TS: (len(TS), n)."""
    model = run.model if dtype == torch.float32 else copy.deepcopy(run.model).to(dtype)
    gen = torch.Generator().manual_seed(probe_seed)
    x_T, integral, nfe = ode_flow(model, run.sde, x.to(dtype), list(TS), divergence="hutchinson", generator=gen,
                                  **solve)
    d = x[0].numel()
    out = []
    for k, T in enumerate(TS):
        prior = StandardPrior.for_sde(run.sde, T, run.shape)
        log_p = prior.log_prob(x_T[k].double()).double() + integral[k].double()
        out.append((-log_p / (d * math.log(2))).numpy())
    return np.stack(out), int(nfe)


def case(name: str, run: Run, n: int, n_study: int, ref_tol: float) -> dict[str, Any]:
    data = load_data(run.config["resolved"]["data"], seed=run.config["config"]["seed"])
    x = run.scaler.encode(data.test[:n], generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    ref, ref_nfe = _bpd(run, x, 1, torch.float64, rtol=ref_tol, atol=ref_tol, method="dopri5", variable="logsnr")
    ref_wall = time.perf_counter() - start
    print(f"{name}: reference tol {ref_tol:g} float64 dopri5/logsnr: NFE {ref_nfe}, {ref_wall:.0f} s", flush=True)
    adjacent = ref[1:] - ref[:-1]  # (len(TS) - 1, n): bpd(T_k+1) - bpd(T_k)
    to_top = ref[:-1] - ref[-1]
    se_adjacent = adjacent.std(axis=1, ddof=1) / math.sqrt(n_study)
    se_top = to_top.std(axis=1, ddof=1) / math.sqrt(n_study)
    rows = []
    for method, variable in SOLVERS:
        for tol in TOLS:
            start = time.perf_counter()
            bpd, nfe = _bpd(run, x, 1, rtol=tol, atol=tol, method=method, variable=variable)
            wall = time.perf_counter() - start
            err_adj = np.abs((bpd[1:] - bpd[:-1]).mean(1) - adjacent.mean(1))
            err_top = np.abs((bpd[:-1] - bpd[-1]).mean(1) - to_top.mean(1))
            r = {"method": method, "variable": variable, "tol": tol, "nfe": nfe, "wall_s": wall,
                 "abs_err_max_T1": float(np.abs(bpd[-1] - ref[-1]).max()),
                 "abs_err_mean_T1": float(abs(bpd[-1].mean() - ref[-1].mean())),
                 "diff_err_adjacent": float(err_adj.max()), "diff_err_to_T1": float(err_top.max()),
                 "diff_err_example_max": float(np.abs((bpd[1:] - bpd[:-1]) - adjacent).max()),
                 "ratio_adjacent": float((err_adj / se_adjacent).max()), "ratio_to_T1": float((err_top / se_top).max())}
            rows.append(r)
            print(f"  {method}/{variable} tol {tol:g}: NFE {nfe}, {wall:.1f} s, |bpd err| T=1 max "
                  f"{r['abs_err_max_T1']:.2e}, mean-diff err adjacent {r['diff_err_adjacent']:.2e} "
                  f"({r['ratio_adjacent']:.3f} se), to T=1 "
                  f"{r['diff_err_to_T1']:.2e} ({r['ratio_to_T1']:.3f} se)", flush=True)
    enough = {}
    for method, variable in SOLVERS:
        ok = [r for r in rows if r["method"] == method and r["variable"] == variable
              and max(r["ratio_adjacent"], r["ratio_to_T1"]) < ENOUGH]
        enough[f"{method}/{variable}"] = max((r["tol"] for r in ok), default=None)
    return {"case": name, "n": n, "n_study": n_study, "Ts": TS, "reference": {"tol": ref_tol, "nfe": ref_nfe,
            "wall_s": ref_wall, "dtype": "float64", "method": "dopri5", "variable": "logsnr"},
            "se_adjacent": se_adjacent.tolist(), "se_to_T1": se_top.tolist(),
            "mean_adjacent": adjacent.mean(1).tolist(), "rows": rows, "loosest_enough_tol": enough}


STUDY_TOL = 1e-4  # the study's default tolerance (difftime.config: study.tol) and the mnist-cpu preset's


def rows_of(cases: list[dict[str, Any]]) -> list[dict]:
    """Per case: at the study's tolerance with the default solver, the solver's error in the reported
    differences against a tenth of their paired se (ratio < 1: enough), and its NFE against the
    loosest ladder step that is enough."""
    rows = []
    for c in cases:
        at = next(r for r in c["rows"] if (r["method"], r["variable"], r["tol"]) == ("bosh3", "t", STUDY_TOL))
        worst = max(at["ratio_adjacent"], at["ratio_to_T1"])
        rows.append(row("likelihood_tolerance", f"PF-ODE at the study's tol {STUDY_TOL:g}, {c['case']}, {c['n']} "
                        f"examples: solver error of the mean T differences / their paired se at n={c['n_study']} "
                        f"(adjacent {at['diff_err_adjacent']:.1e}, to T=1 {at['diff_err_to_T1']:.1e} bits/dim)",
                        worst, ENOUGH, "se", "bosh3 in t (the default)", "enough: a tenth of the se"))
        tight = next(r for r in c["rows"] if (r["method"], r["variable"], r["tol"]) == ("bosh3", "t", min(TOLS)))
        rows.append(row("likelihood_tolerance", f"PF-ODE NFE, {c['case']}: the study's tol {STUDY_TOL:g} against "
                        f"{min(TOLS):g}", at["nfe"], tight["nfe"], "NFE", f"tol {STUDY_TOL:g}", f"tol {min(TOLS):g}"))
    return rows


def section(result: dict[str, Any]) -> str:
    """The BENCHMARKS.md section: every solve of every case, and the loosest tolerance that is enough."""
    lines = ["## PF-ODE tolerance for the study's paired differences", "",
             "From `benchmarks/likelihood_tolerance.py` (not part of `make bench`). Errors are against a float64 "
             "dopri5 solve in log-SNR, in bits/dim; 'se' is the paired standard error of the same differences at "
             f"the study's n; a tolerance is enough when the solver's error is below {ENOUGH:g} se.", ""]
    for c in result["cases"]:
        ref = c["reference"]
        lines += [f"**{c['case']}**, {c['n']} test examples, T = {', '.join(f'{t:g}' for t in c['Ts'])} in one "
                  f"solve; reference tol {ref['tol']:g} ({ref['nfe']} NFE); se at n = {c['n_study']}: adjacent "
                  f"{max(c['se_adjacent']):.1e}, to T = 1 {max(c['se_to_T1']):.1e}. Loosest tolerance that is "
                  "enough: " + ", ".join(f"{k} {v:g}" if v else f"{k} none" for k, v in c["loosest_enough_tol"].items())
                  + ".", "",
                  "| solver | tol | NFE | wall s | max abs error at T=1 | error of mean adjacent difference | "
                  "/ se | error of mean difference to T=1 | / se |", "|---|---|---|---|---|---|---|---|---|"]
        for r in c["rows"]:
            lines.append(f"| {r['method']} in {r['variable']} | {r['tol']:g} | {r['nfe']} | {r['wall_s']:.1f} | "
                         f"{r['abs_err_max_T1']:.1e} | {r['diff_err_adjacent']:.1e} | {r['ratio_adjacent']:.3f} | "
                         f"{r['diff_err_to_T1']:.1e} | {r['ratio_to_T1']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=32, help="digits test examples")
    parser.add_argument("--n-study", type=int, default=200, help="examples of the study's PF-ODE (the se's n)")
    parser.add_argument("--ref-tol", type=float, default=1e-6)
    parser.add_argument("--run28", help="a trained 28x28 run (e.g. runs/mnist-cpu); skipped when not given")
    parser.add_argument("--n28", type=int, default=12)
    parser.add_argument("--ref-tol28", type=float, default=1e-6)
    parser.add_argument("--rescore", type=Path, help="a stored result: recompute its rows only")


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.rescore:
        cases = json.loads(args.rescore.read_text())["cases"]
        return {"cases": cases, "rows": rows_of(cases)}
    cases = [case("digits", digits_run(), args.n, args.n_study, args.ref_tol)]
    if args.run28:
        cases.append(case("28x28", load_run(args.run28), args.n28, args.n_study, args.ref_tol28))
    return {"cases": cases, "rows": rows_of(cases)}


if __name__ == "__main__":
    standalone("likelihood_tolerance", add_arguments, run, __doc__)
