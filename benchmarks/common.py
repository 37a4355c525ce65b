"""Shared set-up for the benchmarks: a short digits run to measure on, and result writing."""

from __future__ import annotations

import json
import platform
import tempfile
from pathlib import Path

import torch

from difftime.config import build_config
from difftime.data import load_data
from difftime.io import Run, load_run
from difftime.train import Trainer


def digits_run(run_dir: str | None, steps: int = 300) -> Run:
    """Load ``run_dir``, or train the digits preset for ``steps`` steps into a temporary one."""
    if run_dir:
        return load_run(run_dir)
    tmp = Path(tempfile.mkdtemp(prefix="difftime-bench-"))
    config = build_config(preset="digits", overrides={"train": {"steps": steps, "ckpt_every": steps}})
    trainer = Trainer(config, load_data("digits"))
    trainer.write_config(tmp)
    trainer.fit(tmp, progress=True)
    return load_run(tmp)


def write_result(path: str | Path, name: str, results: dict) -> None:
    record = {"benchmark": name, "machine": platform.platform(), "processor": platform.processor(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "results": results}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
