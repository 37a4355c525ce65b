"""The 28x28 frontier: truncation with optimized grids against the best few-step samplers, per NFE.

Model: a trained MNIST run (default ``runs/mnist-cpu``, the ``mnist-cpu`` preset), VP with
beta(t) = 0.1 + 19.9 t, the continuous limit of diffusers' linear 1e-4..0.02 DDPM schedule.

Ours (truncated): difftime from the run's fitted priors (``--priors``, default gaussian and flow)
at each T of ``--T``, with ``--samplers`` (default unipc and ipndm; dpm++2m is unipc without its
corrector), each on three grids: the log-SNR spacing and the two
optimized grids of ``difftime.gridopt`` (``gits``: a teacher of 128 trajectories from that prior
at T, one per (T, prior), shared by every sampler and budget; ``gaussian``: model-free, on the
covariance spectrum of the training data). Sampling ends at eps = 1e-3 with Tweedie's step.

Peers: diffusers schedulers from N(0, I) at the top DDPM step (DPM-Solver++ 2M and 3M, UniPC bh2,
each with and without Karras sigmas, DEIS, DDIM trailing; benchmarks/peer_samplers.py's time map),
and, the strongest fair peer, difftime's own samplers at T = 1 from the standard
prior on the same three grids (the same optimizers, without truncation). Every method is asserted
to spend exactly the budgeted NFE. The network runs under bf16 autocast for every method.

Design:
  1. ``select``: every method at every budget on seed 0, n = ``--n`` (200) samples, classifier KID and FD
     against the test split (bootstrap se). The grid optimization wall time is recorded per grid.
  2. ``headline``: per budget, each side's best by KID on seed 0 is drawn again on held-out seeds
     (``--seeds``, n each, sample i of both sides from the same seed): KID and FD of the pooled
     samples with paired bootstrap intervals (shared resampling counts), and Inception FID of the
     first 1000 pooled samples against 1000 test images beside the real-data floor (1000 training
     images against the same 1000 test images, benchmarks/recipe.py's floor), so excess FID =
     FID - floor. Selecting on seed 0 and scoring on other seeds keeps the winner's curse out.
  3. ``report``: ``docs/mnist-frontier`` (report.md, results.json, quality_vs_nfe.png, grids of the
     headline samples) and the rows of BENCHMARKS.md that name 28x28.

Every sample set's record is cached under ``--out`` (a rerun resumes); ``all`` runs the selection
and the headline budget by budget.

    python benchmarks/mnist_frontier.py all --run runs/mnist-cpu --out runs/mnist-frontier
    python benchmarks/mnist_frontier.py report --out runs/mnist-frontier --docs docs/mnist-frontier
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import row, write_result
from peer_samplers import SCHEDULE, Counted, check_schedule, drive_scheduler

from difftime.evaluation import data_variances, draw_samples, resolve_prior
from difftime.gridopt import GitsTeacher, TimeGrid, gaussian_grid, gits_teacher
from difftime.grids import timesteps
from difftime.io import atomic_write_bytes, read_json_file
from difftime.metrics import quality_metrics
from difftime.plots import save_samples_figure
from difftime.run import Run, load_run
from difftime.stats import replicate_difference

GRIDS = ("logsnr", "gits", "gaussian")
EPS = 1e-3
BOOT, FID_BOOT, N_FID = 200, 50, 1000
PEERS = {
    "diffusers DPM-Solver++ 2M": ("dpm", {"solver_order": 2}),
    "diffusers DPM-Solver++ 3M": ("dpm", {"solver_order": 3}),
    "diffusers UniPC bh2": ("unipc", {}),
    "diffusers DPM-Solver++ 2M Karras": ("dpm", {"solver_order": 2, "use_karras_sigmas": True}),
    "diffusers DPM-Solver++ 3M Karras": ("dpm", {"solver_order": 3, "use_karras_sigmas": True}),
    "diffusers UniPC bh2 Karras": ("unipc", {"use_karras_sigmas": True}),
    "diffusers DEIS 2": ("deis", {}),
    "diffusers DDIM trailing": ("ddim", {"timestep_spacing": "trailing"}),
}


class BF16(torch.nn.Module):
    """The network under bfloat16 autocast, returning float32, as draw_samples(precision="bf16")."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.net(x, t).float()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.+]+", "-", text.lower()).strip("-")


