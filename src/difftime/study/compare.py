"""Several finished studies side by side: the paper's claims with their verdicts and paired
intervals, the best T per prior, and the size of the paired standard errors, as one markdown page.

    python -m difftime.study.compare docs/mnist-per-T docs/mnist-study docs/digits-per-T > comparison.md

Each study is read from its ``results.json``; the page names each by its directory, mode and data.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from difftime.errors import DifftimeError
from difftime.io import read_json_file


def _interval(d: dict[str, Any] | None) -> str:
    if not d:
        return "-"
    return f"{d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]"


def _Ts(values: list[float]) -> str:
    return ", ".join(f"{t:g}" for t in values)


def _claim_cell(claim: dict[str, Any]) -> str:
    """The verdict and the numbers it rests on."""
    n, name = claim["numbers"], claim["name"]
    if name == "finite_best_T":
        parts = []
        for metric, m in n.get("per_metric", {}).items():
            label = "ELBO" if metric == "elbo" else "PF-ODE"
            parts.append(f"{label}: best T {m['best_T']:g}, T=1 minus it {_interval(m.get('difference'))}")
        detail = "; ".join(parts)
    elif name == "short_T_likelihood":
        detail = (f"T={n['T']:g} {n.get('elbo_difference', {}).get('prior', '')} minus T={n['T_ref']:g} standard: "
                  f"ELBO {_interval(n.get('elbo_difference'))}, PF-ODE {_interval(n.get('nll_difference'))}")
    elif name.startswith("short_T_quality"):
        detail = (f"T={n['T']:g} {n['prior']} {n['metric'].upper()} {n['value']:.2f} at NFE {n['nfe']} vs "
                  f"{n['ref_value']:.2f} at NFE {n['ref_nfe']}: {_interval(n.get('difference'))}")
    elif name == "cost_proportional_to_T":
        ratios = n["ratios"]
        low = min(ratios, key=float)
        detail = f"{n['sampler']}, T={low}: NFE x{ratios[low]['nfe']:.2f}, wall x{ratios[low]['wall']:.2f}"
    else:
        detail = ""
    return f"**{claim['verdict']}**: {detail}"


def _largest_adjacent_se(r: dict[str, Any], metric: str) -> float | None:
    rows = r.get("likelihood_paired", {}).get("metrics", {}).get(metric, {}).get("adjacent", [])
    return max((row["se"] for row in rows if row.get("se") is not None), default=None)


def compare_studies(dirs: list[str | Path]) -> str:
    """The markdown page comparing the studies in ``dirs`` (each a finished study directory)."""
    studies = []
    for d in dirs:
        path = Path(d) / "results.json"
        if not path.is_file():
            raise DifftimeError(f"{d} has no results.json; give finished study directories")
        studies.append((Path(d), read_json_file(path, "study results")))
    heads = [f"`{d.name}` ({r['settings']['mode']}, {r['config']['data']})" for d, r in studies]
    lines = ["| | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    lines.append("| test examples, ELBO / PF-ODE | " + " | ".join(
        f"{r['settings']['n_likelihood']} / {r['settings'].get('n_pfode') or r['settings']['n_likelihood']}"
        for _, r in studies) + " |")
    for metric, label in (("elbo", "ELBO"), ("nll", "PF-ODE")):
        values = [_largest_adjacent_se(r, metric) for _, r in studies]
        lines.append(f"| largest paired se of an adjacent-T difference, {label} (bits/dim) | "
                     + " | ".join("-" if v is None else f"{v:.4f}" for v in values) + " |")
    names = list(dict.fromkeys(c["name"] for _, r in studies for c in r["analyses"]["claims"]))
    for name in names:
        cells = []
        for _, r in studies:
            claim = next((c for c in r["analyses"]["claims"] if c["name"] == name), None)
            cells.append("-" if claim is None else _claim_cell(claim))
        lines.append(f"| {name.replace('_', ' ')} | " + " | ".join(cells) + " |")
    priors = list(dict.fromkeys(b["prior"] for _, r in studies for b in r["analyses"]["best_T"]))
    for prior in priors:
        cells = []
        for _, r in studies:
            b = next((b for b in r["analyses"]["best_T"] if b["prior"] == prior), None)
            cells.append("-" if b is None else
                         f"ELBO T={b['elbo_T']:g} ({b['elbo_bpd']:.4f}; ties {_Ts(b['elbo_tied'])}), "
                         f"PF-ODE T={b['pfode_T']:g} ({b['pfode_bpd']:.4f}; ties {_Ts(b['pfode_tied'])})")
        lines.append(f"| best T, {prior} prior (bits/dim) | " + " | ".join(cells) + " |")
    intro = ("Verdicts from each study's paired 95% intervals (bits/dim for likelihoods; KID x 1e3 for "
             "sample quality), read from its results.json. Differences are 'short T minus T=1' unless "
             "said otherwise: negative favours the short horizon.")
    return "\n".join([intro, "", *lines, ""])


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m difftime.study.compare STUDY_DIR [STUDY_DIR ...]", file=sys.stderr)
        return 2
    try:
        print(compare_studies(args))
    except DifftimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
