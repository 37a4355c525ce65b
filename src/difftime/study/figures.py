"""The study's figures, built as ``matplotlib.figure.Figure`` objects: no pyplot, no backend switch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from difftime.plots import image_grid, save_figure
from difftime.study.analysis import data_floor, proportional


def write_plots(summary: dict[str, Any], out: Path, metric: str | None, unit: str) -> list[tuple[str, str]]:
    floor = data_floor(summary.get("data_floor"))
    cells, s = summary["cells"], summary["settings"]
    priors = list(dict.fromkeys(c["prior"] for c in cells))
    colors = {p: colormaps["tab10"](i) for i, p in enumerate(priors)}
    written = []

    # ELBO and PF-ODE bits/dim against T, then the decomposition per prior.
    fig = Figure(figsize=(14, 4.0))
    axes = fig.subplots(1, 3, squeeze=False)
    ax = axes[0, 0]
    for p in priors:
        mine = sorted((c for c in cells if c["prior"] == p), key=lambda c: c["T"])
        Ts = [c["T"] for c in mine]
        ax.errorbar(Ts, [c["likelihood"]["elbo"]["bpd"] for c in mine],
                    yerr=[c["likelihood"]["elbo"]["bpd_se"] for c in mine], color=colors[p], marker="o",
                    capsize=3, label=f"{p}: ELBO")
        ax.errorbar(Ts, [c["likelihood"]["nll"]["bpd"] for c in mine],
                    yerr=[c["likelihood"]["nll"]["bpd_se"] for c in mine], color=colors[p], marker="s",
                    linestyle="--", capsize=3, label=f"{p}: PF-ODE")
    ax.set_xlabel("diffusion time T")
    ax.set_ylabel(f"{unit} (lower is better)")
    ax.set_title("negative ELBO and exact NLL")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    # The decomposition: the prior term is where the priors differ; the score term I and the
    # constant -R both diverge as eps -> 0 and are drawn as their finite sum, which every prior shares.
    ax = axes[0, 1]
    for p in priors:
        mine = sorted((c for c in cells if c["prior"] == p), key=lambda c: c["T"])
        ax.plot([c["T"] for c in mine], [c["likelihood"]["elbo"]["prior_bpd"] for c in mine], "-o", color=colors[p],
                label=f"prior term -P, {p}")
    mine = sorted((c for c in cells if c["prior"] == priors[0]), key=lambda c: c["T"])
    ax.plot([c["T"] for c in mine], [c["likelihood"]["elbo"]["score_bpd"] + c["likelihood"]["elbo"]["constant_bpd"]
                                     for c in mine], "k--^", label="score term + constant, I - R")
    ax.set_xlabel("diffusion time T")
    ax.set_ylabel(f"{unit} contribution")
    ax.set_title("ELBO decomposition")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax = axes[0, 2]
    for p in priors:
        mine = sorted((c for c in cells if c["prior"] == p and "prior_improvement" in c["likelihood"]),
                      key=lambda c: c["T"])
        if mine:
            ax.errorbar([c["T"] for c in mine], [c["likelihood"]["prior_improvement"]["nats"] for c in mine],
                        yerr=[c["likelihood"]["prior_improvement"]["se"] for c in mine], color=colors[p], marker="o",
                        capsize=3, label=f"{p}: E log nu - E log N")
    ax.axhline(0, color="gray", linewidth=0.6)
    ax.set_xlabel("diffusion time T")
    ax.set_ylabel("nats per example")
    ax.set_title("measured lower bound on KL(p_T || N)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out / "elbo_vs_T.png")
    written.append(("elbo_vs_T.png", f"ELBO and PF-ODE {unit} against T, the ELBO decomposition, and the "
                                     "measured prior mismatch"))

    if metric is not None:
        samplers = s["samplers"]
        fig = Figure(figsize=(5.2 * len(samplers), 4.0))
        axes = fig.subplots(1, len(samplers), squeeze=False)
        for ax, sampler in zip(axes[0], samplers, strict=False):
            for p in priors:
                mine = sorted((c for c in cells if c["prior"] == p), key=lambda c: c["T"])
                pts = [(r["nfe"], r["quality"][metric]["value"], c["T"]) for c in mine
                       if (r := proportional(c, sampler))]
                ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], "-o", color=colors[p],
                        label=f"{p}, NFE proportional to T")
                fixed = [(r["nfe"], r["quality"][metric]["value"]) for c in mine for r in c["sampling"]
                         if r["sampler"] == sampler and r["budget"] == "fixed"]
                if fixed:
                    ax.scatter([x for x, _ in fixed], [y for _, y in fixed], facecolors="none", edgecolors=colors[p],
                               marker="D", label=f"{p}, fixed {s['fixed_steps']} steps")
            ref = next((c for c in cells if c["T"] == summary["T_ref"] and c["prior"] == "standard"), None)
            if ref is not None:
                line = sorted((r["nfe"], r["quality"][metric]["value"]) for r in ref["sampling"]
                              if r["sampler"] == sampler)
                ax.plot([x for x, _ in line], [y for _, y in line], "k:", marker="x",
                        label=f"T={summary['T_ref']:g} standard, fewer steps")
            if metric in floor:
                value, se = floor[metric]["value"], floor[metric].get("se", 0.0)
                ax.axhspan(value - 1.96 * se, value + 1.96 * se, color="gray", alpha=0.2,
                           label="held-out real data, 95% interval")
            # Every prior spends the same NFE at a given T: name the horizons once, on the top axis.
            top = ax.twiny()
            top.set_xlim(ax.get_xlim())
            marks = sorted({(r["nfe"], c["T"]) for c in cells if (r := proportional(c, sampler))})
            top.set_xticks([x for x, _ in marks], [f"T={T:g}" for _, T in marks], fontsize=7)
            values = [r["quality"][metric]["value"] for c in cells for r in c["sampling"] if metric in r["quality"]]
            log = min(values, default=1.0) > 0  # KID is unbiased, so it can be negative near the floor
            ax.set_yscale("log" if log else "symlog", **({} if log else {"linthresh": 1e-4}))
            ax.set_xlabel("NFE per sample")
            ax.set_ylabel(f"{metric.upper()} (lower is better, {'log' if log else 'symlog'} scale)")
            ax.set_title(f"quality against cost, {sampler} (top: NFE proportional to T)", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        save_figure(fig, out / "quality_vs_nfe.png")
        written.append(("quality_vs_nfe.png", f"{metric.upper()} against NFE per sampler"))

    frontier = summary.get("analyses", {}).get("frontier", {}).get("frontier", [])
    if metric is not None and frontier:
        fig = Figure(figsize=(6.4, 4.2))
        ax = fig.subplots()
        for side, style, label in (("best", "-o", f"best with T < {summary['T_ref']:g} or a fitted prior"),
                                   ("reference", "k:s", f"T={summary['T_ref']:g} standard prior")):
            pts = [(e["budget"], e[side]) for e in frontier if e[side] is not None]
            if not pts:
                continue
            ys = [c["value"] for _, c in pts]
            errs = [c["uncertainty"] or 0.0 for _, c in pts]
            ax.errorbar([b for b, _ in pts], ys, yerr=[[1.96 * e for e in errs], [1.96 * e for e in errs]], fmt=style,
                        capsize=3, label=f"{label} (95%)")
            if side == "best":
                for b, c in pts:
                    ax.annotate(f"T={c['T']:g}\n{c['prior']}\n{c['sampler']}", (b, c["value"]),
                                textcoords="offset points", xytext=(0, -28), ha="center", fontsize=6)
        if metric in floor:
            value, se = floor[metric]["value"], floor[metric].get("se", 0.0)
            ax.axhspan(value - 1.96 * se, value + 1.96 * se, color="gray", alpha=0.2,
                       label="held-out real data, 95% interval")
        ax.set_xlabel("NFE budget N (best configuration with NFE <= N)")
        ax.set_ylabel(f"{metric.upper()} (lower is better)")
        ax.set_title("quality frontier: how much diffusion time is enough for N network calls", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        save_figure(fig, out / "frontier.png")
        written.append(("frontier.png", f"the quality frontier: best {metric.upper()} within each NFE budget, against "
                                        f"T={summary['T_ref']:g} with the standard prior"))

    # Every T x prior: the grid of each cell's samples (or a scatter for 2-D data).
    Ts = sorted({c["T"] for c in cells})
    fig = Figure(figsize=(2.6 * len(priors), 2.6 * len(Ts)))
    axes = fig.subplots(len(Ts), len(priors), squeeze=False)
    for i, T in enumerate(Ts):
        for j, p in enumerate(priors):
            ax = axes[i, j]
            cell = next((c for c in cells if c["T"] == T and c["prior"] == p), None)
            path = out / cell["artifacts"]["samples"] if cell and "artifacts" in cell else out / "missing"
            ax.set_xticks([])
            ax.set_yticks([])
            if not path.is_file():
                ax.set_axis_off()
                continue
            with np.load(path) as z:  # written by the study itself: plain arrays, no pickles
                x, nfe = z["samples"], int(z["nfe"])
            if x.ndim == 4:
                grid = image_grid(x[: s["grid_images"]])
                ax.imshow(grid, cmap="gray" if grid.ndim == 2 else None, interpolation="nearest")
            else:
                ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.4, color=colors[p])
                ax.set_aspect("equal", adjustable="datalim")
            ax.set_title(f"T={T:g}, {p}, NFE {nfe}", fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "samples.png")
    written.append(("samples.png", "samples of every T x prior (NFE proportional to T, first sampler)"))
    return written