def methods(Ts: list[float], priors: list[str], samplers: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for prior in priors:
        for T in Ts:
            for sampler in samplers:
                for grid in GRIDS:
                    out[f"difftime {sampler} {grid}, {prior} prior, T={T:g}"] = {
                        "side": "ours", "sampler": sampler, "grid": grid, "prior": prior, "T": T}
    for sampler in samplers:
        for grid in GRIDS:
            out[f"difftime {sampler} {grid}, standard prior, T=1"] = {
                "side": "peer", "sampler": sampler, "grid": grid, "prior": "standard", "T": 1.0}
    for label in PEERS:
        out[label] = {"side": "peer", "diffusers": label}
    return out


class Bench:
    def __init__(self, run_dir: str, out: str, priors: list[str], Ts: list[float], samplers: list[str],
                 teacher_n: int = 128, fine_steps: int = 48) -> None:
        self.run: Run = load_run(run_dir)
        self.teacher_options = {"n": teacher_n, "fine_steps": fine_steps}
        check_schedule(self.run)
        self.out = Path(out)
        self.methods = methods(Ts, priors, samplers)
        self.priors: dict[tuple[str, float], Any] = {}
        self.teachers: dict[tuple[str, float], GitsTeacher] = {}
        self.variances = None

    def prior(self, family: str, T: float):
        if (family, T) not in self.priors:
            self.priors[family, T] = resolve_prior(self.run, family, T)
        return self.priors[family, T]

    def grid(self, m: dict[str, Any], nfe: int) -> TimeGrid | None:
        """The method's optimized grid at ``nfe`` (cached in grids/), or None for the log-SNR spacing."""
        if m["grid"] == "logsnr":
            return None
        path = self.out / "grids" / f"T{m['T']:g}-{m['prior']}-{m['sampler']}-{nfe}-{m['grid']}.json"
        if path.is_file():
            return TimeGrid.load(path, self.run.sde)
        if m["grid"] == "gaussian":
            if self.variances is None:
                self.variances = data_variances(self.run)
            grid = gaussian_grid(self.run.sde, m["T"], EPS, nfe, m["sampler"], variances=self.variances)
        else:
            key = (m["prior"], m["T"])
            if key not in self.teachers:
                self.teachers[key] = self._teacher(*key)
            grid = self.teachers[key].grid(m["sampler"], nfe)
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path, overwrite=True)
        return grid

    def _teacher(self, family: str, T: float) -> GitsTeacher:
        """The gits teacher at (prior, T); its cost matrix is kept in grids/ so a rerun skips it."""
        from difftime.io import load_tensors, save_tensors

        path = self.out / "grids" / f"teacher-T{T:g}-{family}.safetensors"
        if path.is_file():
            t = load_tensors(path)
            info = read_json_file(path.with_suffix(".json"), "teacher record")
            return GitsTeacher(t["nodes"], t["cost"], info)
        teacher = gits_teacher(BF16(self.run.model), self.run.sde, _Shaped(self.prior(family, T), self.run.shape),
                               T, EPS, generator=torch.Generator().manual_seed(0), **self.teacher_options)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_tensors(path, {"nodes": teacher.nodes, "cost": teacher.cost})
        atomic_write_bytes(path.with_suffix(".json"), json.dumps(teacher.info).encode())
        return teacher

    def draw(self, label: str, nfe: int, n: int, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
        m = self.methods[label]
        if "diffusers" in m:
            samples, wall = peer_sample(self.run, PEERS[label], nfe, n, seed)
            return samples, {"sample_wall_s": wall}
        grid = self.grid(m, nfe)
        ts = grid.ts if grid is not None else timesteps(self.run.sde, m["T"], EPS, nfe - 1, "logsnr")
        samples, used, wall = draw_samples(self.run, self.prior(m["prior"], m["T"]), m["T"], m["sampler"], nfe - 1,
                                           n, seed=seed, eps=EPS, precision="bf16", ts=ts)
        if used != nfe:
            raise RuntimeError(f"{label}: NFE {used} for a budget of {nfe}")
        extra = {"sample_wall_s": wall, "ts": [float(t) for t in ts]}
        if grid is not None:
            extra["grid_wall_s"] = grid.info["wall_s"]
        return samples, extra

    def record(self, label: str, nfe: int, n: int, seed: int, fid: bool = False) -> dict[str, Any]:
        """Draw and score one sample set, or read it back from sets/."""
        path = self.out / "sets" / f"{slug(label)}-nfe{nfe}-seed{seed}-n{n}.json"
        if path.is_file():
            return read_json_file(path, "sample-set record")
        samples, extra = self.draw(label, nfe, n, seed)
        start = time.perf_counter()
        q = quality_metrics(samples, "mnist", ("kid", "fd"), reference_split="test", seed=0, progress=False,
                            bootstrap=BOOT)
        rec = {"method": label, **self.methods[label], "nfe": nfe, "n": n, "seed": seed, **extra,
               "kid": q["kid"], "fd": q["fd"], "metrics_wall_s": time.perf_counter() - start}
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path.with_suffix(".npy"), samples.astype(np.uint8))
        atomic_write_bytes(path, json.dumps(rec).encode())
        return rec


