"""Training recipes for the 28x28 model, compared at the same wall-clock budget.

Each recipe is a set of config overrides on the `mnist-cpu` network. ``train`` trains one
recipe for a number of steps, checkpointing every ``--ckpt-every`` steps and recording the
training wall seconds at each checkpoint; recipes that keep the network keep the cost per step,
so equal steps are equal wall time (the records show it). ``score`` scores checkpoints the way
the issue asks, always on the same images and draws:

- classifier KID of 2000 samples against the test split (the study's units), with its bootstrap se;
- Inception FID of the first 1000 samples against 1000 test images, beside the real-data floor
  (1000 training images against the same 1000 test images, same extractor);
- dpm++2m at 10 and 20 NFE from T = 1 with the standard prior (the same x_T seeds, so the
  20 - 10 difference has a paired bootstrap interval);
- PF-ODE bits/dim on the first 200 test images (same dequantization and probes for every
  recipe, so differences between recipes are paired per image).

``report`` writes a table, a plot of quality against training wall minutes and results.json.

    python benchmarks/recipe.py train --recipe edm --steps 2000 --out runs/recipe/edm --threads 1
    python benchmarks/recipe.py score runs/recipe/edm --threads 2 [--full]
    python benchmarks/recipe.py report runs/recipe/* --out docs/training-recipe
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import set_up_process

from difftime.config import build_config, merge, validate
from difftime.data import load_data
from difftime.evaluation import SAMPLE_PRECISIONS, draw_samples, likelihood_across_T, resolve_prior
from difftime.grids import SPACINGS
from difftime.io import atomic_write_bytes, load_state_dict_strict, load_tensors, read_json_file
from difftime.metrics import quality_metrics
from difftime.plots import save_samples_figure
from difftime.run import checkpoint_dir, load_run
from difftime.stats import paired_difference
from difftime.study import frontier_steps, sample_eps
from difftime.study.analysis import ci_text, quality_difference
from difftime.training import Trainer

PRESET = "mnist-cpu"
# Overrides on the preset. "baseline" is the mnist-cpu recipe before the EDM options existed.
_EDM_NET = {"precond": "edm", "sigma_data": 0.5}
_EDM_TRAIN = {"lr": 2e-3, "warmup": 200, "ema_decay": 0.999, "t_distribution": "log-snr-normal",
              "log_snr_mean": 1.2, "log_snr_std": 1.2, "weighting": "edm", "lr_schedule": "cosine"}


def _edm(net: dict[str, Any] | None = None, train: dict[str, Any] | None = None) -> dict[str, Any]:
    """The EDM recipe with some of its net / train keys changed."""
    return {"net": {**_EDM_NET, **(net or {})}, "train": {**_EDM_TRAIN, **(train or {})}}


RECIPES: dict[str, dict[str, Any]] = {
    "baseline": {"net": {"precond": "none"},
                 "train": {"lr": 1e-3, "warmup": 100, "ema_decay": 0.999, "t_distribution": "uniform",
                           "weighting": "standard", "lr_schedule": "constant"}},
    # EDM: preconditioning, log-SNR ~ N(1.2, 1.2), unit weight on F's target; cosine decay.
    "edm": _edm(),
    # The same, with a wider log-SNR draw (more weight at low noise, where bits/dim are decided).
    "edm-wide": _edm(train={"log_snr_mean": 1.6, "log_snr_std": 1.8}),
    # min-SNR-5 weighting of the eps loss under uniform t, with EDM preconditioning and cosine decay.
    "min-snr": {"net": _EDM_NET,
                "train": {"lr": 2e-3, "warmup": 200, "ema_decay": 0.999, "t_distribution": "uniform",
                          "weighting": "min-snr", "min_snr_gamma": 5.0, "lr_schedule": "cosine"}},
    # EDM at smaller batches: more updates in the same wall time (the U-Net's samples/s on 2 cores holds
    # at batch 64 and falls ~15% at 32). EMA decay and warm-up keep their length in samples.
    "edm-b64": _edm(train={"batch_size": 64, "warmup": 400, "ema_decay": 0.9995}),
    "edm-b32": _edm(train={"batch_size": 32, "warmup": 800, "ema_decay": 0.99975}),
    # Where the network spends its FLOPs (the same EDM training): more channels at 7x7, where the
    # digit's shape is decided and a channel costs 16x less than at 28x28 ...
    "edm-c124": _edm(net={"ch": 32, "ch_mult": [1, 2, 4]}),
    # ... or half the channels at 28x28 and 64 below: 36% more samples per second.
    "edm-lean": _edm(net={"ch": 16, "ch_mult": [1, 4, 4]}),
}
N_KID, N_FID, N_NLL, BOOT, FID_BOOT = 2000, 1000, 200, 200, 50


def recipe_config(name: str, steps: int, ckpt_every: int) -> dict[str, Any]:
    config = build_config(preset=PRESET)
    config = merge(config, RECIPES[name])
    config = merge(config, {"train": {"steps": steps, "ckpt_every": ckpt_every, "keep_checkpoints": 1000}})
    validate(config)
    return config


# --- train -----------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> None:
    out = Path(args.out)
    config = recipe_config(args.recipe, args.steps, args.ckpt_every)
    data = load_data(config["data"], seed=config["seed"])
    trainer = Trainer(config, data)
    walls_path = out / "wall.json"
    walls: dict[str, float] = {}
    if (out / "config.json").is_file():
        trainer.load(out)
        walls = read_json_file(walls_path, "wall record") if walls_path.is_file() else {}
        print(f"resuming {out} at step {trainer.step}", file=sys.stderr)
    else:
        out.mkdir(parents=True, exist_ok=True)
        trainer.write_config(out)
    elapsed = walls.get(str(trainer.step), 0.0)
    tick = time.perf_counter()
    while trainer.step < args.steps:
        stats = trainer.train_step()
        if not (math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"])):
            raise SystemExit(f"{args.recipe}: non-finite loss at step {trainer.step}")
        if trainer.step % args.ckpt_every == 0 or trainer.step == args.steps:
            elapsed += time.perf_counter() - tick  # the checkpoint's own write is not training time
            trainer.save(out)
            walls[str(trainer.step)] = round(elapsed, 2)
            atomic_write_bytes(walls_path, json.dumps({**walls, "threads": torch.get_num_threads(),
                                                       "recipe": args.recipe}).encode())
            print(f"{args.recipe}: step {trainer.step}, {elapsed / 60:.1f} min, loss {stats['loss']:.4f}", flush=True)
            tick = time.perf_counter()


# --- score -----------------------------------------------------------------------------------
def _load_checkpoint(run_dir: Path, step: int, weights: str = "ema"):
    run = load_run(run_dir)
    folder = checkpoint_dir(run_dir, step)
    state = read_json_file(folder / "state.json", "checkpoint state")
    file = folder / f"{weights}.safetensors"
    load_state_dict_strict(run.model, load_tensors(file, state["sha256"][file.name]), file)
    run.model.eval()
    return run


def data_floor(cache: Path) -> dict[str, Any]:
    """FID of 1000 training images against the 1000 test images every sample set is scored on."""
    path = cache / "floor.json"
    if path.is_file():
        return read_json_file(path, "floor")
    data = load_data("mnist")
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))
    fid = quality_metrics(data.train[order[:N_FID]].numpy(), "mnist", ("fid",), n_reference=N_FID,
                          reference_split="test", seed=0, bootstrap=FID_BOOT)["fid"]
    kid = quality_metrics(data.train[order[N_FID:N_FID + N_KID]].numpy(), "mnist", ("kid",),
                          reference_split="test", seed=0, bootstrap=BOOT)["kid"]
    floor = {"fid": fid, "kid": kid, "n_fid": N_FID, "n_kid": N_KID,
             "what": "random training images (seed 0) scored exactly as the samples are"}
    cache.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(floor).encode())
    return floor


def score_checkpoint(run, nfes: tuple[int, ...], nll: bool, grid: Path | None, precision: str = "bf16",
                     spacing: str = "logsnr") -> dict[str, Any]:
    T = run.sde.T_max
    eps = sample_eps(run.config["config"])
    prior = resolve_prior(run, "standard", T)
    steps = frontier_steps("dpm++2m", list(nfes), run.sde, T, eps)
    out: dict[str, Any] = {}
    for nfe in nfes:
        samples, got, wall = draw_samples(run, prior, T, "dpm++2m", steps[nfe], N_KID, seed=0, eps=eps,
                                          precision=precision, spacing=spacing)
        assert got == nfe, (got, nfe)
        kid = quality_metrics(samples, "mnist", ("kid",), reference_split="test", seed=0, progress=False,
                              bootstrap=BOOT)["kid"]
        fid = quality_metrics(samples[:N_FID], "mnist", ("fid",), n_reference=N_FID, reference_split="test",
                              seed=0, progress=False, bootstrap=FID_BOOT)["fid"]
        out[f"nfe{nfe}"] = {"kid": kid, "fid": fid, "sample_wall_s": wall}
        if grid is not None:
            save_samples_figure(samples[:64], grid.with_name(f"{grid.stem}-nfe{nfe}.png"),
                                title=f"{grid.parent.parent.name} {grid.stem}, dpm++2m, NFE {nfe}, T = 1")
    if len(nfes) == 2:
        a, b = (out[f"nfe{n}"]["fid"] for n in nfes)
        diff = quality_difference(b, a, "fid")
        out["fid_nfe_difference"] = {"what": f"FID at NFE {nfes[1]} minus NFE {nfes[0]}", **diff.to_dict()}
    if nll:
        data = load_data("mnist")
        t0 = time.perf_counter()
        # The study's settings (study.tol = 1e-4, seed 0): the same dequantization and probes for every run.
        res = likelihood_across_T({T: run}, {T: {"standard": prior}}, data.test[:N_NLL], ("nll",), seed=0,
                                  rtol=1e-4, atol=1e-4, progress=True)
        nll = res.summaries[T]["standard"]["nll"]
        out["nll"] = {"bpd": nll["bpd"], "se": nll["bpd_se"], "nfe_mean": nll["nfe_mean"],
                      "per_example": res.per_example["nll"][0, 0].tolist(), "wall_s": time.perf_counter() - t0}
    return out


def variant_name(weights: str, precision: str, spacing: str) -> str:
    """'' for the defaults, else '-model', '-fp32', '-karras', ... joined in that order."""
    parts = [v for v, default in ((weights, "ema"), (precision, "bf16"), (spacing, "logsnr")) if v != default]
    return "".join(f"-{v}" for v in parts)


def cmd_score(args: argparse.Namespace) -> None:
    run_dir = Path(args.run)
    walls = read_json_file(run_dir / "wall.json", "wall record")
    steps = sorted(int(k) for k in walls if k.isdigit())
    final = steps[-1]
    # The EMA weights, a bf16 network and the log-SNR grid are the run's result; any other choice is a
    # variant scored beside it (the same x_T seeds) in its own file, which the report pairs with it.
    variant = variant_name(args.weights, args.precision, args.spacing)
    path = run_dir / f"scores{variant}.json"
    scores = read_json_file(path, "scores") if path.is_file() else {}
    chosen = [s for s in steps if not args.steps or s in args.steps]
    for step in chosen:
        full = args.full and step == final
        key = str(step)
        if key in scores and (not full or "nll" in scores[key]):
            continue
        run = _load_checkpoint(run_dir, step, args.weights)
        nfes = (10, 20) if full else (10,)
        t0 = time.perf_counter()
        grid = run_dir / "grids" / f"step-{step}{variant}.png"
        rec = score_checkpoint(run, nfes, full, grid, args.precision, args.spacing)
        rec.update(step=step, train_wall_s=walls[key], score_wall_s=time.perf_counter() - t0)
        scores[key] = rec
        atomic_write_bytes(path, json.dumps(scores, indent=1).encode())
        q = rec["nfe10"]
        print(f"{run_dir.name} step {step}: KID {q['kid']['value']:.2f} +- {q['kid']['se']:.2f}, "
              f"FID {q['fid']['value']:.2f}" + (f", NLL {rec['nll']['bpd']:.4f}" if "nll" in rec else ""), flush=True)


def _fmt(entry: dict[str, Any], scale: float = 1.0) -> str:
    se = entry.get("se")
    return f"{scale * entry['value']:.2f}" + ("" if se is None else f" +- {scale * se:.2f}")


def _nll_text(nll: dict[str, Any] | None) -> str:
    return "-" if nll is None else f"{nll['bpd']:.4f} +- {nll['se']:.4f}"


def _nfe10_differences(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, Any]]:
    """(metric, a - b) at NFE 10 for KID and FID, from bootstrap replicates that share their counts."""
    return [(m, d) for m in ("kid", "fid")
            if (d := quality_difference(a["nfe10"][m], b["nfe10"][m], m)) is not None]


def cmd_report(args: argparse.Namespace) -> None:
    from matplotlib.figure import Figure

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    floor = data_floor(Path(args.floor_cache))
    runs = {}
    for r in args.runs:
        r = Path(r)
        if (r / "scores.json").is_file():
            walls = read_json_file(r / "wall.json", "wall record")
            runs[r.name] = {"dir": str(r), "recipe": walls.get("recipe", r.name), "threads": walls.get("threads"),
                            "scores": read_json_file(r / "scores.json", "scores"),
                            "config": read_json_file(r / "config.json", "run config")["config"]}
    lines = ["# Training recipes for the 28x28 model at equal wall-clock budget", "",
             f"Real-data floor at the same n (1000 training images against the same 1000 test images): "
             f"Inception FID {_fmt(floor['fid'])}; classifier KID of 2000 training images: "
             f"{_fmt(floor['kid'])}.", "",
             "All samples: dpm++2m from T = 1 with the standard prior, the same x_T seeds for every row "
             "(bf16 network). Classifier KID (the study's units) on 2000 samples against the test split; "
             "FID on the first 1000 against 1000 test images.", "",
             "| recipe | step | train min | KID, NFE 10 | FID, NFE 10 | FID, NFE 20 | FID 20 minus 10 "
             "| PF-ODE bits/dim |",
             "|---|---|---|---|---|---|---|---|"]
    finals: dict[str, dict[str, Any]] = {}
    for name, rec in runs.items():
        for key in sorted(rec["scores"], key=int):
            sc = rec["scores"][key]
            n20 = sc.get("nfe20")
            diff = sc.get("fid_nfe_difference")
            nll = sc.get("nll")
            lines.append(f"| {name} | {key} | {sc['train_wall_s'] / 60:.1f} | {_fmt(sc['nfe10']['kid'])} | "
                         f"{_fmt(sc['nfe10']['fid'])} | {_fmt(n20['fid']) if n20 else '-'} | "
                         f"{ci_text(diff, digits=2) if diff else '-'} | "
                         f"{_nll_text(nll)} |")
            if nll:
                finals[name] = sc
    if "baseline" in finals and len(finals) > 1:
        lines += ["", "Each recipe's last checkpoint minus the baseline's, paired: PF-ODE bits/dim per test image; "
                  "KID and FID by bootstrap replicates that share their resampling counts, on samples that share "
                  "their x_T seeds (95% intervals):", ""]
        base = finals["baseline"]
        for name, sc in finals.items():
            if name == "baseline":
                continue
            nll = paired_difference(np.asarray(sc["nll"]["per_example"]), np.asarray(base["nll"]["per_example"]))
            parts = [f"PF-ODE {ci_text(nll, digits=4)} bits/dim"]
            for nfe in ("nfe10", "nfe20"):
                for metric in ("kid", "fid"):
                    d = quality_difference(sc[nfe][metric], base[nfe][metric], metric)
                    if d is not None:
                        parts.append(f"{metric.upper()} at {nfe[3:]} NFE {ci_text(d, digits=2)}")
            lines.append(f"- {name} minus baseline: " + "; ".join(parts))
    if args.against in runs:
        ref_name = args.against
        ref_key = max(runs[ref_name]["scores"], key=int)
        ref = runs[ref_name]["scores"][ref_key]
        lines += ["", f"Screens: each run's last checkpoint minus `{ref_name}`'s (step {ref_key}, "
                  f"{ref['train_wall_s'] / 60:.1f} min), paired as above, at NFE 10 (95% intervals):", ""]
        for name, rec in runs.items():
            if name in (ref_name, "baseline"):
                continue
            key = max(rec["scores"], key=int)
            sc = rec["scores"][key]
            parts = [f"{m.upper()} {ci_text(d, digits=2)}" for m, d in _nfe10_differences(sc, ref)]
            lines.append(f"- {name} (step {key}, {sc['train_wall_s'] / 60:.1f} min) minus {ref_name}: "
                         + "; ".join(parts))
    variants = [(name, f.stem[len("scores-"):], read_json_file(f, "scores"))
                for name, rec in runs.items() for f in sorted(Path(rec["dir"]).glob("scores-*.json"))]
    if variants:
        lines += ["", "Sampling variants of the same checkpoint (raw instead of EMA weights, a float32 network, "
                  "another dpm++2m grid) minus the default (EMA, bf16, log-SNR grid), the same x_T seeds, "
                  "paired, at NFE 10 (95% intervals):", ""]
        for name, variant, scores in variants:
            for key, sc in sorted(scores.items(), key=lambda kv: int(kv[0])):
                if key not in runs[name]["scores"]:
                    continue  # no default scoring of that checkpoint to pair with
                parts = [f"{m.upper()} {_fmt(sc['nfe10'][m])}, minus default {ci_text(d, digits=2)}"
                         for m, d in _nfe10_differences(sc, runs[name]["scores"][key])]
                lines.append(f"- {name} step {key}, `{variant}`: " + "; ".join(parts))
    lines += ["", "The recipes (overrides on the `mnist-cpu` network):", ""]
    for name, rec in runs.items():
        lines.append(f"- `{name}` (recipe `{rec['recipe']}`, {rec['threads']} thread(s)): "
                     f"`{json.dumps(RECIPES.get(rec['recipe'], {}))}`")
    lines += ["", "![quality against training minutes](quality_vs_minutes.png)", "",
              "Samples of each recipe's last checkpoint (the same x_T seeds):", ""]
    for name, rec in runs.items():
        last = max(rec["scores"], key=int)
        for nfe in (10, 20):
            grid = Path(rec["dir"]) / "grids" / f"step-{last}-nfe{nfe}.png"
            if grid.is_file():
                (out / "grids").mkdir(exist_ok=True)
                shutil.copyfile(grid, out / "grids" / f"{name}-nfe{nfe}.png")
                lines.append(f"![{name}, step {last}, NFE {nfe}](grids/{name}-nfe{nfe}.png)")
    (out / "report.md").write_text("\n".join(lines) + "\n")

    fig = Figure(figsize=(10, 4))
    ax_fid, ax_kid = fig.subplots(1, 2)
    for name, rec in runs.items():
        keys = sorted(rec["scores"], key=int)
        minutes = [rec["scores"][k]["train_wall_s"] / 60 for k in keys]
        for ax, metric, scale in ((ax_fid, "fid", 1.0), (ax_kid, "kid", 1.0)):
            vals = [scale * rec["scores"][k]["nfe10"][metric]["value"] for k in keys]
            ses = [scale * (rec["scores"][k]["nfe10"][metric].get("se") or 0) for k in keys]
            ax.errorbar(minutes, vals, yerr=ses, marker="o", label=name, capsize=3)
    ax_fid.axhline(floor["fid"]["value"], color="k", ls="--", label="real data (same n)")
    ax_kid.axhline(floor["kid"]["value"], color="k", ls="--", label="real data")
    ax_fid.set(xlabel="training wall minutes", ylabel="Inception FID (1000 vs 1000)", yscale="log",
               title="dpm++2m, 10 NFE, T = 1")
    ax_kid.set(xlabel="training wall minutes", ylabel="classifier KID (2000 samples)", yscale="symlog",
               title="dpm++2m, 10 NFE, T = 1")
    ax_fid.legend()
    fig.tight_layout()
    fig.savefig(out / "quality_vs_minutes.png", dpi=110)
    atomic_write_bytes(out / "results.json", json.dumps({"floor": floor, "recipes": RECIPES, "runs": runs},
                                                         indent=1).encode())
    print(f"wrote {out / 'report.md'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("train")
    p.add_argument("--recipe", choices=sorted(RECIPES), required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("score")
    p.add_argument("run")
    p.add_argument("--steps", type=int, nargs="*", help="checkpoints to score (default: all)")
    p.add_argument("--full", action="store_true", help="the last checkpoint also at NFE 20 and its PF-ODE NLL")
    p.add_argument("--weights", choices=["ema", "model"], default="ema")
    p.add_argument("--precision", choices=list(SAMPLE_PRECISIONS), default="bf16",
                   help="the network's precision in sampling")
    p.add_argument("--spacing", choices=list(SPACINGS), default="logsnr", help="dpm++2m's time grid")
    p.set_defaults(func=cmd_score)
    p = sub.add_parser("report")
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--floor-cache", default="runs/recipe/floor")
    p.add_argument("--against", default="edm", help="the run every other run's last checkpoint is paired against")
    p.set_defaults(func=cmd_report)
    for p in sub.choices.values():
        p.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_up_process(args)
    args.func(args)


if __name__ == "__main__":
    main()
