"""Reading a study directory back: cell names, the identity of the run a study measured, and the
quality frontier's choice for an NFE budget (``difftime sample --nfe N --study DIR``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from difftime.errors import DifftimeError
from difftime.io import read_json_file


def run_identity(run_config: dict[str, Any], step: int) -> dict[str, Any]:
    """What says that a run is the one a study measured: its step and a hash of its config.json
    ``config`` and ``resolved`` sections (a copied run directory keeps both)."""
    blob = json.dumps({"config": run_config.get("config"), "resolved": run_config.get("resolved")}, sort_keys=True)
    return {"step": int(step), "config_sha256": hashlib.sha256(blob.encode()).hexdigest()}


def cell_name(T: float, prior: str) -> str:
    return f"T{T:g}-{prior}"


def frontier_choice(study: str | Path, nfe: int, run) -> dict[str, Any]:
    """The configuration the study in directory ``study`` found best for ``nfe`` network calls (its
    largest frontier budget <= nfe), checked against ``run``: the study must have measured that run."""
    path = Path(study) / "frontier.json"
    if not path.is_file():
        raise DifftimeError(f"{study} has no frontier.json; run `difftime study` there (with "
                            "study.frontier_samplers) first")
    record = read_json_file(path, "study frontier")
    entries = [e for e in record.get("frontier", []) if isinstance(e, dict) and e.get("choice")]
    fits = [e for e in entries if e["budget"] <= nfe]
    if not fits:
        budgets = ", ".join(str(e["budget"]) for e in entries) or "none"
        raise DifftimeError(f"{path} has no NFE budget <= {nfe} (its budgets: {budgets})")
    entry = max(fits, key=lambda e: e["budget"])
    chosen = entry[entry["choice"]]
    if chosen.get("run_identity") and run_identity(run.config, run.step) != chosen["run_identity"]:
        raise DifftimeError(f"{run.path} is not the run the study measured ({chosen.get('run')}, step "
                            f"{chosen['run_identity']['step']}); sample that run, or rerun the study on this one")
    return {"budget": entry["budget"], "side": entry["choice"], "metric": record.get("metric"), **chosen,
            "reference": entry.get("reference")}
