"""The study report: results.json, results.csv, report.md and its plots, from the finished cells.

Everything here is computed from the cells' measured numbers; nothing is assumed. The analysis
(:mod:`~difftime.study.analysis`) decides, this module writes tables, the figures module draws.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from difftime.headroom import headroom_table
from difftime.io import atomic_write_bytes, save_json
from difftime.study.analysis import (
    LOWER_IS_BETTER,
    below_floor,
    best_T,
    ci_text,
    claims,
    data_floor,
    flat_rows,
    nfe_savings,
    primary_metric,
    quality_columns,
    quality_frontier,
)
from difftime.study.figures import write_plots


def _csv(rows: list[dict[str, Any]]) -> bytes:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


def _in_unit(cell: dict[str, Any], scale: float) -> dict[str, Any]:
    """A copy of ``cell`` whose bits/dim figures are multiplied by ``scale`` (d ln 2 gives nats per example)."""
    if scale == 1.0:
        return cell
    lk = cell["likelihood"]
    elbo = {k: v * scale if k.endswith(("bpd", "bpd_se")) else v for k, v in lk["elbo"].items()}
    nll = {k: v * scale if k in ("bpd", "bpd_se") else v for k, v in lk["nll"].items()}
    return {**cell, "likelihood": {**lk, "elbo": elbo, "nll": nll}}


def _f(x: float, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _pm(value: float, unc: float | None, digits: int = 3) -> str:
    return _f(value, digits) + (f" +- {_f(unc, digits)}" if unc is not None else "")


def _config_text(c: dict[str, Any]) -> str:
    grid = f", optimized in {c['grid_wall_s']:.1f} s" if c.get("grid_wall_s") is not None else ""
    return f"T={c['T']:g}, {c['prior']}, {c['sampler']} {c['steps']} steps" + (
        f" ({c['spacing']}{' grid' if grid else ''}{grid})" if c.get("spacing") else "")


def frontier_record(summary: dict[str, Any], metric: str | None, floor_sd: float | None) -> dict[str, Any]:
    """frontier.json: the quality frontier and what it was computed from."""
    s = summary["settings"]
    frontier = quality_frontier(summary["cells"], metric, s.get("nfe_budgets", []), summary["T_ref"],
                                floor_sd) if metric else []
    return {"metric": metric, "T_ref": summary["T_ref"], "budgets": s.get("nfe_budgets", []),
            "frontier_samplers": s.get("frontier_samplers", []), "sample_eps": s.get("sample_eps"),
            "spacing": s.get("spacing"), "floor_sd": floor_sd, "n_samples": s["n_samples"],
            "frontier": frontier}


def _without_replicates(obj: Any) -> Any:
    """A copy without the bootstrap replicate lists (they stay in cells/*.json and data_floor.json)."""
    if isinstance(obj, dict):
        return {k: _without_replicates(v) for k, v in obj.items() if k != "replicates"}
    if isinstance(obj, list):
        return [_without_replicates(v) for v in obj]
    return obj


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


@dataclass(frozen=True)
class _Report:
    """What the sections of report.md read: the summary (cells sorted, analyses added), the settings,
    and the cells in the report's unit (bits/dim, or nats per example for continuous data)."""

    summary: dict[str, Any]
    out: Path
    s: dict[str, Any]
    config: dict[str, Any]
    cells: list[dict[str, Any]]
    metric: str | None
    samplers: list[str]
    floor: dict[str, Any] | None
    paired: dict[str, Any]
    unit: str
    short: str
    scale: float
    analyses: dict[str, Any]
    frontier: dict[str, Any]
    rows: list[dict[str, Any]]
    plots: list[tuple[str, str]]


def write_report(summary: dict[str, Any], out: str | Path) -> None:
    """frontier.json, results.json, results.csv, the plots and report.md in ``out``, from the finished cells."""
    rep = _write_results(summary, Path(out))
    md: list[str] = []
    for section in (_overview_md, _likelihood_md, _paired_md, _headroom_md, _quality_md, _best_T_md,
                    _savings_md, _frontier_md, _fid_headline_md, _claims_md, _wall_md):
        md += section(rep)
    atomic_write_bytes(rep.out / "report.md", ("\n".join(md) + "\n").encode())


def _write_results(summary: dict[str, Any], out: Path) -> _Report:
    """Sort the cells, run the analyses and write frontier.json, results.json, results.csv and the plots."""
    cells = sorted(summary["cells"], key=lambda c: (c["T"], summary["settings"]["priors"].index(c["prior"])
                                                     if c["prior"] in summary["settings"]["priors"] else 99))
    summary = {**summary, "cells": cells}
    s, config = summary["settings"], summary["config"]
    metric = primary_metric(cells)
    samplers = s["samplers"]
    floor = data_floor(summary.get("data_floor"))
    paired = summary.get("likelihood_paired", {})
    # Continuous data has no bits/dim: its likelihoods are shown in nats per example (docs/design.md §6).
    continuous = cells[0]["likelihood"]["levels"] is None
    unit, short = ("nats/example", "nats") if continuous else ("bits/dim", "bpd")
    scale = cells[0]["likelihood"]["dim"] * math.log(2) if continuous else 1.0
    shown = [_in_unit(c, scale) for c in cells]
    below = [{"T": c["T"], "prior": c["prior"], "sampler": r["sampler"], "nfe": r["nfe"], **flag}
             for c in cells for r in c["sampling"] if metric and (flag := below_floor(r, floor, metric))]
    analyses = {"primary_metric": metric, "best_T": best_T(cells, paired, metric, samplers),
                "nfe_savings": nfe_savings(cells, metric, samplers, summary["T_ref"]) if metric else [],
                "below_floor": below,
                "claims": [c.to_dict() for c in claims(shown, paired, metric, samplers, summary["T_ref"], s["mode"],
                                                       floor, unit, scale)]}
    frontier = frontier_record(summary, metric, None)
    analyses["frontier"] = frontier
    summary["analyses"] = analyses
    rows = flat_rows(cells)
    save_json(out / "frontier.json", frontier)
    save_json(out / "results.json", _without_replicates(summary))
    atomic_write_bytes(out / "results.csv", _csv(rows))
    plots = write_plots({**summary, "cells": shown}, out, metric, unit)
    return _Report(summary=summary, out=out, s=s, config=config, cells=shown, metric=metric, samplers=samplers,
                   floor=floor, paired=paired, unit=unit, short=short, scale=scale, analyses=analyses,
                   frontier=frontier, rows=rows, plots=plots)


# --- report.md, section by section -----------------------------------------------------------------
def _overview_md(rep: _Report) -> list[str]:
    """The title and what was measured: models, likelihood settings and sampling budgets."""
    summary, s, config, cells, samplers = rep.summary, rep.s, rep.config, rep.cells, rep.samplers
    first = cells[0]["likelihood"]
    md = [f"# How much diffusion time is enough? A difftime study on `{config['data']}`", ""]
    md.append(f"Mode `{s['mode']}`, {config['sde']['kind'].upper()} SDE, eps = {first['eps']:g}, "
              f"T in {{{', '.join(f'{T:g}' for T in s['T_grid'])}}}, priors {', '.join(s['priors'])}, "
              f"samplers {', '.join(samplers)}. Seed {config['seed']}.")
    for run, rec in summary["training"].items():
        md.append(f"- Model `{run}`: trained on [eps, {rec['T_train']:g}] for {rec['steps']} steps, "
                  f"{rec['params']:,} parameters, {rec['wall_s']:.0f} s.")
    if summary.get("run"):
        md.append(f"- Pretrained model `{summary['run']}` (not trained by this study).")
    n_pfode = first.get("nll", {}).get("n", first["n"])
    md.append(f"- Likelihoods: the first {first['n']} test examples"
              + (f" (the PF-ODE on the first {n_pfode})" if n_pfode != first["n"] else "")
              + f", {first['dequant_repeats']} dequantization "
              f"draw(s), ELBO with "
              + (f"{first['elbo']['n_t'] * len(s['T_grid'])} importance-sampled t on "
                 f"[eps, {max(s['T_grid']):g}], each T "
                 f"using those below it (nested), " if first["elbo"].get("design") == "nested" else
                 f"{first['elbo']['n_t']} importance-sampled t per T, ")
              + f"{first['elbo']['n_prior']} prior draws per example, PF-ODE by the Bogacki-Shampine 3(2) pair with "
              f"per-example step control at tol {s['tol']:g} ({s['divergence']} divergence).")
    md.append(f"- Samples: {s['n_samples']} per entry, against the "
              f"{(summary.get('data_floor') or {}).get('reference_split', 'test')} split; step budgets: "
              f"round({s['steps_per_unit_time']} x T) steps (NFE proportional to T)"
              + (f" and {s['fixed_steps']} fixed steps" if s["fixed_steps"] else "")
              + (f"; {', '.join(s['frontier_samplers'])} at exactly NFE "
                          f"{', '.join(map(str, s['nfe_budgets']))} for the quality frontier"
                          if s.get("frontier_samplers") else "")
              + (f". Sampling ends at eps = {s['sample_eps']:g} (spacing: {s.get('spacing', 'auto')})"
                 if "sample_eps" in s else "")
              + ("; the network runs under bfloat16 autocast while sampling (likelihoods stay float32)"
                 if s.get("sample_precision") == "bf16" else "") + ".")
    return md


def _likelihood_md(rep: _Report) -> list[str]:
    """The likelihood table: every cell's ELBO and its four parts, PF-ODE, NFE and KL bound."""
    cells, unit, short = rep.cells, rep.unit, rep.short
    md: list[str] = []
    md.append("")
    md.append(f"## Likelihood ({unit}, lower is better)")
    md.append("")
    md.append("The ELBO column is the sum of its four parts: prior term (-P), score term (I), constant (-R) and "
              "the dequantization offset. KL >= is the measured prior improvement E log nu(x_T) - E log N(x_T), a "
              "lower bound on KL(p_T || N) in nats per example.")
    md.append("")
    lrows = []
    for c in cells:
        e, n = c["likelihood"]["elbo"], c["likelihood"]["nll"]
        kl = c["likelihood"].get("prior_improvement")
        lrows.append([f"{c['T']:g}", c["prior"], f"{_f(e['bpd'])} +- {_f(e['bpd_se'])}", _f(e["prior_bpd"]),
                      _f(e["score_bpd"]), _f(e["constant_bpd"]), _f(e["dequantization_bpd"]),
                      f"{_f(n['bpd'])} +- {_f(n['bpd_se'])}", f"{n['nfe_mean']:.0f}",
                      f"{kl['nats']:.2f} +- {kl['se']:.2f}" if kl else "-"])
    md.append(_table(["T", "prior", f"ELBO {short}", "prior term", "score term", "constant", "dequant.",
                      f"PF-ODE {short}", "ODE NFE", "KL(p_T||N) >="], lrows))
    md.append("")
    return md


def _paired_md(rep: _Report) -> list[str]:
    """The paired likelihood differences: adjacent T, and every cell against T_ref standard."""
    summary, cells, paired, unit, scale = rep.summary, rep.cells, rep.paired, rep.unit, rep.scale
    first = cells[0]["likelihood"]
    md: list[str] = []
    pm = paired.get("metrics", {})
    if pm:
        md.append(f"### Paired differences ({unit}, mean [95% interval])")
        md.append("")
        md.append(f"Every cell is estimated on the same examples and draws (dequantization, x_T noise, t and z, "
                  f"Hutchinson probes; ELBO design `{summary.get('elbo_design', '-')}`"
                  + (", one PF-ODE solve for the whole T grid" if first["nll"].get("one_solve") else "")
                  + "), so differences have paired standard errors, far below the per-cell ones above.")
        md.append("")
        arows = []
        for a_e in pm.get("elbo", {}).get("adjacent", []):
            a_n = next((v for v in pm.get("nll", {}).get("adjacent", [])
                        if (v["prior"], v["T_a"], v["T_b"]) == (a_e["prior"], a_e["T_a"], a_e["T_b"])), None)
            arows.append([a_e["prior"], f"{a_e['T_b']:g} - {a_e['T_a']:g}", ci_text(a_e, scale),
                          _f(scale * a_e["se"], 4), ci_text(a_n, scale) if a_n else "-",
                          _f(scale * a_n["se"], 4) if a_n else "-"])
        md.append(_table(["prior", "T difference", "ELBO", "se", "PF-ODE", "se"], arows))
        md.append("")
        rrows = []
        for v in pm.get("elbo", {}).get("vs_reference", []):
            n = next((w for w in pm.get("nll", {}).get("vs_reference", [])
                      if (w["T"], w["prior"]) == (v["T"], v["prior"])),
                     None)
            rrows.append([f"{v['T']:g}", v["prior"], ci_text(v, scale), ci_text(n, scale) if n else "-"])
        if rrows:
            md.append(f"Each cell minus T={summary['T_ref']:g} with the standard prior:")
            md.append("")
            md.append(_table(["T", "prior", "ELBO", "PF-ODE"], rrows))
            md.append("")
    return md


def _headroom_md(rep: _Report) -> list[str]:
    """The prior headroom table, when the study measured it."""
    summary = rep.summary
    md: list[str] = []
    if summary.get("headroom"):
        md.append("## Prior headroom: how much a better prior could still gain")
        md.append("")
        md.append("Per T, on held-out x_T drawn from p_T: the cross-entropy of each prior minus that of the "
                  "diffusion model's own marginal at T (N(0, I) at T_max carried down by the PF-ODE, one solve "
                  "from T), paired on the same x_T, in nats per example with 95% intervals. A better prior at T can "
                  "gain at most about this much; a negative headroom means the prior already models p_T better "
                  "than the model's marginal does. Beside it, the measured lower bound on KL(p_T || N).")
        md.append("")
        md.append(headroom_table(summary["headroom"]))
        md.append("")
    return md


def _quality_md(rep: _Report) -> list[str]:
    """Sample quality: the data floor and its flags, then one table per sampler."""
    summary, s, cells, metric, samplers, floor, analyses, rows = (
        rep.summary, rep.s, rep.cells, rep.metric, rep.samplers, rep.floor, rep.analyses, rep.rows)
    md: list[str] = []
    if metric:
        md.append(f"## Sample quality ({metric.upper()} ranks; lower is better)")
        md.append("")
        if floor:
            fl = summary["data_floor"]
            md.append(f"{metric.upper()} decides: it is an unbiased estimate (the full U-statistic), so unlike FD its "
                      "value at a finite sample size is not dominated by its own bias. Each score carries the sd of "
                      f"{s.get('bootstrap', 0)} bootstrap resamples of its samples (the reference held fixed); the "
                      "resamples are the same for every sample set, and cells that share a prior share their x_T "
                      "seeds, so differences between cells are paired bootstrap intervals.")
            md.append("")
            md.append(f"The floor: {fl['n_samples']} held-out real examples (the {fl['split']} split) against the same "
                      f"reference (the {fl['reference_split']} split), scored exactly as samples are: "
                      + ", ".join(f"{k.upper()} {_pm(v['value'], v.get('se'), 4)}" for k, v in floor.items()
                                  if k in LOWER_IS_BETTER)
                      + (f", precision {floor['pr']['precision']:.3f}, recall {floor['pr']['recall']:.3f}"
                         if "pr" in floor else "")
                      + ". A sample set that scores better than this beyond its interval is flagged below: a sign of "
                      "low diversity or metric bias, not of a better model.")
            if analyses["below_floor"]:
                md.append("")
                md.append("Flagged (better than held-out real data): " + "; ".join(
                    f"T={b['T']:g} {b['prior']} {b['sampler']} NFE {b['nfe']} ({b['difference']:+.4g} "
                    f"[{b['lo']:+.4g}, {b['hi']:+.4g}], recall {_f(b['recall'])})" for b in analyses["below_floor"]))
        for sampler in dict.fromkeys([*samplers, *s.get("frontier_samplers", [])]):
            md.append("")
            md.append(f"### {sampler}")
            md.append("")
            qrows = []
            for c in cells:
                for r in c["sampling"]:
                    if r["sampler"] != sampler:
                        continue
                    q = quality_columns(r)
                    qrows.append([f"{c['T']:g}", c["prior"], r["budget"], str(r["steps"]), str(r["nfe"]),
                                  *[_pm(q.get(m, math.nan), q.get(f"{m}_se"), 4) for m in LOWER_IS_BETTER
                                    if any(m in x for x in rows)],
                                  *([_f(q["precision"]), _f(q["recall"])] if "precision" in q else []),
                                  f"{r['sample_wall_s']:.1f}"])
            names = [m.upper() for m in LOWER_IS_BETTER if any(m in x for x in rows)]
            pr = ["precision", "recall"] if any("precision" in x for x in rows) else []
            md.append(_table(["T", "prior", "budget", "steps", "NFE", *names, *pr, "sampling s"], qrows))
        md.append("")
    return md


def _best_T_md(rep: _Report) -> list[str]:
    """The best T per prior, by ELBO, PF-ODE and quality, with the T values tied with it."""
    metric, short, scale, analyses = rep.metric, rep.short, rep.scale, rep.analyses
    md: list[str] = []
    md.append("## Best T per prior")
    md.append("")
    md.append("The best T, and in braces every T whose paired 95% interval against it contains zero.")
    md.append("")
    brows = []

    def tied(ts: list[float]) -> str:
        return "{" + ", ".join(f"{T:g}" for T in ts) + "}"

    for b in analyses["best_T"]:
        quality = "; ".join(f"{k}: T={v['T']:g} ({metric.upper()} {v['value']:.4g}, NFE {v['nfe']}) {tied(v['tied'])}"
                            for k, v in b["quality"].items()) or "-"
        brows.append([b["prior"],
                      f"{b['elbo_T']:g} ({scale * b['elbo_bpd']:.3f}) {tied(b['elbo_tied'])}" if "elbo_T" in b else "-",
                      f"{b['pfode_T']:g} ({scale * b['pfode_bpd']:.3f}) {tied(b['pfode_tied'])}" if "pfode_T" in b
                      else "-", quality])
    md.append(_table(["prior", f"by ELBO ({short})", f"by PF-ODE ({short})", "by quality, NFE proportional to T"],
                     brows))
    md.append("")
    return md


def _savings_md(rep: _Report) -> list[str]:
    """The NFE saving at equal quality against T_ref with the standard prior."""
    summary, metric, analyses = rep.summary, rep.metric, rep.analyses
    md: list[str] = []
    if analyses["nfe_savings"]:
        md.append(f"## NFE saving at equal quality against T={summary['T_ref']:g} with the standard prior")
        md.append("")
        md.append(f"The fewest NFE (budget proportional to T) at which each prior reaches the {metric.upper()} of "
                  f"T={summary['T_ref']:g} with the standard prior, and, for a fair comparison, what "
                  f"T={summary['T_ref']:g} with the standard prior reaches when it is given only that many NFE.")
        md.append("")
        srows = []
        for v in analyses["nfe_savings"]:
            if v["reached"]:
                base = v["baseline_at_nfe"]
                srows.append([v["sampler"], v["prior"], f"{v['ref_value']:.3f} @ {v['ref_nfe']}", f"{v['T']:g}",
                              str(v["nfe"]), f"{v['value']:.3f}", f"{100 * v['saving']:.0f}%",
                              _f(base) if base is not None else "-"])
            else:
                srows.append([v["sampler"], v["prior"], f"{v['ref_value']:.3f} @ {v['ref_nfe']}", "not reached",
                              "-", "-", "-", "-"])
        md.append(_table(["sampler", "prior", f"reference {metric.upper()} @ NFE", "T", "NFE", metric.upper(),
                          "NFE saved", f"T={summary['T_ref']:g} standard at that NFE"], srows))
        md.append("")
    return md


def _frontier_md(rep: _Report) -> list[str]:
    """The quality frontier: the best configuration within each NFE budget."""
    summary, out, metric, frontier = rep.summary, rep.out, rep.metric, rep.frontier
    md: list[str] = []
    if frontier["frontier"]:
        md.append("## Quality frontier: how much diffusion time is enough for N network calls")
        md.append("")
        md.append(f"For each NFE budget N: the best configuration by {metric.upper()} among every sample set with "
                  f"NFE <= N (any T < {summary['T_ref']:g} or fitted prior, any sampler and step count), against "
                  f"the best with NFE <= N at T={summary['T_ref']:g} with the standard prior. Each score with its "
                  "bootstrap se; the difference with its paired bootstrap 95% interval. The best of many "
                  "configurations is biased low. "
                  + ("A gaussian or gits grid was optimized for its (T, prior, sampler, NFE) "
                     "(`difftime.gridopt`, kept in grids/); its optimization time is stated beside it. "
                     if summary["settings"].get("frontier_grids") else "")
                  + f"`difftime sample RUN --nfe N --study {out}` samples with the lower of the two.")
        md.append("")
        frows = []
        for e in frontier["frontier"]:
            b, ref = e["best"], e["reference"]
            frows.append([str(e["budget"]), _config_text(b) if b else "-", str(b["nfe"]) if b else "-",
                          _pm(b["value"], b["uncertainty"], 4) if b else "-",
                          _config_text(ref) if ref else "-", str(ref["nfe"]) if ref else "-",
                          _pm(ref["value"], ref["uncertainty"], 4) if ref else "-",
                          (f"{e['difference']:+.4g} [{e['difference_interval'][0]:+.4g}, "
                           f"{e['difference_interval'][1]:+.4g}]" if e.get("difference_interval")
                           else _pm(e["difference"], e["difference_uncertainty"]))
                          if e["difference"] is not None else "-",
                          e["verdict"] or "-"])
        md.append(_table(["NFE budget", "best configuration", "NFE", metric.upper(),
                          f"T={summary['T_ref']:g} standard", "NFE", metric.upper(), "difference", "verdict"], frows))
        md.append("")
    return md


def _fid_headline_md(rep: _Report) -> list[str]:
    """The Inception FID of the headline configurations and their sample grids."""
    summary = rep.summary
    md: list[str] = []
    headline = summary.get("fid_headline")
    if headline and headline["rows"]:
        md.append("## Inception FID of the headline configurations")
        md.append("")
        chosen_by = headline["rows"][0]["selected_by"]
        fresh = "seed" in headline  # records from before the held-out draws scored the selection's samples
        md.append(f"At each NFE budget, the frontier's best configuration (chosen by {chosen_by.upper()}) and the "
                  f"T={summary['T_ref']:g} standard one, "
                  + (f"drawn again from a held-out seed ({headline['seed']}, not the selection's "
                     f"{headline['selection_seed']}), so these scores carry no winner's curse, and scored by "
                     if fresh else "drawn again from the selection's seed and scored by ")
                  + f"Inception FID ({headline['n_samples']} samples against as many images of the "
                  f"{headline['reference_split']} split; "
                  "FID at this sample size is biased upward, so compare the rows, not other papers' FIDs)"
                  + (f" and by {chosen_by.upper()} on the same fresh samples" if fresh else "")
                  + ". Each difference has a paired bootstrap 95% interval.")
        md.append("")
        floor = headline.get("floor")
        if floor:
            md.append(f"**The real-data floor at this n:** {floor['n']} held-out {floor['split']} images against the "
                      f"same {floor['n']} {floor['reference_split']} images score FID "
                      f"{_pm(floor['fid']['value'], floor['fid'].get('se'), 3)}; a perfect model scores about this, "
                      "so read each FID as its distance above the floor.")
            md.append("")
        hrows = []
        for r in headline["rows"]:
            b, ref = r.get("best"), r.get("reference")
            cells = [str(r["budget"]), _config_text(b) if b else "-", _pm(b["fid"], b["fid_se"], 3) if b else "-",
                     _config_text(ref) if ref else "-", _pm(ref["fid"], ref["fid_se"], 3) if ref else "-"]
            keys = [("difference", "fid")] + ([(f"{chosen_by}_difference", chosen_by)] if fresh else [])
            for key, metric in keys:
                d = r.get(key)
                if metric != "fid":
                    cells += [_pm(b[metric], b.get(f"{metric}_se"), 3) if b else "-",
                              _pm(ref[metric], ref.get(f"{metric}_se"), 3) if ref else "-"]
                cells += [f"{d['mean']:+.3g} [{d['lo']:+.3g}, {d['hi']:+.3g}]"
                          + (" (resolved)" if d["resolved"] else " (not resolved)") if d else "-"]
            hrows.append(cells)
        header = ["NFE budget", "best configuration (short T or fitted prior)", "FID",
                  f"T={summary['T_ref']:g} standard", "FID", "FID difference"]
        if fresh:
            header += [f"{chosen_by.upper()} best", f"{chosen_by.upper()} standard", f"{chosen_by.upper()} difference"]
        md.append(_table(header, hrows))
        md.append("")
        seen = []
        for r in headline["rows"]:
            for side in ("best", "reference"):
                c = r.get(side)
                if c and c["grid"] not in seen:
                    seen.append(c["grid"])
                    md.append(f"![{_config_text(c)}]({c['grid']})")
        md.append("")
    return md


def _claims_md(rep: _Report) -> list[str]:
    """The paper's claims as decided on this data, and the plots."""
    analyses, plots = rep.analyses, rep.plots
    md: list[str] = []
    md.append("## Where the paper's claims held on this data")
    md.append("")
    md += [f"{i}. {claim['text']}" for i, claim in enumerate(analyses["claims"], 1)]
    md.append("")
    md.append("## Plots")
    md.append("")
    md += [f"![{caption}]({name})\n\n*{caption}.*\n" for name, caption in plots]
    return md


def _wall_md(rep: _Report) -> list[str]:
    """The wall time per stage and per cell."""
    summary, cells = rep.summary, rep.cells
    headline = summary.get("fid_headline")
    md: list[str] = []
    md.append("## Wall time per stage (seconds)")
    md.append("")
    stages = [("training", sum(rec["wall_s"] for rec in summary["training"].values())),
              ("prior fits", sum(c["wall"]["prior_fit_s"] for c in cells)),
              ("likelihood (ELBO and PF-ODE, every cell)",
               summary.get("likelihood_wall_s", sum(c["wall"]["likelihood_s"] for c in cells))),
              ("prior headroom", sum(h["model"]["wall_s"] for h in summary.get("headroom") or [])),
              ("sampling", sum(c["wall"]["sampling_s"] for c in cells)),
              ("quality metrics", sum(c["wall"]["quality_metrics_s"] for c in cells)),
              ("headline Inception FID (sampling and scoring)", (headline or {}).get("work_s", 0.0))]
    md.append("Each stage's work as recorded when it ran (a resumed stage keeps its first wall time); the data "
              "floor and the report itself are not counted.")
    md.append("")
    md.append(_table(["stage", "seconds", "minutes"],
                     [[name, f"{sec:.0f}", f"{sec / 60:.1f}"] for name, sec in stages if sec]
                     + [["total", f"{sum(v for _, v in stages):.0f}", f"{sum(v for _, v in stages) / 60:.1f}"]]))
    md.append("")
    md.append("Per cell:")
    md.append("")
    wrows = [[f"{c['T']:g}", c["prior"], *[f"{c['wall'][k]:.1f}" for k in ("prior_fit_s", "likelihood_s", "sampling_s",
                                                                             "quality_metrics_s")]] for c in cells]
    md.append(_table(["T", "prior", "prior fit", "likelihood", "sampling", "quality metrics"], wrows))
    md.append("")
    if summary.get("stage_wall_s"):
        processes = summary.get("processes", 1)
        md.append(f"The last invocation's wall clock per stage, {processes} process{'es' if processes > 1 else ''} "
                  "(stages already done are loaded, in seconds near 0):")
        md.append("")
        md.append(_table(["stage", "seconds"], [[name, f"{sec:.1f}"] for name, sec in summary["stage_wall_s"].items()]))
        md.append("")
    md.append("Everything above is in `results.json` (with the config, seeds, sample counts and versions) and, one "
              "row per cell x sampler x budget, in `results.csv`.")
    return md
