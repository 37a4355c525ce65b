"""Helpers of the benchmarks whose numbers reach BENCHMARKS.md: checked on closed forms."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from likelihood import equal_error_wall  # noqa: E402


def test_equal_error_wall_interpolates_a_power_law_exactly():
    """wall = 3 err^-0.4 on the ladder: log wall is linear in log error, so the interpolated wall at
    any bracketed error is the law's value; the bracketing steps are named."""
    errs = [1e-2, 3e-3, 8e-4, 1e-4]
    ladder = [{"tol": 10.0 ** -(i + 3), "max_err_bpd": e, "wall_s": 3 * e**-0.4} for i, e in enumerate(errs)]
    for target in (5e-3, 1e-3, 2e-4):
        got = equal_error_wall(ladder, target)
        assert got["wall_s"] == pytest.approx(3 * target**-0.4, rel=1e-12)
        a = next(i for i in range(3) if errs[i] > target >= errs[i + 1])
        assert got["between"] == [ladder[a]["tol"], ladder[a + 1]["tol"]] and 0 <= got["position"] <= 1
    # an error the ladder reaches exactly at a step gives that step's wall
    assert equal_error_wall(ladder, 8e-4)["wall_s"] == pytest.approx(3 * 8e-4**-0.4, rel=1e-12)


def test_equal_error_wall_without_a_bracket_is_none():
    ladder = [{"tol": 1e-4, "max_err_bpd": 1e-3, "wall_s": 1.0}, {"tol": 1e-5, "max_err_bpd": 5e-4, "wall_s": 2.0}]
    assert equal_error_wall(ladder, 1e-4) is None  # the peer never got there
    assert equal_error_wall(ladder, 5e-3) is None  # its loosest step was already more accurate
    # exactly the loosest step's error: bracketed by it and the next, at position 0
    assert math.isclose(equal_error_wall(ladder, 1e-3 - 1e-12)["position"], 0.0, abs_tol=1e-6)


def test_study_ranks_projection_is_amdahl_per_stage(tmp_path):
    """A study with 100 s of sampling in 4 batches, 60 s of likelihood in 2 batches and 40 s of
    serial metrics: time(N) = 40 + 100 / min(N, 4) + 60 / min(N, 2), and the headline's Inception
    time moves between the serial and the shared parts."""
    import json

    from study_ranks import project

    cells = [{"prior_info": {"fitted_now": False}, "wall": {"prior_fit_s": 0.0, "sampling_s": 50.0,
                                                           "quality_metrics_s": 20.0}} for _ in range(2)]
    results = {"settings": {"mode": "truncate", "n_likelihood": 128, "n_samples": 2000, "sample_batch": 500,
                            "fid_headline": 50},
               "cells": cells, "training": {}, "likelihood_wall_s": 60.0, "headroom": []}
    (tmp_path / "results.json").write_text(json.dumps(results))
    (tmp_path / "fid").mkdir()
    (tmp_path / "fid" / "a.json").write_text(json.dumps({"sample_wall_s": 0.0, "fid_wall_s": 10.0}))
    p = project(tmp_path, ranks=(1, 2, 4, 8))
    times = {q["ranks"]: q["time_s"] for q in p["projection"]}
    for n, t in times.items():
        assert t == pytest.approx(50 + 100 / min(n, 4) + 60 / min(n, 2), abs=0.1)
    assert p["serial_fraction"] == pytest.approx(50 / 210)
    shared = {q["ranks"]: q["time_s"] for q in project(tmp_path, ranks=(1, 2), inception_shared=True)["projection"]}
    assert shared[1] == pytest.approx(times[1], abs=0.1) and shared[2] == pytest.approx(times[2] - 5, abs=0.1)
    more = {q["ranks"]: q["time_s"] for q in project(tmp_path, ranks=(8,), sample_batch=125)["projection"]}
    assert more[8] == pytest.approx(50 + 100 / 8 + 60 / 2, abs=0.1)


def test_recipe_screen_configs_are_valid_and_edm_is_the_mnist_cpu_preset():
    """Every screened recipe is a valid config; `edm` at the preset's steps is `difftime train --preset
    mnist-cpu` (apart from how many checkpoint folders stay on disk), which is what lets
    docs/mnist-study use runs/recipe/edm-alone as the preset's model."""
    from recipe import RECIPES, recipe_config, variant_name

    from difftime.config import build_config

    for name in RECIPES:
        recipe_config(name, 100, 50)
    preset = build_config(preset="mnist-cpu")
    edm = recipe_config("edm", preset["train"]["steps"], preset["train"]["ckpt_every"])
    edm["train"]["keep_checkpoints"] = preset["train"]["keep_checkpoints"]
    assert edm == preset
    # score variants: the defaults write scores.json, every other choice its own file
    names = {variant_name(w, p, s) for w in ("ema", "model") for p in ("bf16", "fp32") for s in ("logsnr", "karras")}
    assert variant_name("ema", "bf16", "logsnr") == "" and len(names) == 8
