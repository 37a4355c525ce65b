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
