"""Launched by tests/test_distributed.py under torchrun: trains a tiny model with each noise mode,
then resumes a half-finished run, and writes what this rank ends up holding to OUT/rank<R>.json.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py OUT CONFIG_JSON
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from difftime.config import build_config
from difftime.data import load_data
from difftime.distributed import rank, session
from difftime.io import encode_tensors
from difftime.training import Trainer


def digest(trainer: Trainer) -> dict[str, str]:
    return {name: hashlib.sha256(encode_tensors(module.state_dict())).hexdigest()
            for name, module in (("model", trainer.model), ("ema", trainer.ema.module))}


def main(out: Path, overrides: dict) -> None:
    with session("cpu"):
        config = build_config(overrides=overrides)
        data = load_data(config["data"], seed=config["seed"])
        result = {}

        def with_train(**train) -> dict:
            return build_config(overrides={**overrides, "train": {**overrides["train"], **train}})

        for mode in ("per-rank", "shared"):
            trainer = Trainer(with_train(ddp_noise=mode), data)
            trainer.fit(out / mode, progress=False)
            result[mode] = digest(trainer)
        half = Trainer(with_train(steps=config["train"]["steps"] // 2), data)
        half.fit(out / "resumed", progress=False)
        resumed = Trainer(config, data)
        resumed.load(out / "resumed")
        result["resumed_from_step"] = resumed.step
        resumed.fit(out / "resumed", progress=False)
        result["resumed"] = digest(resumed)
        (out / f"rank{rank()}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), json.loads(sys.argv[2]))