class _Shaped:
    def __init__(self, prior, shape) -> None:
        self.prior, self.shape = prior, shape

    def sample(self, n: int, generator=None) -> torch.Tensor:
        return self.prior.sample(n, generator=generator).reshape(n, *self.shape).float()


def peer_sample(run: Run, spec: tuple[str, dict], nfe: int, n: int, seed: int) -> tuple[np.ndarray, float]:
    """diffusers scheduler ``spec`` driving the run's network (bf16) from N(0, I) at the top step."""
    from diffusers import DDIMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

    kind, extra = spec
    common = {"num_train_timesteps": SCHEDULE.num_train_timesteps, "beta_start": SCHEDULE.beta_start,
              "beta_end": SCHEDULE.beta_end, "beta_schedule": "linear"}
    cls = {"dpm": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler, "deis": DEISMultistepScheduler,
           "ddim": DDIMScheduler}[kind]
    scheduler = cls(**common, **({"algorithm_type": "dpmsolver++"} if kind == "dpm" else {}), **extra)
    samples, _, wall = drive_scheduler(scheduler, Counted(BF16(run.model)), run, nfe, n, seed, str(spec))
    return samples, wall


def cmd_select(args: argparse.Namespace) -> None:
    bench = Bench(args.run, args.out, args.priors, args.T, args.samplers, args.teacher_n, args.fine_steps)
    for nfe in args.nfe:
        select(bench, nfe, args.n)


def select(bench: Bench, nfe: int, n: int) -> None:
    start = time.perf_counter()
    for label in bench.methods:
        rec = bench.record(label, nfe, n, 0)
        print(f"NFE {nfe:2d} {label:48s} KID {rec['kid']['value']:7.3f} FD {rec['fd']['value']:7.3f}  "
              f"({time.perf_counter() - start:.0f} s)", flush=True)


def cmd_all(args: argparse.Namespace) -> None:
    """Selection and headline budget by budget, so that finished budgets are complete rows."""
    for nfe in args.nfe:
        cmd_select(argparse.Namespace(**{**vars(args), "nfe": [nfe]}))
        cmd_headline(argparse.Namespace(**{**vars(args), "nfe": [nfe]}))


def best_by_side(bench: Bench, nfe: int, n: int) -> dict[str, dict[str, Any]]:
    recs = [bench.record(label, nfe, n, 0) for label in bench.methods]
    return {side: min((r for r in recs if r["side"] == side), key=lambda r: r["kid"]["value"])
            for side in ("ours", "peer")}


