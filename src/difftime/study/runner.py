"""The :class:`Study`: plan a study directory, train, fit the priors, measure every cell and write the
report."""

from __future__ import annotations

import contextlib
import copy
import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from difftime import distributed
from difftime.config import build_config, merge, validate
from difftime.data import load_data
from difftime.errors import DifftimeError
from difftime.evaluation import draw_samples, likelihood_across_T, optimize_grid, resolve_prior
from difftime.gridopt import TimeGrid
from difftime.headroom import run_headroom
from difftime.io import atomic_write_bytes, exclusive_lock, read_json_file, save_json
from difftime.metrics import quality_metrics
from difftime.plots import save_samples_figure
from difftime.priors import fit_run_prior, prior_dir
from difftime.provenance import versions
from difftime.rng import stream_seed
from difftime.run import LOCK_FILE, load_run
from difftime.sampling import default_spacing, steps_for_horizon
from difftime.study.analysis import paired_likelihood, primary_metric, quality_difference, quality_frontier
from difftime.study.records import cell_name, run_identity
from difftime.study.report import write_report
from difftime.study.settings import GRID_KEYS, quality_metric_names, study_settings
from difftime.training import train_run

FID_BOOTSTRAP = 50  # replicates for the headline Inception FIDs


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """The dotted config keys whose values differ between two configs."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [k for key in sorted(set(old) | set(new))
                for k in _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".")]


HEADLINE_STREAM = 7  # difftime.rng stream of the headline's held-out draws


def _cached_record(path: Path, what: str, valid: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
    """The JSON record at ``path`` if rank 0 finds it there and ``valid``, on every rank; None means
    the work is to be done (by every rank, so the decision is rank 0's alone)."""
    def load() -> dict[str, Any] | None:
        saved = read_json_file(path, what) if path.is_file() else None
        return saved if saved is not None and valid(saved) else None

    return distributed.on_main(load)


def headline_seed(seed: int) -> int:
    """The seed of the headline's fresh draws: a stream of the study's seed that no selection uses."""
    return stream_seed(seed, HEADLINE_STREAM)


def _fid_name(c: dict[str, Any]) -> str:
    grid = f"-{c.get('spacing')}" if c.get("grid_file") else ""  # an optimized grid, not the sampler's fixed spacing
    return f"{cell_name(c['T'], c['prior'])}-{c['sampler']}-{c['steps']}{grid}"


class _StageClock:
    """Wall seconds of each stage of one invocation, as rank 0 sees them (a shared stage ends when
    its last rank delivers)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.laps[stage] = now - self._last
        self._last = now


class Study:
    """One study directory: plan, train, measure every cell, then write the report."""

    def __init__(self, out: str | Path, config: dict[str, Any], *, run: str | Path | None = None,
                 device: str = "cpu", progress: bool = True) -> None:
        self.out = Path(out)
        self.settings = study_settings(config)
        # The resolved sampling eps goes into study.json: a rerun after the library default moved is refused.
        self.config = merge(config, {"study": {"sample_eps": self.settings["sample_eps"]}})
        # Recorded as given (a relative path stays relative, so results name no machine's folders).
        self.pretrained = str(Path(run)) if run is not None else None
        if self.pretrained is not None and self.settings["mode"] != "truncate":
            raise DifftimeError("--run uses one pretrained model, which is study mode 'truncate'; drop --mode per-T")
        self.device = device
        self.progress = progress

    # --- the study directory ---------------------------------------------------------------
    def _claim_directory(self) -> None:
        """Create the directory, or check that a rerun asks for the same study."""
        record = self.out / "study.json"
        if record.is_file():
            saved = read_json_file(record, "study record")
            old, new = copy.deepcopy(saved.get("config")), copy.deepcopy(self.config)
            if not isinstance(old, dict) or "study" not in old:
                raise DifftimeError(f"{record} is not a difftime study record; choose a new --out")
            for key in GRID_KEYS:
                old["study"].pop(key, None)
                new["study"].pop(key, None)
            # A setting added to the library since the study began, at the default that reproduces it.
            defaults = build_config()["study"]
            old["study"].update({k: v for k, v in new["study"].items()
                                 if k not in old["study"] and k in defaults and v == defaults[k]})
            same_run = (saved.get("run") is None) == (self.pretrained is None) and (
                self.pretrained is None or Path(saved["run"]).resolve() == Path(self.pretrained).resolve())
            changed = _changed_keys(old, new) + ([] if same_run else ["--run"])
            if changed:
                raise DifftimeError(
                    f"{self.out} holds a study with different settings ({', '.join(changed)}); only "
                    f"{', '.join(GRID_KEYS)} may change on a rerun: use the same options or a new --out")
        elif any(p.name != LOCK_FILE for p in self.out.iterdir()):
            raise DifftimeError(f"{self.out} exists and is not a difftime study directory; choose a new --out")
        self.out.mkdir(parents=True, exist_ok=True)
        # Rewritten on every rerun so it always describes the grid of the latest report.
        save_json(record, {"config": self.config, "run": self.pretrained, "versions": versions()})

    def _run_dirs(self) -> dict[float, Path]:
        """The run that serves each T."""
        if self.pretrained is not None:
            return {T: Path(self.pretrained) for T in self.settings["T_grid"]}
        if self.settings["mode"] == "truncate":
            return {T: self.out / "runs" / "main" for T in self.settings["T_grid"]}
        return {T: self.out / "runs" / f"T{T:g}" for T in self.settings["T_grid"]}

    def _train(self, run_dir: Path, T_train: float, dataset) -> dict[str, Any]:
        """Train (or finish training) one run on every rank (DDP under torchrun); returns its
        training record."""
        record_path = run_dir / "study-train.json"
        saved = distributed.on_main(lambda: read_json_file(record_path, "training record")
                                    if record_path.is_file() else None)
        if saved is not None:
            return saved
        config = merge(self.config, {"train": {"T": T_train}})
        validate(config)
        # An interrupted study finishes the run from its last checkpoint.
        resume = distributed.on_main(lambda: (run_dir / "config.json").is_file())
        result = train_run(config, run_dir, resume=resume, device=self.device, progress=self.progress)
        record = {"run": str(run_dir), "T_train": T_train, "steps": result.step,
                  "resumed_at_step": result.resumed_at_step, "last_loss": result.last_loss, "params": result.params,
                  "wall_s": result.wall_s}
        if distributed.is_main():
            save_json(record_path, record)
        return record

    def _train_all(self, run_dirs: dict[float, Path], dataset) -> dict[str, Any]:
        """Every run's training record. Truncate mode trains its one network on all ranks (DDP); per-T
        mode deals the networks to the ranks (T_grid[k] to rank k mod world size), each trained by its
        rank alone, so every network is the one a single process trains."""
        if self.settings["mode"] == "truncate":
            run_dir = next(iter(run_dirs.values()))
            return {str(run_dir): self._train(run_dir, self.config["train"]["T"], dataset)}
        Ts = list(run_dirs)

        def train_alone(k: int) -> dict[str, Any]:
            with distributed.alone():
                return self._train(run_dirs[Ts[k]], Ts[k], dataset)

        return {str(run_dirs[T]): record for T, record in zip(Ts, distributed.deal(len(Ts), train_alone), strict=True)}

    def _splits(self, dataset) -> tuple[str, str]:
        """(reference split, held-out split): samples are scored against the reference, and real
        examples from the other split, scored the same way, are the floor. "auto" references the
        larger split, so the reference is the better estimate of the data distribution."""
        ref = self.settings["reference_split"]
        if ref == "auto":
            ref = "train" if len(dataset.train) >= len(dataset.test) else "test"
        return ref, "test" if ref == "train" else "train"

    def _quality(self, samples: np.ndarray, dataset, shard: bool = True) -> dict[str, Any]:
        """The quality metrics of one sample set; with ``shard`` every rank calls this and the feature
        extraction is shared among them."""
        s = self.settings
        return quality_metrics(samples, dataset.name, quality_metric_names(s, dataset.is_image),
                               reference_split=self._splits(dataset)[0], seed=self.config["seed"], progress=False,
                               bootstrap=s["bootstrap"], shard=shard)

    def _data_floor(self, dataset) -> dict[str, Any]:  # on rank 0 (metrics)
        """Held-out real examples scored exactly as a cell's samples are (the same n, reference,
        features and bootstrap counts): what a perfect model scores at this sample size. A cell that
        scores better than this is suspect (low diversity or metric bias), not excellent."""
        path = self.out / "data_floor.json"
        if path.is_file():
            floor = read_json_file(path, "data floor")
            if "quality" in floor:
                return floor
        ref, held_out = self._splits(dataset)
        n = self.settings["n_samples"]
        floor = {"n_samples": n, "split": held_out, "reference_split": ref,
                 "quality": self._quality(self._held_out_examples(dataset, n), dataset, shard=False)}
        save_json(path, floor)
        return floor

    # --- one cell ----------------------------------------------------------------------------
    def _priors(self, runs: dict[float, Any], dataset) -> tuple[dict[float, dict[str, Any]],
                                                                 dict[tuple[float, str], dict[str, Any]]]:
        """Every cell's prior, with its record. The missing fits are dealt to the ranks (cell k to rank
        k mod world size, each fitted by its rank alone and stored in its run); then every rank loads
        every prior from its folder, so a fresh study and a resumed one use the same weights."""
        s = self.settings
        cells = [(T, family) for T in s["T_grid"] for family in s["priors"] if family != "standard"]
        missing = distributed.on_main(lambda: [(T, f) for T, f in cells
                                               if not (prior_dir(runs[T].path, f, T) / "config.json").is_file()])

        def fit(k: int) -> dict[str, Any]:
            T, family = missing[k]
            start = time.perf_counter()
            with distributed.alone():
                _, record = fit_run_prior(runs[T].path, runs[T].sde, runs[T].shape, family, T, dataset,
                                          steps=s["prior_steps"], batch_size=s["prior_batch_size"], lr=s["prior_lr"],
                                          seed=self.config["seed"], progress=self.progress, device=self.device)
            return {"fitted_now": True, "fit": record, "wall_s": time.perf_counter() - start}

        fitted = dict(zip(missing, distributed.deal(len(missing), fit), strict=True))
        priors = {T: {f: resolve_prior(runs[T], f, T) for f in s["priors"]} for T in s["T_grid"]}
        info = {(T, f): fitted.get((T, f), {"fitted_now": False, "wall_s": 0.0})
                for T in s["T_grid"] for f in s["priors"]}
        return priors, info

    def _headroom(self, run, priors: dict[str, Any], T: float, dataset) -> dict[str, Any]:
        """How much any prior could still gain at T (``difftime.headroom``), cached per T."""
        s = self.settings
        path = self.out / "headroom" / f"T{T:g}.json"
        if path.is_file():
            saved = read_json_file(path, "headroom record")
            if sorted(saved.get("priors", {})) == sorted({"standard", *priors}) and saved.get("n") == s["headroom_n"]:
                return saved
        record = run_headroom(run, {p: prior for p, prior in priors.items() if p != "standard"}, T, dataset,
                              n=s["headroom_n"], seed=self.config["seed"], rtol=s["tol"], atol=s["tol"],
                              divergence=s["divergence"])
        save_json(path, record)
        return record

    def _likelihood(self, runs: dict[float, Any], priors: dict[float, dict[str, Any]], dataset) -> dict[str, Any]:
        """The likelihood stage: every T x prior on the same examples and draws (one PF-ODE solve
        for the whole grid in truncate mode), the per-example bits/dim in ``likelihood.npz`` and
        the figures with their paired differences in ``likelihood.json``. Reused on a rerun
        when the grid is the same."""
        s = self.settings
        path, arrays = self.out / "likelihood.json", self.out / "likelihood.npz"
        grid = {"T_grid": s["T_grid"], "priors": s["priors"], "n": s["n_likelihood"], "n_pfode": s["n_pfode"]}

        saved = _cached_record(path, "likelihood record", lambda r: arrays.is_file() and r.get("grid") == grid)
        if saved is not None:
            return saved
        start = time.perf_counter()
        result = likelihood_across_T(
            runs, priors, dataset.test[: s["n_likelihood"]], ("elbo", "nll"), eps=runs[s["T_grid"][0]].sde.eps,
            dequant_repeats=s["dequant_repeats"], n_t=s["n_t"], n_prior=s["n_prior"], rtol=s["tol"], atol=s["tol"],
            divergence=s["divergence"], seed=self.config["seed"], elbo_design=s["elbo_design"],
            n_nll=s["n_pfode"], progress=self.progress, shard=True)
        if distributed.is_main():
            buf = io.BytesIO()
            np.savez(buf, Ts=np.array(result.Ts), priors=np.array(result.priors), **result.per_example)
            atomic_write_bytes(arrays, buf.getvalue())
        record = {"grid": grid, "elbo_design": result.elbo_design, "one_solve": result.one_solve,
                  "wall_s": time.perf_counter() - start,
                  "cells": {f"{T:g}": result.summaries[T] for T in result.Ts},
                  "paired": paired_likelihood(result, max(s["T_grid"]))}
        if distributed.is_main():
            save_json(path, record)
        return record

    def _cell(self, T: float, eps: float, family: str, prior, prior_info: dict[str, Any],
              likelihood: dict[str, Any], wall: dict[str, float], run, dataset, sweep: list[int]) -> dict[str, Any]:
        """Sample quality of one T x prior at every step budget, its grid, and the cell record."""
        s = self.settings
        seed = self.config["seed"]
        budgets = [("proportional", steps_for_horizon(T, s["steps_per_unit_time"]))]
        budgets += [("fixed", s["fixed_steps"])] if s["fixed_steps"] else []
        budgets += [("sweep", steps) for steps in sweep]
        plan = [(sampler, budget, steps, None, None) for sampler in s["samplers"] for budget, steps in budgets]
        plan += [(sampler, "frontier", steps, nfe, method) for sampler in s["frontier_samplers"]
                 for nfe, steps in s["frontier_steps"][sampler] for method in (None, *s["frontier_grids"])]
        sample_eps = s["sample_eps"]
        sampling: list[dict[str, Any]] = []
        grid_samples = None
        done: set[tuple[str, int, str | None]] = set()
        for sampler, budget, steps, target_nfe, method in plan:
            if (sampler, steps, method) in done:  # e.g. a frontier budget that a proportional one already sampled
                continue
            done.add((sampler, steps, method))
            record, samples = self._sampling_record(run, prior, T, family, sampler, budget, steps, target_nfe,
                                                    method, dataset)
            sampling.append(record)
            nfe = record["nfe"]
            if grid_samples is None and budget == "proportional":
                grid_samples = (samples, sampler, nfe)
        assert grid_samples is not None
        samples, sampler, nfe = grid_samples
        name = cell_name(T, family)
        artifacts = {"samples": f"samples/{name}.npz"}
        if dataset.is_image or samples.shape[-1] == 2:
            artifacts["grid"] = f"samples/{name}.png"
        if not distributed.is_main():  # rank 0 writes; its record is the cell's on every rank
            return distributed.on_main(dict)
        buf = io.BytesIO()
        np.savez(buf, samples=samples, T=T, eps=sample_eps, prior=family, sampler=sampler, nfe=nfe, seed=seed)
        atomic_write_bytes(self.out / artifacts["samples"], buf.getvalue())
        if "grid" in artifacts:
            save_samples_figure(samples[: s["grid_images"]] if dataset.is_image else samples,
                                self.out / artifacts["grid"], title=f"T={T:g}, {family} prior, {sampler}, NFE={nfe}")
        wall["sampling_s"] = sum(r["sample_wall_s"] for r in sampling)
        wall["quality_metrics_s"] = sum(r["metrics_wall_s"] for r in sampling)
        cell = {"T": T, "eps": eps, "sample_eps": sample_eps, "prior": family, "run": str(run.path),
                "run_identity": run_identity(run.config, run.step),
                "T_train": run.config["config"]["train"]["T"], "prior_info": prior_info, "likelihood": likelihood,
                "sampling": sampling, "wall": wall, "artifacts": artifacts}
        save_json(self.out / "cells" / f"{name}.json", cell)
        return distributed.on_main(lambda: cell)

    def _sampling_record(self, run, prior, T: float, family: str, sampler: str, budget: str, steps: int,
                         target_nfe: int | None, method: str | None, dataset) -> tuple[dict[str, Any], np.ndarray]:
        """Draw one sample set of a cell (on the sampler's spacing, or on the optimized grid of
        ``method``), score it, and return its sampling record with the samples."""
        s = self.settings
        options = {} if s["spacing"] == "auto" else {"spacing": s["spacing"]}
        record: dict[str, Any] = {"spacing": options.get("spacing", default_spacing(sampler))}
        if method is not None:  # an optimized grid for this (T, prior, sampler, budget), cached in grids/
            grid, path = self._optimized_grid(run, prior, T, family, sampler, target_nfe, method)
            options = {"ts": grid.ts}
            record = {"spacing": method, "grid_file": str(path.relative_to(self.out)),
                      "grid_wall_s": grid.info["wall_s"]}
        samples, nfe, sample_wall = draw_samples(run, prior, T, sampler, steps, s["n_samples"],
                                                 seed=self.config["seed"], eps=s["sample_eps"],
                                                 precision=s["sample_precision"], batch=s["sample_batch"],
                                                 shard=True, **options)
        if target_nfe is not None and nfe != target_nfe:
            raise DifftimeError(f"{sampler} with {steps} steps spent {nfe} NFE, not the budget {target_nfe}")
        start = time.perf_counter()
        quality = self._quality(samples, dataset)
        return {"sampler": sampler, "budget": budget, "steps": steps, "nfe": nfe, **record, "eps": s["sample_eps"],
                "denoise": True, "n": s["n_samples"], "precision": s["sample_precision"],
                "sample_wall_s": sample_wall, "metrics_wall_s": time.perf_counter() - start,
                "quality": quality}, samples

    def _add_grid_records(self, path: Path, cell: dict[str, Any], run, prior, dataset) -> dict[str, Any]:
        """A finished cell from before ``study.frontier_grids`` named a method: sample only the
        optimized-grid records it lacks, and save the cell with them."""
        s = self.settings
        have = {(r["sampler"], r["steps"], r["spacing"]) for r in cell["sampling"] if r.get("grid_file")}
        missing = [(sampler, steps, nfe, method) for sampler in s["frontier_samplers"]
                   for nfe, steps in s["frontier_steps"][sampler] for method in s["frontier_grids"]
                   if (sampler, steps, method) not in have]
        for sampler, steps, nfe, method in missing:
            record, _ = self._sampling_record(run, prior, cell["T"], cell["prior"], sampler, "frontier", steps, nfe,
                                              method, dataset)
            cell["sampling"].append(record)
            cell["wall"]["sampling_s"] += record["sample_wall_s"]
            cell["wall"]["quality_metrics_s"] += record["metrics_wall_s"]
        if missing and distributed.is_main():
            save_json(path, cell)
        return distributed.on_main(lambda: cell)

    def _grid_path(self, T: float, family: str, sampler: str, nfe: int, method: str) -> Path:
        return self.out / "grids" / f"{cell_name(T, family)}-{sampler}-{nfe}-{method}.json"

    def _optimize_grids(self, runs: dict[float, Any], priors: dict[float, dict[str, Any]]) -> None:
        """Every optimized grid the frontier needs and grids/ lacks, dealt to the ranks (grid k to rank
        k mod world size) and written by rank 0."""
        s = self.settings
        wanted = [(T, family, sampler, nfe, method) for T in s["T_grid"] for family in s["priors"]
                  for sampler in s["frontier_samplers"] for nfe, _ in s["frontier_steps"][sampler]
                  for method in s["frontier_grids"]]
        missing = distributed.on_main(lambda: [key for key in wanted if not self._grid_path(*key).is_file()])

        def optimize(k: int) -> TimeGrid:
            T, family, sampler, nfe, method = missing[k]
            return optimize_grid(runs[T], priors[T][family], T, sampler, nfe, method, eps=s["sample_eps"],
                                 seed=self.config["seed"], precision=s["sample_precision"])

        grids = distributed.deal(len(missing), optimize)
        if distributed.is_main():
            for key, grid in zip(missing, grids, strict=True):
                self._grid_path(*key).parent.mkdir(parents=True, exist_ok=True)
                grid.save(self._grid_path(*key), overwrite=True)  # only an unfinished earlier attempt can be there
        distributed.barrier()  # every grid is on disk before any rank reads one

    def _optimized_grid(self, run, prior, T: float, family: str, sampler: str, nfe: int,
                        method: str) -> tuple[TimeGrid, Path]:
        """The ``method`` grid of (T, prior, sampler, NFE), from grids/ (``_optimize_grids``)."""
        path = self._grid_path(T, family, sampler, nfe, method)
        return TimeGrid.load(path, run.sde), path

    def _fid_headline(self, cells: list[dict[str, Any]], runs: dict[float, Any], priors: dict[float, dict[str, Any]],
                      dataset, T_ref: float) -> dict[str, Any] | None:
        """Inception FID of the headline configurations: at each NFE budget of the quality frontier,
        its best configuration (a short T or a fitted prior) and the T_ref standard one. Both are
        selected on the study's seed, so their samples are drawn again from a held-out seed
        (``headline_seed``, the same for both sides): scores of fresh draws, without the winner's
        curse of the selection. The
        ``study.fid_headline`` samples are scored by Inception FID against as many reference images
        and by the selection metric, with bootstrap replicates that share counts, so best - reference
        gets a paired interval. Each configuration is cached in ``fid/``. Inception is slow on a CPU
        (docs/design.md §9), hence only these."""
        s = self.settings
        n = min(s["fid_headline"], s["n_samples"])
        held_out = headline_seed(self.config["seed"])
        # Each Inception FD replicate is an SVD of an n x n matrix, hence the cap (docs/design.md §9).
        boot = min(s["bootstrap"], FID_BOOTSTRAP)
        metric = primary_metric(cells)
        if not dataset.is_image or metric is None or not s["nfe_budgets"]:
            return None
        start = time.perf_counter()
        frontier = quality_frontier(cells, metric, s["nfe_budgets"], T_ref)
        scored: dict[str, dict[str, Any]] = {}
        rows = []
        for entry in frontier:
            row: dict[str, Any] = {"budget": entry["budget"], "selected_by": metric}
            for side in ("best", "reference"):
                c = entry[side]
                if c is None:
                    continue
                name = _fid_name(c)
                if name not in scored:
                    scored[name] = self._headline_scores(c, name, n, boot, metric, runs, priors, dataset)
                fid, fresh = scored[name]["fid"], scored[name][metric]
                row[side] = {**scored[name]["configuration"], "fid": fid["value"], "fid_se": fid.get("se"),
                             f"selection_{metric}": c["value"], metric: fresh["value"],
                             f"{metric}_se": fresh.get("se"), "grid": scored[name]["grid"]}
            if "best" in row and "reference" in row:
                for key in ("fid", metric):
                    diff = quality_difference(scored[_fid_name(row["best"])][key],
                                              scored[_fid_name(row["reference"])][key], key)
                    row["difference" if key == "fid" else f"{metric}_difference"] = (
                        None if diff is None else {**diff.to_dict(), "resolved": diff.resolved})
            rows.append(row)
        return {"rows": rows, "reference_split": self._splits(dataset)[0], "n_samples": n, "n_reference": n,
                "floor": self._fid_floor(dataset, n, boot),
                "seed": held_out, "selection_seed": self.config["seed"], "metric": metric,
                "bootstrap": boot, "work_s": sum(r["sample_wall_s"] + r["fid_wall_s"] for r in scored.values()),
                "wall_s": time.perf_counter() - start}

    def _held_out_examples(self, dataset, n: int) -> np.ndarray:
        """The first n of a seeded permutation of the held-out split: the real examples of every floor."""
        held_out = self._splits(dataset)[1]
        pool = dataset.test if held_out == "test" else dataset.train
        if len(pool) < n:
            raise DifftimeError(f"study.n_samples={n} exceeds the {len(pool)} held-out {held_out} examples the data "
                                f"floor is scored on; lower --n-samples or set study.reference_split")
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(self.config["seed"]))
        return pool[order[:n]].numpy()

    def _fid_floor(self, dataset, n: int, boot: int) -> dict[str, Any]:
        """The headline FID's real-data floor: n held-out real images scored by Inception FID against
        the same n reference images as every headline configuration (FID at small n is dominated by
        its own bias, so a headline FID means something only beside this). Cached in fid/floor.json."""
        path = self.out / "fid" / "floor.json"

        saved = _cached_record(path, "FID floor",
                               lambda r: r.get("n") == n and len(r["fid"].get("replicates", [])) == boot)
        if saved is not None:
            return saved
        start = time.perf_counter()
        ref, held_out = self._splits(dataset)
        fid = quality_metrics(self._held_out_examples(dataset, n), dataset.name, ("fid",), n_reference=n,
                              reference_split=ref, seed=self.config["seed"], progress=self.progress, bootstrap=boot,
                              shard=True)["fid"]
        record = {"n": n, "split": held_out, "reference_split": ref, "fid": fid, "wall_s": time.perf_counter() - start}
        if distributed.is_main():
            save_json(path, record)
        return record

    def _headline_scores(self, c: dict[str, Any], name: str, n: int, boot: int, metric: str, runs, priors,
                         dataset) -> dict[str, Any]:
        """One headline configuration's fresh draws and their scores (both shared among the ranks),
        cached in fid/ and given to every rank."""
        s = self.settings
        held_out = headline_seed(self.config["seed"])
        path = self.out / "fid" / f"{name}.json"

        # None: new, or scored at another study.fid_headline / bootstrap / seed.
        saved = _cached_record(path, "FID record", lambda r: r.get("n") == n and r.get("seed") == held_out and len(
            r["fid"].get("replicates", [])) == boot and metric in r)
        if saved is not None:
            return saved
        options = ({"ts": TimeGrid.load(self.out / c["grid_file"]).ts} if c.get("grid_file")
                   else {} if s["spacing"] == "auto" else {"spacing": s["spacing"]})
        samples, nfe, wall = draw_samples(runs[c["T"]], priors[c["T"]][c["prior"]], c["T"], c["sampler"], c["steps"],
                                          n, seed=held_out, eps=s["sample_eps"], precision=s["sample_precision"],
                                          batch=s["sample_batch"], shard=True, **options)
        start = time.perf_counter()
        reference = self._splits(dataset)[0]
        fid = quality_metrics(samples, dataset.name, ("fid",), n_reference=n, reference_split=reference,
                              seed=self.config["seed"], progress=self.progress, bootstrap=boot, shard=True)["fid"]
        fresh = quality_metrics(samples, dataset.name, (metric,), reference_split=reference, seed=self.config["seed"],
                                progress=False, bootstrap=s["bootstrap"], shard=True)[metric]
        if not distributed.is_main():  # rank 0 writes; its record reaches every rank
            return distributed.on_main(dict)
        grid = f"fid/{name}.png"
        save_samples_figure(samples[: s["grid_images"]], self.out / grid,
                            title=f"T={c['T']:g}, {c['prior']} prior, {c['sampler']}, NFE={nfe}")
        record = {"configuration": {k: c.get(k) for k in ("T", "prior", "sampler", "steps", "nfe", "spacing",
                                                           "grid_file")},
                  "nfe": nfe, "n": n, "seed": held_out, "fid": fid, metric: fresh, "sample_wall_s": wall,
                  "fid_wall_s": time.perf_counter() - start, "grid": grid}
        save_json(path, record)
        return distributed.on_main(lambda: record)

    # --- the whole study ---------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Measure every missing cell and write the report, holding the study directory's lock."""
        if self.out.exists() and not self.out.is_dir():
            raise DifftimeError(f"{self.out} exists and is not a directory; choose a new --out")
        self.out.mkdir(parents=True, exist_ok=True)
        self.progress = self.progress and distributed.is_main()
        with contextlib.ExitStack() as lock:  # held by rank 0, the one writer of the study directory
            distributed.on_main(lambda: lock.enter_context(exclusive_lock(self.out / LOCK_FILE, f"study {self.out}"))
                                and None)
            return self._run()

    def _run(self) -> dict[str, Any]:
        distributed.on_main(self._claim_directory)
        s = self.settings
        run_dirs = self._run_dirs()
        start_all = time.perf_counter()
        dataset = load_data(self.config["data"], seed=self.config["seed"])
        clock = _StageClock()
        training = self._train_all(run_dirs, dataset) if self.pretrained is None else {}
        clock.lap("training")
        floor = distributed.on_main(lambda: self._data_floor(dataset))
        clock.lap("data floor")
        T_ref = max(s["T_grid"])
        sweep = sorted({steps_for_horizon(T, s["steps_per_unit_time"]) for T in s["T_grid"] if T < T_ref})
        cells = [(T, family) for T in s["T_grid"] for family in s["priors"]]
        loaded = {path: load_run(path, device=self.device) for path in dict.fromkeys(run_dirs.values())}
        for path, run in loaded.items():
            if run.config["resolved"]["data"] != dataset.name:
                raise DifftimeError(f"{path} was trained on {run.config['resolved']['data']!r}, "
                                    f"but the study's data is {dataset.name!r}")
        runs = {T: loaded[run_dirs[T]] for T in s["T_grid"]}
        # Every prior first: the likelihood stage pairs all cells, so it needs them all.
        priors, prior_info = self._priors(runs, dataset)
        clock.lap("prior fits")
        likelihood = self._likelihood(runs, priors, dataset)
        clock.lap("likelihood")
        # The model's own marginal at T is N(0, I) at T_max carried down by its PF-ODE, which needs a
        # network trained up to T_max: per-T runs stop at their T, so they have no headroom.
        headroom = distributed.on_main(lambda: [self._headroom(runs[T], priors[T], T, dataset) for T in s["T_grid"]]
                                       if s["headroom_n"] and s["mode"] == "truncate" else [])
        clock.lap("prior headroom")
        if s["frontier_grids"]:
            self._optimize_grids(runs, priors)
        clock.lap("grid optimization")
        by_cell: dict[tuple[float, str], dict[str, Any]] = {}
        bar = tqdm(total=len(cells), desc="study", unit="cell", disable=not self.progress, position=0)
        with bar:
            for T, family in cells:
                path = self.out / "cells" / f"{cell_name(T, family)}.json"
                saved = distributed.on_main(lambda path=path: read_json_file(path, "study cell")
                                            if path.is_file() else None)
                if saved is not None:
                    # The likelihood stage is the source of a cell's likelihood figures (it may have been
                    # recomputed for a changed grid since the cell was written).
                    cell = {**saved, "likelihood": likelihood["cells"][f"{T:g}"][family]}
                    if s["frontier_grids"]:
                        bar.set_postfix_str(f"T={T:g} {family} grids")
                        cell = self._add_grid_records(path, cell, runs[T], priors[T][family], dataset)
                    by_cell[T, family] = cell
                else:
                    bar.set_postfix_str(f"T={T:g} {family}")
                    run = runs[T]
                    T_c, eps = run.sde.check_horizon(T)
                    info = prior_info[T, family]
                    wall = {"prior_fit_s": info.pop("wall_s"), "likelihood_s": likelihood["wall_s"] / len(cells)}
                    by_cell[T, family] = self._cell(T_c, eps, family, priors[T][family], info,
                                                    likelihood["cells"][f"{T:g}"][family], wall, run, dataset,
                                                    sweep if T == T_ref and family == "standard" else [])
                bar.update(1)
        clock.lap("cells (sampling and quality metrics)")
        results = [by_cell[key] for key in cells]
        fid_headline = self._fid_headline(results, runs, priors, dataset, T_ref) if s["fid_headline"] else None
        clock.lap("headline")
        summary = {"config": self.config, "settings": s, "run": self.pretrained, "training": training,
                   "data_floor": floor, "likelihood_paired": likelihood["paired"], "headroom": headroom,
                   "elbo_design": likelihood["elbo_design"], "likelihood_wall_s": likelihood["wall_s"],
                   "versions": versions(), "cells": results, "T_ref": T_ref,
                   "n_cells": len(cells), "fid_headline": fid_headline,
                   "wall_s_this_invocation": time.perf_counter() - start_all,
                   "processes": distributed.world_size(), "stage_wall_s": clock.laps}
        if distributed.is_main():
            write_report(summary, self.out)
        return summary
