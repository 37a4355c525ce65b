"""`difftime study`: every artifact, internal consistency, resume and the report's verdicts."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from difftime.cli import main
from difftime.errors import DifftimeError
from difftime.gridopt import TimeGrid
from difftime.study import Study, frontier_steps, study_config
from difftime.study.analysis import claims, nfe_savings, quality_frontier

TINY_NET = {"ch": 8, "ch_mult": [1], "groups": 4, "mid_attention": False}
SPT = 10  # steps per unit time: T = 0.4 and 1.0 give 4 and 10 steps, exactly proportional


def _tiny_study(tmp_path: Path, **study: object) -> Path:
    config = {"net": TINY_NET, "train": {"steps": 30, "batch_size": 32, "bf16": False, "ckpt_every": 20},
              "study": {"T_grid": [0.4, 1.0], "priors": ["standard", "gaussian", "flow"], "n_samples": 64,
                        "n_likelihood": 16, "n_t": 4, "n_prior": 2, "prior_steps": 20, "steps_per_unit_time": SPT,
                        "fixed_steps": 3, "tol": 1e-3, "frontier_samplers": ["dpm++2m"], "nfe_budgets": [3, 6],
                        "headroom_n": 8, "n_pfode": 8, "fid_headline": 16, **study}}
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def digits_study(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("study")
    out = tmp / "study"
    assert main(["study", "--preset", "digits", "--config", str(_tiny_study(tmp)), "--out", str(out),
                 "--no-progress"]) == 0
    return out


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_every_artifact_is_written(digits_study):
    out = digits_study
    for name in ("study.json", "results.json", "results.csv", "report.md", "elbo_vs_T.png", "quality_vs_nfe.png",
                 "samples.png", "data_floor.json", "frontier.json", "frontier.png"):
        assert (out / name).stat().st_size > 0, name
    for T in ("0.4", "1"):
        for prior in ("standard", "gaussian", "flow"):
            assert (out / "cells" / f"T{T}-{prior}.json").is_file()
            assert (out / "samples" / f"T{T}-{prior}.png").is_file()
    assert (out / "runs" / "main" / "ema.safetensors").is_file()
    assert (out / "runs" / "main" / "priors" / "flow-T0.4" / "config.json").is_file()
    report = (out / "report.md").read_text()
    for section in ("## Likelihood", "## Sample quality", "## Best T per prior", "## NFE saving at equal quality",
                    "## Quality frontier: how much diffusion time is enough for N network calls",
                    "## Where the paper's claims held", "## Wall time per stage"):
        assert section in report
    for image in ("elbo_vs_T.png", "quality_vs_nfe.png", "samples.png", "frontier.png"):
        assert f"]({image})" in report


def test_pfode_subset_and_headline_fid(digits_study):
    """n_pfode solves the PF-ODE on the first 8 of the 16 likelihood examples; the headline stage
    scores the frontier's best and T_ref-standard configurations by Inception FID on 16 samples,
    with a paired interval, a grid each, and a report section."""
    r = _results(digits_study)
    for c in r["cells"]:
        assert c["likelihood"]["n"] == 16 and c["likelihood"]["nll"]["n"] == 8
    with np.load(digits_study / "likelihood.npz") as z:
        assert z["elbo"].shape[-1] == 16 and z["nll"].shape[-1] == 8
    head = r["fid_headline"]
    assert head["n_samples"] == head["n_reference"] == 16 and head["bootstrap"] == 50
    assert [row["budget"] for row in head["rows"]] == r["settings"]["nfe_budgets"]
    for row in head["rows"]:
        ref = row["reference"]
        assert ref["T"] == 1.0 and ref["prior"] == "standard" and ref["nfe"] <= row["budget"]
        assert math.isfinite(ref["fid"]) and ref["fid"] > 0 and ref["fid_se"] > 0
        assert (digits_study / ref["grid"]).is_file()
        if row.get("best"):
            assert (row["best"]["T"], row["best"]["prior"]) != (1.0, "standard")
            d = row["difference"]
            assert d["mean"] == pytest.approx(row["best"]["fid"] - ref["fid"], rel=1e-9)
            assert d["lo"] < d["mean"] < d["hi"]
    assert head["work_s"] > 0
    # The floor: held-out real images against the same reference images, which a tiny model's samples do not reach.
    floor = head["floor"]
    assert floor["n"] == 16 and floor["split"] == "test" and floor["reference_split"] == "train"
    assert 0 < floor["fid"]["value"] < min(row["reference"]["fid"] for row in head["rows"])
    assert "real-data floor at this n" in (digits_study / "report.md").read_text()
    # Fresh draws: the headline's seed is not the selection's, so its samples are not the ones that won.
    assert head["seed"] != head["selection_seed"] == r["config"]["seed"]
    from difftime.study.runner import headline_seed

    assert head["seed"] == headline_seed(r["config"]["seed"])
    for row in head["rows"]:
        for side in ("best", "reference"):
            c = row.get(side)
            if c:
                assert math.isfinite(c["kid"]) and c["kid_se"] > 0 and "selection_kid" in c
        if row.get("best"):
            assert row["kid_difference"]["lo"] < row["kid_difference"]["mean"] < row["kid_difference"]["hi"]
    row = head["rows"][0]["reference"]
    cell = next(c for c in r["cells"] if c["T"] == 1.0 and c["prior"] == "standard")
    same = next(s for s in cell["sampling"] if s["sampler"] == row["sampler"] and s["steps"] == row["steps"]
                and s["spacing"] == row["spacing"])
    assert row["selection_kid"] == same["quality"]["kid"]["value"] != row["kid"]
    report = (digits_study / "report.md").read_text()
    assert "## Inception FID of the headline configurations" in report
    assert "held-out seed" in report
    # The stage totals: the training, likelihood and sampling rows and a total that is their sum.
    table = report.split("## Wall time per stage (seconds)")[1].split("Per cell:")[0]
    stages = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in table.splitlines()
              if line.startswith("| ") and line.split("|")[2].strip().replace(".", "").isdigit()}
    assert {"training", "sampling", "likelihood (ELBO and PF-ODE, every cell)", "total"} <= set(stages)
    assert stages["total"] == pytest.approx(sum(v for k, v in stages.items() if k != "total"), abs=len(stages))


def test_numbers_are_consistent(digits_study):
    r = _results(digits_study)
    assert len(r["cells"]) == 6
    assert r["versions"]["torch"] and r["config"]["seed"] == 0 and r["settings"]["n_samples"] == 64
    floor = r["data_floor"]
    # "auto" references the larger split (training digits); held-out test digits are the floor.
    assert floor["n_samples"] == 64 and floor["split"] == "test" and floor["reference_split"] == "train"
    assert floor["quality"]["kid"]["se"] > 0 and "replicates" not in floor["quality"]["kid"]  # kept out of results
    stored = json.loads((digits_study / "data_floor.json").read_text())["quality"]["kid"]
    assert len(stored["replicates"]) == r["settings"]["bootstrap"] == 200
    assert stored["se"] == pytest.approx(np.std(stored["replicates"], ddof=1))
    # The likelihood is paired across every cell: one solve, nested ELBO draws, and paired standard
    # errors of T differences well below the per-cell ones.
    paired = r["likelihood_paired"]["metrics"]
    assert r["elbo_design"] == "nested" and all(c["likelihood"]["nll"]["one_solve"] for c in r["cells"])
    cells = {(c["T"], c["prior"]): c["likelihood"] for c in r["cells"]}
    for metric, key in (("elbo", "elbo"), ("nll", "nll")):
        for a in paired[metric]["adjacent"]:
            lo_cell, hi_cell = cells[a["T_a"], a["prior"]][key], cells[a["T_b"], a["prior"]][key]
            assert a["mean"] == pytest.approx(hi_cell["bpd"] - lo_cell["bpd"], abs=1e-9)
            # (This 30-step model's PF-ODE is far from the data at T = 1, so its NLL pairs less well.)
            factor = 0.5 if metric == "elbo" else 1.0
            assert a["se"] < factor * math.hypot(lo_cell["bpd_se"], hi_cell["bpd_se"]), (metric, a)
        assert len(paired[metric]["vs_reference"]) == 5 and len(paired[metric]["vs_standard"]) == 4
    with np.load(digits_study / "likelihood.npz") as f:
        assert f["elbo"].shape == (2, 3, 16) and f["nll"].shape == (2, 3, 8)  # n_pfode = 8
    # The prior headroom per T, paired on the same held-out x_T, in the results and the report.
    assert [h["T"] for h in r["headroom"]] == [0.4, 1.0]
    for h in r["headroom"]:
        assert h["n"] == 8 and set(h["priors"]) == {"standard", "gaussian", "flow"}
        head = h["priors"]["gaussian"]["headroom"]
        assert head["lo"] <= head["mean"] <= head["hi"]
    assert "## Prior headroom" in (digits_study / "report.md").read_text()
    d = 64
    for cell in r["cells"]:
        e, nll = cell["likelihood"]["elbo"], cell["likelihood"]["nll"]
        # total = P - I + R, in nats and in bits/dim
        assert e["nats"] == pytest.approx(e["prior_nats"] - e["score_nats"] + e["constant_nats"], rel=1e-9, abs=1e-9)
        assert e["bpd"] == pytest.approx(e["prior_bpd"] + e["score_bpd"] + e["constant_bpd"] + e["dequantization_bpd"],
                                         rel=1e-9)
        assert e["bpd"] == pytest.approx(-e["nats"] / (d * math.log(2)) + e["dequantization_bpd"], rel=1e-9)
        assert e["dequantization_bpd"] == pytest.approx(math.log2(17) - math.log2(2))  # L = 17 levels, a = 2
        assert nll["bpd"] == pytest.approx(nll["nats"] / (d * math.log(2)) + e["dequantization_bpd"], rel=1e-9)
        # R(T) = d/2 ln(v(T)/v(eps)) for the VP SDE, in closed form
        B = lambda t: 0.1 * t + (20 - 0.1) * t * t / 2  # noqa: E731
        R = d / 2 * math.log(-math.expm1(-B(cell["T"])) / -math.expm1(-B(cell["eps"])))
        assert e["constant_nats"] == pytest.approx(R, rel=1e-6)
        # Sampling ends at the sampling eps (DEFAULT_SAMPLE_EPS); the likelihoods keep sde.eps.
        assert cell["eps"] == 1e-5 and cell["sample_eps"] == 1e-3
        for s in cell["sampling"]:
            per_step = {"heun": 2, "em": 1, "dpm++2m": 1}[s["sampler"]]
            assert s["nfe"] == per_step * s["steps"] + 1  # + the final denoising evaluation
            assert s["eps"] == 1e-3 and s["denoise"] is True
            assert s["spacing"] == ("logsnr" if s["sampler"] == "dpm++2m" else "time")  # each sampler's own grid
            if s["budget"] == "proportional":
                assert s["steps"] == round(SPT * cell["T"])
            elif s["budget"] == "fixed":
                assert s["steps"] == 3
        # The frontier sampler at exactly every NFE budget, in every cell.
        assert sorted(s["nfe"] for s in cell["sampling"] if s["budget"] == "frontier") == [3, 6]
        if cell["prior"] != "standard":
            assert "prior_improvement" in cell["likelihood"]
    # NFE proportional to T: the step counts scale exactly with T.
    steps = {c["T"]: next(s["steps"] for s in c["sampling"] if s["budget"] == "proportional")
             for c in r["cells"] if c["prior"] == "standard"}
    assert steps[0.4] / steps[1.0] == pytest.approx(0.4)
    # The T=1 standard cell sweeps the proportional budgets of the shorter horizons.
    ref = next(c for c in r["cells"] if c["T"] == 1.0 and c["prior"] == "standard")
    assert {s["steps"] for s in ref["sampling"] if s["sampler"] == "em"} == {3, 4, 10}


def test_csv_matches_json(digits_study):
    r = _results(digits_study)
    with open(digits_study / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(len(c["sampling"]) for c in r["cells"])
    for row in rows:
        cell = next(c for c in r["cells"] if c["T"] == float(row["T"]) and c["prior"] == row["prior"])
        assert float(row["elbo_bpd"]) == pytest.approx(cell["likelihood"]["elbo"]["bpd"], rel=1e-12)
        s = next(s for s in cell["sampling"] if s["sampler"] == row["sampler"] and s["steps"] == int(row["steps"]))
        assert float(row["fd"]) == pytest.approx(s["quality"]["fd"]["value"], rel=1e-12)
        assert int(row["nfe"]) == s["nfe"]


def test_rerun_resumes_and_recomputes_identically(digits_study, tmp_path):
    out = digits_study
    cells = out / "cells"
    config = _tiny_study(tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in cells.iterdir()}
    removed = cells / "T0.4-flow.json"
    old = json.loads(removed.read_text())
    removed.unlink()
    assert main(["study", "--preset", "digits", "--config", str(config), "--out", str(out), "--no-progress"]) == 0
    after = {p.name: p.stat().st_mtime_ns for p in cells.iterdir()}
    assert {k: v for k, v in after.items() if k != removed.name} == {k: v for k, v in before.items()
                                                                    if k != removed.name}
    new = json.loads(removed.read_text())  # recomputed from the stored run and prior: same seed, same numbers
    assert new["likelihood"]["elbo"]["bpd"] == old["likelihood"]["elbo"]["bpd"]
    assert new["likelihood"]["nll"]["bpd"] == old["likelihood"]["nll"]["bpd"]
    assert [s["quality"]["fd"]["value"] for s in new["sampling"]] == [s["quality"]["fd"]["value"]
                                                                      for s in old["sampling"]]


def test_rerun_with_other_settings_is_refused(digits_study, tmp_path, capsys):
    config = _tiny_study(tmp_path, n_samples=32)
    report = (digits_study / "report.md").read_bytes()
    code = main(["study", "--preset", "digits", "--config", str(config), "--out", str(digits_study), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "study.n_samples" in err and "new --out" in err and "Traceback" not in err
    assert (digits_study / "report.md").read_bytes() == report


@pytest.mark.parametrize(("args", "message"), [
    (["--T-grid", "0.4,1.5"], "outside"),
    (["--priors", "standard,gauss"], "study.priors"),
    (["--samplers", "ddim,bogus"], "study.samplers: unknown ['bogus']"),
    (["--spacing", "cosine"], "study.spacing: unknown 'cosine'; choose from auto, time, logsnr"),
    (["--frontier-samplers", "dopri5"], "fixed NFE per step"),
    (["--frontier-samplers", "heun", "--nfe-budgets", "4,6"], "meets none of study.nfe_budgets"),
    (["--frontier-grids", "dmn"], "study.frontier_grids: unknown ['dmn']; choose from gaussian, gits"),
    (["--frontier-grids", "gits", "--frontier-samplers", "dpm++2m,em"], "no optimized grid for"),
    (["--T-grid", "0.4,1", "--eps", "0.5"], "study.sample_eps=0.5 must be below the smallest T"),
    (["--T-grid", "x"], "--T-grid"),
    (["--mode", "per-T", "--run", "nowhere"], "config.json"),
])
def test_bad_study_arguments(tmp_path, capsys, args, message):
    out = tmp_path / "s"
    code = main(["study", "--preset", "toy", "--out", str(out), *args])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_per_T_mode_on_2d_data(tmp_path):
    """per-T trains one model per horizon; 2-D data gets MMD / sliced Wasserstein and scatter plots."""
    config = tmp_path / "toy.json"
    config.write_text(json.dumps({
        "net": {"hidden": 32, "depth": 2}, "train": {"steps": 40, "batch_size": 64},
        "study": {"mode": "per-T", "T_grid": [0.5, 1.0], "priors": ["standard", "flow"], "samplers": ["ode"],
                  "n_samples": 200, "n_likelihood": 16, "n_t": 4, "n_prior": 2, "prior_steps": 10,
                  "steps_per_unit_time": 10, "fixed_steps": 3, "tol": 1e-3, "frontier_samplers": ["ipndm"],
                  "nfe_budgets": [4]}}))
    out = tmp_path / "toy-study"
    assert main(["study", "--preset", "toy", "--config", str(config), "--out", str(out), "--no-progress"]) == 0
    r = _results(out)
    assert set(r["training"]) == {str(out / "runs" / "T0.5"), str(out / "runs" / "T1")}
    for cell in r["cells"]:
        assert cell["T_train"] == cell["T"]
        assert cell["run"] == str(out / "runs" / f"T{cell['T']:g}")
        for s in cell["sampling"]:
            assert s["sampler"] == ("ipndm" if s["budget"] == "frontier" else "heun")  # "ode" is Heun's PF-ODE
            assert {"mmd", "swd"} <= set(s["quality"])
    assert json.loads((out / "runs" / "T0.5" / "config.json").read_text())["config"]["train"]["T"] == 0.5
    assert "swd" in (out / "report.md").read_text().lower()
    # The frontier on SWD carries SWD's own standard error, and names the run each configuration used.
    (entry,) = json.loads((out / "frontier.json").read_text())["frontier"]
    best = entry["best"]
    assert best["uncertainty_kind"] == "se" and best["run"] == str(out / "runs" / f"T{best['T']:g}")
    assert (out / "samples.png").stat().st_size > 0


def _cell(T: float, prior: str, kid: float, steps: int, se: float = 0.01, shift: float = 0.0) -> dict:
    reps = [kid + se * z + shift for z in np.random.default_rng(0).standard_normal(200)]
    sampling = [{"sampler": "em", "budget": "proportional", "steps": steps, "nfe": steps + 1,
                 "sample_wall_s": steps / 100, "quality": {"kid": {"value": kid, "replicates": reps}}}]
    return {"T": T, "prior": prior, "sampling": sampling}


def _paired(means: dict[tuple[float, str], float], se: float = 0.01) -> dict:
    """A paired_likelihood record from per-example bits/dim with these means (common noise + small spread)."""
    from difftime.study.analysis import paired_likelihood

    class Result:
        Ts = tuple(sorted({T for T, _ in means}))
        priors = tuple(dict.fromkeys(p for _, p in means))

        def difference(self, metric, a, b, level=0.95):
            from difftime.stats import paired_difference
            v = self.per_example[metric]
            return paired_difference(v[self.Ts.index(a[0]), self.priors.index(a[1])],
                                     v[self.Ts.index(b[0]), self.priors.index(b[1])], level)

    result = Result()
    rng = np.random.default_rng(1)
    common = rng.standard_normal(100)
    values = np.full((len(result.Ts), len(result.priors), 100), np.nan)
    for (T, p), m in means.items():
        noise = rng.standard_normal(100)
        values[result.Ts.index(T), result.priors.index(p)] = m + common + se * 10 * (noise - noise.mean())
    result.per_example = {"elbo": values, "nll": values}
    return paired_likelihood(result, max(result.Ts))


def test_claims_follow_the_paired_intervals():
    means = {(0.2, "standard"): 5.0, (0.6, "standard"): 4.0, (1.0, "standard"): 4.5, (0.2, "flow"): 4.2,
             (0.6, "flow"): 4.1, (1.0, "flow"): 4.5}
    cells = [_cell(0.2, "standard", 0.03, 20), _cell(0.6, "standard", 0.02, 60), _cell(1.0, "standard", 0.010, 100),
             _cell(0.2, "flow", 0.005, 20, shift=0.0), _cell(0.6, "flow", 0.02, 60), _cell(1.0, "flow", 0.01, 100)]
    found = {c.name: c for c in claims(cells, _paired(means), "kid", ["em"], 1.0, "per-T")}
    assert found["finite_best_T"].verdict == "HELD" and found["finite_best_T"].numbers["resolved_by"] == ["elbo", "nll"]
    assert found["finite_best_T"].numbers["per_metric"]["elbo"]["best_T"] == 0.6
    assert found["short_T_likelihood"].verdict == "HELD"  # flow at 0.6: 4.1 against 4.5, paired
    # KID 0.005 against 0.010 on the same replicate noise: a resolved paired difference.
    assert found["short_T_quality_em"].verdict == "HELD"
    assert found["short_T_quality_em"].numbers["difference"]["mean"] == pytest.approx(-0.005)
    assert found["cost_proportional_to_T"].verdict == "HELD"
    assert "finite best T with the standard prior: HELD" in found["finite_best_T"].text
    # Monotone in T: the largest T is best, and the short cells are worse beyond their intervals.
    monotone = {(0.2, "standard"): 6.0, (1.0, "standard"): 4.0, (0.2, "flow"): 4.5}
    mono_cells = [_cell(0.2, "standard", 0.03, 20), _cell(1.0, "standard", 0.01, 100), _cell(0.2, "flow", 0.02, 20)]
    found = {c.name: c for c in claims(mono_cells, _paired(monotone), "kid", ["em"], 1.0, "truncate")}
    assert found["finite_best_T"].verdict == "DID NOT HOLD"
    assert found["short_T_likelihood"].verdict == "DID NOT HOLD"
    assert found["short_T_quality_em"].verdict == "DID NOT HOLD"
    # A gap far inside the noise of the paired differences is not resolved, whichever way it points.
    close = {(0.6, "standard"): 4.0, (1.0, "standard"): 4.001}
    assert claims([_cell(0.6, "standard", 0.02, 60), _cell(1.0, "standard", 0.01, 100)], _paired(close, se=0.05),
                  "kid", ["em"], 1.0, "per-T")[0].verdict == "NOT RESOLVED"
    # Replicates drawn with independent noise: KID 0.005 vs 0.010 with se 0.01 each is not resolved.
    noisy = [_cell(1.0, "standard", 0.010, 100, se=0.01), _cell(0.2, "flow", 0.005, 20, se=0.01)]
    noisy[1]["sampling"][0]["quality"]["kid"]["replicates"] = list(
        0.005 + 0.01 * np.random.default_rng(7).standard_normal(200))
    found = {c.name: c for c in claims(noisy, _paired({(0.2, "flow"): 4.0, (1.0, "flow"): 4.0,
                                                      (0.2, "standard"): 4.0, (1.0, "standard"): 4.0}),
                                       "kid", ["em"], 1.0, "per-T")}
    assert found["short_T_quality_em"].verdict == "NOT RESOLVED"
    saving = nfe_savings(cells, "kid", ["em"], 1.0)
    flow = next(s for s in saving if s["prior"] == "flow")
    assert flow["reached"] and flow["nfe"] == 21 and flow["saving"] == pytest.approx(1 - 21 / 101)
    assert next(s for s in nfe_savings(mono_cells, "kid", ["em"], 1.0) if s["prior"] == "flow")["reached"] is False


def test_below_floor_is_flagged_with_its_recall():
    from difftime.study.analysis import below_floor

    rng = np.random.default_rng(0).standard_normal(200)
    floor = {"kid": {"value": 0.002, "replicates": list(0.002 + 1e-4 * rng)}, "pr": {"recall": 0.7}}
    record = {"sampler": "em", "quality": {"kid": {"value": 0.001, "replicates": list(0.001 + 1e-4 * rng)},
                                           "pr": {"precision": 0.9, "recall": 0.3}}}
    flag = below_floor(record, floor, "kid")
    assert flag["difference"] == pytest.approx(-0.001) and flag["hi"] < 0 and flag["recall"] == 0.3
    record["quality"]["kid"]["value"] = 0.003
    record["quality"]["kid"]["replicates"] = list(0.003 + 1e-4 * rng)
    assert below_floor(record, floor, "kid") is None


def test_quality_frontier_is_written_and_sample_picks_from_it(digits_study, tiny_run, tmp_path, capsys):
    r = _results(digits_study)
    frontier = json.loads((digits_study / "frontier.json").read_text())
    assert frontier == r["analyses"]["frontier"]
    assert frontier["metric"] == "kid" and frontier["T_ref"] == 1.0 and frontier["budgets"] == [3, 6]
    records = [(c, s) for c in r["cells"] for s in c["sampling"]]
    for entry in frontier["frontier"]:
        B, best, ref = entry["budget"], entry["best"], entry["reference"]
        others = [s["quality"]["kid"]["value"] for c, s in records if s["nfe"] <= B
                  and not (c["T"] == 1.0 and c["prior"] == "standard")]
        assert best["nfe"] <= B and best["value"] == min(others)
        assert not (best["T"] == 1.0 and best["prior"] == "standard")
        assert ref["T"] == 1.0 and ref["prior"] == "standard" and ref["nfe"] <= B
        assert ref["value"] == min(s["quality"]["kid"]["value"] for c, s in records if s["nfe"] <= B
                                   and c["T"] == 1.0 and c["prior"] == "standard")
        # Each side's bootstrap se; the difference's paired bootstrap interval around it.
        assert best["uncertainty_kind"] == ref["uncertainty_kind"] == "se" and best["uncertainty"] > 0
        assert entry["difference"] == pytest.approx(best["value"] - ref["value"])
        lo, hi = entry["difference_interval"]
        assert lo < entry["difference"] < hi
    capsys.readouterr()
    # --nfe 5 takes the largest budget <= 5, i.e. 3, and samples with exactly that configuration.
    run = digits_study / "runs" / "main"
    out = tmp_path / "f.npz"
    assert main(["sample", str(run), "--nfe", "5", "--study", str(digits_study), "--n", "4", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    entry = frontier["frontier"][0]
    chosen = entry[entry["choice"]]
    assert len(lines) == 2 and "within NFE 3" in lines[0] and f"T={chosen['T']:g}, {chosen['prior']} prior" in lines[0]
    report = json.loads(lines[1])
    for key in ("T", "prior", "sampler", "steps", "spacing", "eps", "nfe"):
        assert report[key] == chosen[key], key
    with np.load(out) as f:
        assert int(f["nfe"]) == chosen["nfe"] and str(f["sampler"]) == chosen["sampler"]
    # No budget <= N, and another run than the one the study measured: one line, exit 2.
    for argv, message in ((["--nfe", "2", "--study", str(digits_study)], "no NFE budget <= 2"),
                          (["--nfe", "6", "--study", str(tmp_path)], "has no frontier.json"),
                          (["--nfe", "6", "--study", str(digits_study), "--T", "0.4"], "drop --T")):
        assert main(["sample", str(run), *argv, "--out", str(tmp_path / "x.npz")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
    assert main(["sample", str(tiny_run), "--nfe", "6", "--study", str(digits_study), "--out",
                 str(tmp_path / "x.npz")]) == 2
    assert "not the run the study measured" in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()


def test_a_rerun_with_frontier_grids_adds_optimized_grid_records(digits_study, tmp_path, capsys):
    """study.frontier_grids on a finished study: each cell gains the gaussian and gits grid records of
    its frontier sampler at every budget (exact NFE, the grid file kept in grids/, its wall time
    recorded), the records it had are kept as they were, and the frontier may pick a grid, which
    `sample --nfe` then samples on."""
    import shutil

    out = tmp_path / "study"
    shutil.copytree(digits_study, out)
    before = {p.name: json.loads(p.read_text()) for p in (out / "cells").glob("*.json")}
    assert main(["study", "--preset", "digits", "--config", str(_tiny_study(tmp_path)), "--out", str(out),
                 "--frontier-grids", "gaussian,gits", "--no-progress"]) == 0
    for name, old in before.items():
        cell = json.loads((out / "cells" / name).read_text())
        assert cell["sampling"][: len(old["sampling"])] == old["sampling"]
        added = cell["sampling"][len(old["sampling"]):]
        assert sorted((r["spacing"], r["nfe"]) for r in added) == [("gaussian", 3), ("gaussian", 6), ("gits", 3),
                                                                   ("gits", 6)]
        for r in added:
            grid = TimeGrid.load(out / r["grid_file"])
            assert grid.T == cell["T"] and grid.nfe == r["nfe"] and grid.method == r["spacing"]
            assert r["grid_wall_s"] > 0 and r["sampler"] == "dpm++2m"
    frontier = json.loads((out / "frontier.json").read_text())["frontier"]
    records = [s for c in _results(out)["cells"] for s in c["sampling"]]
    assert all(e["best"]["value"] <= min(s["quality"]["kid"]["value"] for s in records if s["nfe"] <= e["budget"])
               for e in frontier if e["choice"] == "best")
    chosen = frontier[-1][frontier[-1]["choice"]]
    capsys.readouterr()
    assert main(["sample", str(out / "runs" / "main"), "--nfe", "6", "--study", str(out), "--n", "4", "--out",
                 str(tmp_path / "s.npz")]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["nfe"] == chosen["nfe"] and report["spacing"] == chosen["spacing"]


def _frontier_cell(T: float, prior: str, records: list[tuple[int, float]], metric: str = "fd",
                   spread: dict | None = None) -> dict:
    return {"T": T, "prior": prior, "eps": 1e-5, "sample_eps": 1e-3, "run": "r", "sampling": [
        {"sampler": "dpm++2m", "budget": "frontier", "steps": nfe - 1, "nfe": nfe, "spacing": "logsnr", "eps": 1e-3,
         "quality": {metric: {"value": value, **(spread or {})}}} for nfe, value in records]}


def test_quality_frontier_picks_the_best_within_each_budget():
    ref = _frontier_cell(1.0, "standard", [(4, 10.0), (6, 1.0)])
    cells = [ref, _frontier_cell(0.4, "flow", [(4, 9.0), (6, 12.0), (11, 3.0)]),
             _frontier_cell(0.4, "standard", [(5, 7.0)]), _frontier_cell(0.6, "gaussian", [(7, 2.0)])]
    got = {e["budget"]: e for e in quality_frontier(cells, "fd", [3, 4, 6, 10], 1.0, floor_sd=0.5)}
    assert got[3]["best"] is None and got[3]["reference"] is None and got[3]["choice"] is None
    b4 = got[4]
    assert (b4["best"]["T"], b4["best"]["prior"], b4["best"]["nfe"], b4["best"]["value"]) == (0.4, "flow", 4, 9.0)
    assert b4["reference"]["value"] == 10.0 and b4["difference"] == pytest.approx(-1.0)
    assert b4["best"]["uncertainty"] == 0.5 and b4["best"]["uncertainty_kind"] == "data floor sd"
    assert b4["difference_uncertainty"] == pytest.approx(math.hypot(0.5, 0.5)) and b4["verdict"] == "within noise"
    assert b4["choice"] == "best" and b4["best"]["steps"] == 3 and b4["best"]["spacing"] == "logsnr"
    # The reference cell's 1.0 at NFE 6 is the baseline, never the "best": that is kept separate.
    b6 = got[6]
    assert (b6["best"]["T"], b6["best"]["prior"], b6["best"]["value"]) == (0.4, "standard", 7.0)
    assert b6["reference"]["value"] == 1.0 and b6["choice"] == "reference" and b6["verdict"] == "T=1 standard better"
    # NFE 11 (value 3) does not fit a budget of 10; NFE 7 (value 2) does.
    assert got[10]["best"]["value"] == 2.0 and got[10]["best"]["nfe"] == 7
    assert got[10]["verdict"] == "within noise"
    # A metric with its own uncertainty (SWD's se) uses it instead of the floor's sd.
    swd = [_frontier_cell(1.0, "standard", [(4, 0.5)], "swd", {"se": 0.01}),
           _frontier_cell(0.4, "flow", [(4, 0.2)], "swd", {"se": 0.02})]
    (e,) = quality_frontier(swd, "swd", [4], 1.0, floor_sd=9.0)
    assert e["best"]["uncertainty"] == 0.02 and e["best"]["uncertainty_kind"] == "se"
    assert e["difference_uncertainty"] == pytest.approx(math.hypot(0.01, 0.02))
    assert e["verdict"] == "shorter T / fitted prior better"


def test_frontier_steps_meet_each_budget_exactly():
    from difftime.sde import VPSDE

    sde = VPSDE()
    assert frontier_steps("dpm++3m", [4, 6, 10], sde, 1.0, 1e-3) == {4: 3, 6: 5, 10: 9}
    assert frontier_steps("heun", [4, 5, 6, 7], sde, 1.0, 1e-3) == {5: 2, 7: 3}  # 2 NFE per step + 1
    with pytest.raises(Exception, match="fixed NFE per step"):
        frontier_steps("dopri5", [4, 6], sde, 1.0, 1e-3)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("reference_split", "val", "study.reference_split must be auto, train or test"),
    ("bootstrap", 1, "study.bootstrap must be 0"),
    ("elbo_design", "grid", "study.elbo_design must be auto or one of"),
    ("headroom_n", 1, "study.headroom_n must be 0"),
    ("n_pfode", 17, "study.n_pfode must be between 2 and study.n_likelihood=16"),
    ("sample_precision", "fp16", "study.sample_precision must be one of fp32, bf16"),
    ("fixed_steps", -1, "study.fixed_steps must be >= 1 (or 0"),
    ("fid_headline", 1, "study.fid_headline must be 0 (none) or the number of samples"),
])
def test_bad_resolution_settings_are_one_line_errors(tmp_path, capsys, key, value, message):
    config = _tiny_study(tmp_path, **{key: value})
    out = tmp_path / "s"
    assert main(["study", "--preset", "digits", "--config", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not out.exists()


def test_compare_puts_committed_studies_side_by_side(capsys):
    """`python -m difftime.study.compare` reads each study's results.json: its verdicts and intervals
    appear under each study, and a directory without results is one line, exit 2."""
    from difftime.study.compare import main as compare

    root = Path(__file__).resolve().parents[1] / "docs"
    assert compare([str(root / "digits-per-T"), str(root / "mnist-study")]) == 0
    page = capsys.readouterr().out
    header, _, *rows = [line for line in page.splitlines() if line.startswith("|")]
    assert "`digits-per-T` (per-T, digits)" in header and "`mnist-study` (truncate, mnist)" in header
    for d in ("digits-per-T", "mnist-study"):
        r = json.loads((root / d / "results.json").read_text())
        claim = next(c for c in r["analyses"]["claims"] if c["name"] == "finite_best_T")
        best = claim["numbers"]["per_metric"]["elbo"]["best_T"]
        assert f"**{claim['verdict']}**: ELBO: best T {best:g}" in page
    se = next(row for row in rows if "adjacent-T difference, PF-ODE" in row)
    adjacent = json.loads((root / "mnist-study" / "results.json").read_text())["likelihood_paired"]["metrics"]["nll"]
    assert f"{max(a['se'] for a in adjacent['adjacent']):.4f}" in se
    assert compare([str(root)]) == 2
    assert "has no results.json" in capsys.readouterr().err


def test_a_pretrained_run_is_recorded_as_given_and_recognised_in_any_spelling(tmp_path, monkeypatch):
    """study.json names the run as the user wrote it (no machine's folders in a committed result);
    a rerun that names the same folder another way is the same study, another folder is refused."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "b").mkdir()
    (tmp_path / "st").mkdir()
    config = study_config("digits", None, {})
    Study("st", config, run="runs/a")._claim_directory()
    assert json.loads((tmp_path / "st" / "study.json").read_text())["run"] == "runs/a"
    Study("st", config, run=str(tmp_path / "runs" / "a"))._claim_directory()
    Study("st", config, run="runs/../runs/a")._claim_directory()
    with pytest.raises(DifftimeError, match="--run"):
        Study("st", config, run="runs/b")._claim_directory()
    with pytest.raises(DifftimeError, match="--run"):
        Study("st", config)._claim_directory()