def cmd_headline(args: argparse.Namespace) -> None:
    bench = Bench(args.run, args.out, args.priors, args.T, args.samplers, args.teacher_n, args.fine_steps)
    from recipe import data_floor

    floor = data_floor(Path(args.floor_cache))
    start = time.perf_counter()
    for nfe in args.nfe:
        path = bench.out / "headline" / f"nfe{nfe}.json"
        if path.is_file():
            continue
        best = best_by_side(bench, nfe, args.n)
        entry: dict[str, Any] = {"nfe": nfe, "seeds": args.seeds, "n_per_seed": args.n_headline}
        pooled = {}
        for side, rec in best.items():
            recs = [bench.record(rec["method"], nfe, args.n_headline, seed) for seed in args.seeds]
            samples = np.concatenate([np.load(bench.out / "sets" / f"{slug(r['method'])}-nfe{nfe}-seed{r['seed']}"
                                               f"-n{r['n']}.npy") for r in recs])
            pooled[side] = samples
            q = quality_metrics(samples, "mnist", ("kid", "fd"), reference_split="test", seed=0, progress=False,
                                bootstrap=BOOT)
            t0 = time.perf_counter()
            fid = quality_metrics(samples[:N_FID], "mnist", ("fid",), n_reference=N_FID, reference_split="test",
                                  seed=0, progress=False, bootstrap=FID_BOOT)["fid"]
            entry[side] = {"method": rec["method"], "selection_kid": rec["kid"]["value"], "kid": q["kid"],
                           "fd": q["fd"], "fid": fid, "excess_fid": fid["value"] - floor["fid"]["value"],
                           "fid_wall_s": time.perf_counter() - t0, "grid_wall_s": rec.get("grid_wall_s"),
                           "sample_wall_s": sum(r["sample_wall_s"] for r in recs), "ts": rec.get("ts")}
        for metric in ("kid", "fd", "fid"):
            a, b = entry["ours"][metric], entry["peer"][metric]
            d = replicate_difference(a["value"], b["value"], a["replicates"], b["replicates"])
            entry[f"{metric}_difference"] = {**d.to_dict(), "resolved": d.resolved}
        fl = floor["fid"]["value"]
        entry["excess_fid_ratio"] = entry["ours"]["excess_fid"] / entry["peer"]["excess_fid"]
        entry["kid_ratio"] = entry["ours"]["kid"]["value"] / entry["peer"]["kid"]["value"]
        entry["floor_fid"] = fl
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(entry).encode())
        for side in ("ours", "peer"):
            save_samples_figure(pooled[side][:64], bench.out / "headline" / f"nfe{nfe}-{side}.png",
                                title=f"NFE {nfe}: {entry[side]['method']}")
        print(f"NFE {nfe:2d}: ours {entry['ours']['method']} FID {entry['ours']['fid']['value']:.2f} "
              f"KID {entry['ours']['kid']['value']:.2f} | peer {entry['peer']['method']} "
              f"FID {entry['peer']['fid']['value']:.2f} KID {entry['peer']['kid']['value']:.2f} | floor {fl:.2f}  "
              f"({time.perf_counter() - start:.0f} s)", flush=True)


TARGETS = {4: ("<= 1/3 of the best peer's", 1 / 3), 5: ("<= 1/3 of the best peer's", 1 / 3),
           8: ("<= 0.75 x the best peer's", 0.75), 10: ("<= 0.75 x the best peer's", 0.75),
           20: ("not worse than the best peer's", None)}


def _pm(entry: dict[str, Any]) -> str:
    se = entry.get("se")
    return f"{entry['value']:.2f}" + (f" +- {se:.2f}" if se is not None else "")


def _interval(d: dict[str, Any]) -> str:
    return f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]"


def _verdict(e: dict[str, Any]) -> str:
    """The issue's target at this budget, on excess FID and KID, each with its paired interval."""
    if e["nfe"] not in TARGETS:
        return "-"
    text, ratio = TARGETS[e["nfe"]]
    fid_d, kid_d = e["fid_difference"], e["kid_difference"]
    if ratio is None:  # not worse: neither interval lies above zero
        ok = fid_d["lo"] <= 0 and kid_d["lo"] <= 0
    else:
        ok = (e["excess_fid_ratio"] <= ratio and e["kid_ratio"] <= ratio and fid_d["hi"] < 0 and kid_d["hi"] < 0)
    return f"{'**met**' if ok else 'not met'} ({text})"


