"""`difftime study`: every artifact, internal consistency, resume and the report's verdicts."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from difftime.cli import main
from difftime.study.analysis import claims, nfe_savings

TINY_NET = {"ch": 8, "ch_mult": [1], "groups": 4, "mid_attention": False}
SPT = 10  # steps per unit time: T = 0.4 and 1.0 give 4 and 10 steps, exactly proportional


def _tiny_study(tmp_path: Path, **study: object) -> Path:
    config = {"net": TINY_NET, "train": {"steps": 30, "batch_size": 32, "bf16": False, "ckpt_every": 20},
              "study": {"T_grid": [0.4, 1.0], "priors": ["standard", "gaussian", "flow"], "n_samples": 64,
                        "n_likelihood": 16, "n_t": 4, "n_prior": 2, "prior_steps": 20, "steps_per_unit_time": SPT,
                        "fixed_steps": 3, "tol": 1e-3, **study}}
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
                 "samples.png", "data_floor.json"):
        assert (out / name).stat().st_size > 0, name
    for T in ("0.4", "1"):
        for prior in ("standard", "gaussian", "flow"):
            assert (out / "cells" / f"T{T}-{prior}.json").is_file()
            assert (out / "samples" / f"T{T}-{prior}.png").is_file()
    assert (out / "runs" / "main" / "ema.safetensors").is_file()
    assert (out / "runs" / "main" / "priors" / "flow-T0.4" / "config.json").is_file()
    report = (out / "report.md").read_text()
    for section in ("## Likelihood", "## Sample quality", "## Best T per prior", "## NFE saving at equal quality",
                    "## Where the paper's claims held", "## Wall time per stage"):
        assert section in report
    for image in ("elbo_vs_T.png", "quality_vs_nfe.png", "samples.png"):
        assert f"]({image})" in report


def test_numbers_are_consistent(digits_study):
    r = _results(digits_study)
    assert len(r["cells"]) == 6
    assert r["versions"]["torch"] and r["config"]["seed"] == 0 and r["settings"]["n_samples"] == 64
    floor = r["data_floor"]
    assert floor["n_samples"] == 64 and len(floor["subsets"]) == 3  # 1,497 training digits hold 3 disjoint subsets
    assert all(math.isfinite(q["fd"]["value"]) for q in floor["subsets"])
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
        for s in cell["sampling"]:
            per_step = {"heun": 2, "em": 1}[s["sampler"]]
            assert s["nfe"] == per_step * s["steps"] + 1  # + the final denoising evaluation
            if s["budget"] == "proportional":
                assert s["steps"] == round(SPT * cell["T"])
            elif s["budget"] == "fixed":
                assert s["steps"] == 3
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
    (["--samplers", "ddim"], "study.samplers"),
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
                  "steps_per_unit_time": 10, "fixed_steps": 3, "tol": 1e-3}}))
    out = tmp_path / "toy-study"
    assert main(["study", "--preset", "toy", "--config", str(config), "--out", str(out), "--no-progress"]) == 0
    r = _results(out)
    assert set(r["training"]) == {str(out / "runs" / "T0.5"), str(out / "runs" / "T1")}
    for cell in r["cells"]:
        assert cell["T_train"] == cell["T"]
        assert cell["run"] == str(out / "runs" / f"T{cell['T']:g}")
        for s in cell["sampling"]:
            assert s["sampler"] == "heun"  # "ode" is the Heun PF-ODE sampler
            assert {"mmd", "swd"} <= set(s["quality"])
    assert json.loads((out / "runs" / "T0.5" / "config.json").read_text())["config"]["train"]["T"] == 0.5
    assert "swd" in (out / "report.md").read_text().lower()
    assert (out / "samples.png").stat().st_size > 0


def _cell(T: float, prior: str, bpd: float, prior_bpd: float, score_bpd: float, fd: float, steps: int,
          se: float = 0.01) -> dict:
    sampling = [{"sampler": "em", "budget": "proportional", "steps": steps, "nfe": steps + 1,
                 "sample_wall_s": steps / 100, "quality": {"fd": {"value": fd}}}]
    elbo = {"bpd": bpd, "bpd_se": se, "prior_bpd": prior_bpd, "score_bpd": score_bpd}
    return {"T": T, "prior": prior, "likelihood": {"elbo": elbo}, "sampling": sampling}


def test_claims_follow_the_numbers():
    interior = [_cell(0.2, "standard", 5.0, 3.0, 1.0, 30.0, 20), _cell(0.6, "standard", 4.0, 1.0, 2.0, 20.0, 60),
                _cell(1.0, "standard", 4.5, 0.5, 3.0, 10.0, 100), _cell(0.2, "flow", 4.2, 1.2, 1.0, 9.0, 20)]
    found = {c.name: c for c in claims(interior, "fd", ["em"], 1.0, "per-T")}
    assert found["finite_best_T"].verdict == "HELD" and found["finite_best_T"].numbers["best_T"] == 0.6
    assert found["short_T_likelihood"].verdict == "HELD"
    assert found["short_T_quality_em"].verdict == "HELD"  # 9 vs 10, no noise figure given
    assert found["short_T_quality_em"].numbers["difference"] == pytest.approx(-1.0)
    noisy_floor = {c.name: c for c in claims(interior, "fd", ["em"], 1.0, "per-T", floor=(2.0, 1.0))}
    assert noisy_floor["short_T_quality_em"].verdict == "HELD WITHIN NOISE"  # 9 vs 10 with an sd of 1
    assert found["cost_proportional_to_T"].verdict == "HELD"
    assert "finite best T: HELD" in found["finite_best_T"].text  # the report's prose carries the verdict
    monotone = [_cell(0.2, "standard", 6.0, 3.0, 1.0, 30.0, 20), _cell(1.0, "standard", 4.0, 0.5, 3.0, 10.0, 100),
                _cell(0.2, "flow", 4.5, 1.2, 1.0, 11.0, 20)]
    found = {c.name: c for c in claims(monotone, "fd", ["em"], 1.0, "truncate")}
    assert found["finite_best_T"].verdict == "DID NOT HOLD"
    assert found["short_T_likelihood"].verdict == "DID NOT HOLD"
    assert found["short_T_quality_em"].verdict == "DID NOT HOLD"
    noisy = [_cell(0.6, "standard", 4.0, 1.0, 2.0, 20.0, 60, se=0.3), _cell(1.0, "standard", 4.2, 0.5, 3.0, 10.0, 100,
                                                                              se=0.3)]
    assert claims(noisy, "fd", ["em"], 1.0, "per-T")[0].verdict == "NOT RESOLVED"
    saving = nfe_savings(interior, "fd", ["em"], 1.0)
    flow = next(s for s in saving if s["prior"] == "flow")
    assert flow["reached"] and flow["nfe"] == 21 and flow["saving"] == pytest.approx(1 - 21 / 101)
    assert next(s for s in nfe_savings(monotone, "fd", ["em"], 1.0) if s["prior"] == "flow")["reached"] is False

