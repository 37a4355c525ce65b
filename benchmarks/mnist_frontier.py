"""The 28x28 frontier: truncation with optimized grids against the best few-step samplers, per NFE.

Model: a trained MNIST run (default ``runs/mnist-cpu``, the ``mnist-cpu`` preset), VP with
beta(t) = 0.1 + 19.9 t, the continuous limit of diffusers' linear 1e-4..0.02 DDPM schedule.

Ours (truncated): difftime from the run's fitted prior (``--prior``, default flow) at each T of
``--T``, with unipc, dpm++2m and ipndm, each on three grids: the log-SNR spacing and the two
optimized grids of ``difftime.gridopt`` (``gits``: a teacher of 128 trajectories from that prior
at T, one per (T, prior), shared by every sampler and budget; ``gaussian``: model-free, on the
covariance spectrum of the training data). Sampling ends at eps = 1e-3 with Tweedie's step.

Peers: diffusers schedulers from N(0, I) at the top DDPM step (DPM-Solver++ 2M and 3M, UniPC bh2,
each with and without Karras sigmas, DEIS, DDIM trailing; benchmarks/peer_samplers.py's time map),
and, the strongest fair peer, difftime's own unipc, dpm++2m and ipndm at T = 1 from the standard
prior on the same three grids (the same optimizers, without truncation). Every method is asserted
to spend exactly the budgeted NFE. The network runs under bf16 autocast for every method.

Design:
  1. ``select``: every method at every budget on seed 0, n = ``--n`` samples, classifier KID and FD
     against the test split (bootstrap se). The grid optimization wall time is recorded per grid.
  2. ``headline``: per budget, each side's best by KID on seed 0 is drawn again on held-out seeds
     (``--seeds``, n each, sample i of both sides from the same seed): KID and FD of the pooled
     samples with paired bootstrap intervals (shared resampling counts), and Inception FID of the
     first 1000 pooled samples against 1000 test images beside the real-data floor (1000 training
     images against the same 1000 test images, benchmarks/recipe.py's floor), so excess FID =
     FID - floor. Selecting on seed 0 and scoring on other seeds keeps the winner's curse out.
  3. ``report``: ``docs/mnist-frontier`` (report.md, results.json, quality_vs_nfe.png, grids of the
     headline samples) and the rows of BENCHMARKS.md that name 28x28.

Every sample set's record is cached under ``--out`` (a rerun resumes).

    python benchmarks/mnist_frontier.py select --run runs/mnist-cpu --out runs/mnist-frontier
    python benchmarks/mnist_frontier.py headline --run runs/mnist-cpu --out runs/mnist-frontier
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
from peer_samplers import SCHEDULE, Counted, check_schedule

from difftime.evaluation import data_variances, draw_samples, resolve_prior
from difftime.gridopt import GitsTeacher, TimeGrid, gaussian_grid, gits_teacher
from difftime.grids import timesteps
from difftime.io import atomic_write_bytes, read_json_file
from difftime.metrics import quality_metrics
from difftime.plots import save_samples_figure
from difftime.run import Run, load_run
from difftime.stats import replicate_difference

SAMPLERS = ("unipc", "dpm++2m", "ipndm")
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


def methods(Ts: list[float], prior: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for T in Ts:
        for sampler in SAMPLERS:
            for grid in GRIDS:
                out[f"difftime {sampler} {grid}, {prior} prior, T={T:g}"] = {
                    "side": "ours", "sampler": sampler, "grid": grid, "prior": prior, "T": T}
    for sampler in SAMPLERS:
        for grid in GRIDS:
            out[f"difftime {sampler} {grid}, standard prior, T=1"] = {
                "side": "peer", "sampler": sampler, "grid": grid, "prior": "standard", "T": 1.0}
    for label in PEERS:
        out[label] = {"side": "peer", "diffusers": label}
    return out


class Bench:
    def __init__(self, run_dir: str, out: str, prior: str, Ts: list[float], teacher_n: int = 128,
                 fine_steps: int = 48) -> None:
        self.run: Run = load_run(run_dir)
        self.teacher_options = {"n": teacher_n, "fine_steps": fine_steps}
        check_schedule(self.run)
        self.out = Path(out)
        self.methods = methods(Ts, prior)
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
    step_t = SCHEDULE.step_times().float()
    model = Counted(BF16(run.model))
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    with torch.no_grad():
        scheduler.set_timesteps(nfe)
        x = torch.randn(n, *run.shape, generator=generator) * scheduler.init_noise_sigma
        for k in scheduler.timesteps:
            x = scheduler.step(model(x, step_t[int(k)].expand(n)), k, x).prev_sample
        samples = run.scaler.decode(x).numpy()
    if model.calls != nfe:
        raise RuntimeError(f"{spec}: {model.calls} network calls for a budget of {nfe}")
    return samples, time.perf_counter() - start


def cmd_select(args: argparse.Namespace) -> None:
    bench = Bench(args.run, args.out, args.prior, args.T, args.teacher_n, args.fine_steps)
    start = time.perf_counter()
    for nfe in args.nfe:
        for label in bench.methods:
            rec = bench.record(label, nfe, args.n, 0)
            print(f"NFE {nfe:2d} {label:48s} KID {rec['kid']['value']:7.3f} FD {rec['fd']['value']:7.3f}  "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)


def best_by_side(out: Path, nfe: int, n: int) -> dict[str, dict[str, Any]]:
    recs = [read_json_file(p, "record") for p in sorted((out / "sets").glob(f"*-nfe{nfe}-seed0-n{n}.json"))]
    return {side: min((r for r in recs if r["side"] == side), key=lambda r: r["kid"]["value"])
            for side in ("ours", "peer")}


def cmd_headline(args: argparse.Namespace) -> None:
    bench = Bench(args.run, args.out, args.prior, args.T, args.teacher_n, args.fine_steps)
    from recipe import data_floor

    floor = data_floor(Path(args.floor_cache))
    start = time.perf_counter()
    for nfe in args.nfe:
        path = bench.out / "headline" / f"nfe{nfe}.json"
        if path.is_file():
            continue
        best = best_by_side(bench.out, nfe, args.n)
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


def _comma(kind):
    return lambda text: [kind(v) for v in text.split(",")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, fn in (("select", cmd_select), ("headline", cmd_headline)):
        q = sub.add_parser(name)
        q.add_argument("--run", default="runs/mnist-cpu")
        q.add_argument("--out", default="runs/mnist-frontier")
        q.add_argument("--prior", default="flow")
        q.add_argument("--T", type=_comma(float), default=[0.4, 0.6, 0.8])
        q.add_argument("--nfe", type=_comma(int), default=[4, 5, 6, 8, 10, 15, 20])
        q.add_argument("--n", type=int, default=300, help="samples per method and budget in the selection")
        q.add_argument("--seeds", type=_comma(int), default=[1, 2], help="held-out seeds of the headline")
        q.add_argument("--n-headline", type=int, default=500, help="samples per held-out seed")
        q.add_argument("--floor-cache", default="runs/recipe/floor")
        q.add_argument("--teacher-n", type=int, default=128, help="gits: teacher trajectories per (T, prior)")
        q.add_argument("--fine-steps", type=int, default=48, help="gits: nodes of the teacher grid")
        q.add_argument("--threads", type=int, default=0)
        q.set_defaults(func=fn)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.func(args)


if __name__ == "__main__":
    main()