def cmd_report(args: argparse.Namespace) -> None:
    """docs/mnist-frontier: the selection table, the held-out headline, grid costs, a plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, docs = Path(args.out), Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    sets = [read_json_file(p, "record") for p in sorted((out / "sets").glob("*-seed0-n*.json"))]
    sets = [r for r in sets if r["n"] == args.n]
    headline = sorted((read_json_file(p, "headline") for p in (out / "headline").glob("nfe*.json")),
                      key=lambda e: e["nfe"])
    budgets = sorted({r["nfe"] for r in sets})
    floor = headline[0]["floor_fid"] if headline else None

    def family(r: dict[str, Any]) -> str:
        if r["side"] == "ours":
            return f"truncated, {r['grid']} grid"
        return "diffusers, T=1" if "diffusers" in r else f"difftime T=1, {r['grid']} grid"

    families = sorted({family(r) for r in sets})
    best = {(f, B): min((r for r in sets if family(r) == f and r["nfe"] == B), key=lambda r: r["kid"]["value"],
                        default=None) for f in families for B in budgets}
    md = ["# The 28x28 frontier: truncation and optimized grids against the best few-step samplers", "",
          f"Model: `{args.run}` (the `mnist-cpu` preset). Selection on seed 0 with n = {args.n} samples per "
          "configuration and budget (classifier KID x 1e3 and FD against the MNIST test split, bootstrap se); "
          "the headline draws each side's selected best again on held-out seeds and scores it by KID, FD and "
          "Inception FID (first 1000 pooled samples against 1000 test images) beside the real-data floor "
          f"(1000 training images against the same 1000 test images: FID {floor:.2f})" if floor else "", ""]
    md += ["## Held-out headline", "",
           "Per NFE budget: each side's best by KID on seed 0, drawn again on held-out seeds. Excess FID = "
           "FID - floor; ratios are ours over the peer's; differences (ours - peer) carry paired bootstrap 95% "
           "intervals (shared resampling counts, sample i of both sides from the same seed).", "",
           "| NFE | ours | peer | FID ours | FID peer | excess FID ratio | FID difference | KID ours | KID peer "
           "| KID ratio | KID difference | target |", "|" + "---|" * 12]
    for e in headline:
        o, p = e["ours"], e["peer"]
        md.append(f"| {e['nfe']} | {o['method']} | {p['method']} | {_pm(o['fid'])} | {_pm(p['fid'])} | "
                  f"{e['excess_fid_ratio']:.3f} | {_interval(e['fid_difference'])} | {_pm(o['kid'])} | "
                  f"{_pm(p['kid'])} | {e['kid_ratio']:.3f} | {_interval(e['kid_difference'])} | {_verdict(e)} |")
    md += ["", "## Selection (seed 0): the best configuration of each family by KID", "",
           "| family | " + " | ".join(f"NFE {B}" for B in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for f in families:
        cells = []
        for B in budgets:
            r = best[f, B]
            cells.append("-" if r is None else f"{r['kid']['value']:.1f} +- {r['kid']['se']:.1f}"
                         + (f" ({r['prior']}, T={r['T']:g}, {r['sampler']})" if r["side"] == "ours"
                            else f" ({r['method'].removeprefix('diffusers ')})" if "diffusers" in r
                            else f" ({r['sampler']})"))
        md.append(f"| {f} | " + " | ".join(cells) + " |")
    grids = [read_json_file(p, "grid") for p in sorted((out / "grids").glob("T*.json"))]
    teachers = [(p.stem, read_json_file(p, "teacher")) for p in sorted((out / "grids").glob("teacher-*.json"))]
    md += ["", "## Cost of the grid optimization", "",
           "gits: one teacher per (T, prior) (n trajectories on fine log-SNR nodes, 3 dpm++2m substeps "
           "between nodes, network in bf16), shared by every sampler and budget; the dynamic programme per "
           "grid takes milliseconds. gaussian: model-free, per (T, sampler, NFE), on the training data's "
           "covariance spectrum.", "",
           "| teacher | n | fine steps | network calls | wall s |", "|---|---|---|---|---|"]
    md += [f"| {name} | {t['n']} | {t['fine_steps']} | {t['teacher_nfe']} | {t['teacher_wall_s']:.1f} |"
           for name, t in teachers]
    gauss = [g for g in grids if g["method"] == "gaussian"]
    if gauss:
        md += ["", "| gaussian grid | " + " | ".join(f"NFE {B}" for B in budgets) + " |",
               "|---|" + "---|" * len(budgets)]
        for T, sampler in sorted({(g["T"], g["sampler"]) for g in gauss}):
            walls = {g["nfe"]: g["info"]["wall_s"] for g in gauss if g["T"] == T and g["sampler"] == sampler}
            md.append(f"| T={T:g}, {sampler} | " + " | ".join(f"{walls[B]:.1f} s" if B in walls else "-"
                                                            for B in budgets) + " |")
    md += ["", "![quality against NFE](quality_vs_nfe.png)", ""]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for f in families:
        xs = [B for B in budgets if best[f, B] is not None]
        axes[0].plot(xs, [best[f, B]["kid"]["value"] for B in xs], marker="o", label=f)
    axes[0].set(xscale="log", yscale="symlog", xlabel="NFE", ylabel="classifier KID x 1e3 (seed 0, best of family)")
    axes[0].legend(fontsize=7)
    if headline:
        for side in ("ours", "peer"):
            axes[1].errorbar([e["nfe"] for e in headline], [e[side]["fid"]["value"] for e in headline],
                             yerr=[e[side]["fid"].get("se", 0) for e in headline], marker="o", label=side)
        axes[1].axhline(floor, color="k", ls="--", label="real data (same n)")
        axes[1].set(xscale="log", yscale="log", xlabel="NFE", ylabel="Inception FID, held-out (1000 vs 1000)")
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(docs / "quality_vs_nfe.png", dpi=120)
    plt.close(fig)
    for e in headline:
        for side in ("ours", "peer"):
            src = out / "headline" / f"nfe{e['nfe']}-{side}.png"
            if src.is_file():
                (docs / "grids").mkdir(exist_ok=True)
                atomic_write_bytes(docs / "grids" / src.name, src.read_bytes())
    md += ["Sample grids of the headline (64 held-out samples each): `grids/nfe<N>-ours.png`, "
           "`grids/nfe<N>-peer.png`.", ""]
    rows = []
    for e in headline:
        o, p = e["ours"], e["peer"]
        what = (f"28x28 MNIST, NFE {e['nfe']}: best truncated vs best peer (8 diffusers schedulers and difftime "
                f"at T=1 on optimized grids), chosen by KID on seed 0, scored on held-out seeds")
        rows.append(row("28x28 frontier", f"{what}: excess Inception FID (1000 vs 1000 test, floor "
                        f"{e['floor_fid']:.2f})", o["excess_fid"], p["excess_fid"], "FID - floor", o["method"],
                        p["method"], o["fid"].get("se"), p["fid"].get("se")))
        rows.append(row("28x28 frontier", f"{what}: classifier KID x 1e3 (n={len(e['seeds']) * e['n_per_seed']})",
                        o["kid"]["value"], p["kid"]["value"], "KID x 1e3", o["method"], p["method"],
                        o["kid"].get("se"), p["kid"].get("se")))
    if rows:
        spent = sum(r["sample_wall_s"] + r["metrics_wall_s"] for r in sets)
        write_result("mnist_frontier", {"rows": rows, "headline": headline, "docs": str(docs),
                                        "note": "selection and headline wall (sampling + metrics) summed"}, spent)
    atomic_write_bytes(docs / "report.md", "\n".join(md).encode())
    atomic_write_bytes(docs / "results.json", json.dumps({"selection": sets, "headline": headline,
                                                          "grids": grids, "teachers": dict(teachers)}).encode())
    print(f"wrote {docs / 'report.md'}")


def _comma(kind):
    return lambda text: [kind(v) for v in text.split(",")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, fn in (("select", cmd_select), ("headline", cmd_headline), ("all", cmd_all)):
        q = sub.add_parser(name)
        q.add_argument("--run", default="runs/mnist-cpu")
        q.add_argument("--out", default="runs/mnist-frontier")
        q.add_argument("--priors", type=_comma(str), default=["gaussian", "flow"])
        q.add_argument("--samplers", type=_comma(str), default=["unipc", "ipndm"])
        q.add_argument("--T", type=_comma(float), default=[0.4, 0.6, 0.8])
        q.add_argument("--nfe", type=_comma(int), default=[4, 5, 6, 8, 10, 15, 20])
        q.add_argument("--n", type=int, default=200, help="samples per method and budget in the selection")
        q.add_argument("--seeds", type=_comma(int), default=[1, 2], help="held-out seeds of the headline")
        q.add_argument("--n-headline", type=int, default=500, help="samples per held-out seed")
        q.add_argument("--floor-cache", default="runs/recipe/floor")
        q.add_argument("--teacher-n", type=int, default=128, help="gits: teacher trajectories per (T, prior)")
        q.add_argument("--fine-steps", type=int, default=48, help="gits: nodes of the teacher grid")
        q.add_argument("--threads", type=int, default=0)
        q.set_defaults(func=fn)
    q = sub.add_parser("report")
    q.add_argument("--run", default="runs/mnist-cpu")
    q.add_argument("--out", default="runs/mnist-frontier")
    q.add_argument("--docs", default="docs/mnist-frontier")
    q.add_argument("--n", type=int, default=200)
    q.add_argument("--threads", type=int, default=0)
    q.set_defaults(func=cmd_report)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.func(args)


if __name__ == "__main__":
    main()
