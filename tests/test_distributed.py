"""Multi-process training: torchrun with 2 CPU processes (gloo) against one process.

With ``train.ddp_noise = "shared"`` a 2-process run does the same arithmetic as one process
with the same global batch, so its loss curve and EMA must match to float rounding (the two
halves of a batch go through separate matmuls and the gradients through an all-reduce: about
1e-7 relative here, so 1e-5 leaves room while a wrong example, noise draw, learning rate or
averaging shifts a 256-example loss by 1e-2 or more). With the default per-rank noise streams
the runs differ by the noise only, so the curves agree within its statistical spread.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from difftime.config import build_config
from difftime.data import load_data
from difftime.io import load_tensors, read_checked_json
from difftime.priors import fit_run_prior, prior_dir
from difftime.training import Trainer

OVERRIDES = {
    "data": "gaussian:d=4,mean=0.5,scale=0.3,n=2048,n_test=256", "seed": 0,
    "net": {"kind": "mlp", "hidden": 32, "depth": 2},
    "train": {"steps": 20, "batch_size": 256, "lr": 3e-3, "warmup": 5, "ema_decay": 0.9, "log_every": 1,
              "ckpt_every": 10},
}


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def losses(run_dir: Path) -> np.ndarray:
    return np.array([json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()])


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[Trainer, Path]:
    out = tmp_path_factory.mktemp("single")
    trainer = Trainer(build_config(overrides=OVERRIDES), load_data(OVERRIDES["data"], seed=0))
    trainer.fit(out, progress=False)
    return trainer, out


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    worker = Path(__file__).with_name("ddp_worker.py")
    torchrun(str(worker), str(out), json.dumps(OVERRIDES), cwd=out)
    return out


def test_ranks_hold_identical_parameters_and_resume_exactly(ddp):
    ranks = [json.loads((ddp / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1], "model or EMA differ across ranks"
    assert ranks[0]["resumed_from_step"] == 10
    assert ranks[0]["resumed"] == ranks[0]["per-rank"], "resuming under DDP must continue bitwise"
    # The checkpoint holds both ranks' distinct noise streams.
    state = load_tensors(ddp / "per-rank" / "state.safetensors")
    assert not torch.equal(state["rng.noise"], state["rng.noise.rank1"])
    assert read_checked_json(ddp / "per-rank" / "state.json", "state")["world_size"] == 2


def test_shared_noise_matches_one_process_with_the_same_global_batch(ddp, single):
    trainer, out = single
    np.testing.assert_allclose(losses(ddp / "shared"), losses(out), rtol=1e-5)
    ema = load_tensors(ddp / "shared" / "ema.safetensors")
    for name, value in trainer.ema.module.state_dict().items():
        torch.testing.assert_close(ema[name], value, rtol=1e-5, atol=1e-6)


def test_per_rank_noise_matches_one_process_statistically(ddp, single):
    """Each step's loss is one draw with spread s around the curve; s comes from the
    single run's step-to-step differences (which cancel the slow trend): Var(a_i - a_{i+1}) ~ 2 s^2."""
    a, b = losses(single[1]), losses(ddp / "per-rank")
    assert len(a) == len(b) == 20
    s = np.std(np.diff(a)) / math.sqrt(2)
    assert np.abs(a - b).max() < 5 * math.sqrt(2) * s, (a, b, s)
    assert abs(a.mean() - b.mean()) < 4 * s * math.sqrt(2 / len(a)), (a.mean(), b.mean(), s)


def test_cli_train_and_fit_prior_under_torchrun(tmp_path):
    """`difftime train` and `difftime fit-prior` run unchanged under torchrun; the DDP prior fit is
    the same computation as one process (every rank draws the global batch and keeps its slice)."""
    (tmp_path / "config.json").write_text(json.dumps(OVERRIDES))
    run = tmp_path / "run"
    done = torchrun("-m", "difftime.cli", "train", "--config", "config.json", "--out", "run", "--no-progress",
                    cwd=tmp_path)
    assert json.loads(done.stdout.strip().splitlines()[-1])["processes"] == 2  # one line: rank 0 prints
    assert len(losses(run)) == 20
    prior_args = ("--T", "0.5", "--prior", "flow", "--steps", "20", "--batch-size", "64", "--transforms", "1",
                  "--hidden", "16")
    torchrun("-m", "difftime.cli", "fit-prior", "run", *prior_args, "--no-progress", cwd=tmp_path)
    fitted = load_tensors(prior_dir(run, "flow", 0.5) / "prior.safetensors")

    from difftime.run import load_run

    loaded = load_run(run)
    data = load_data(OVERRIDES["data"], seed=0)
    alone = tmp_path / "alone"
    prior, _ = fit_run_prior(alone, loaded.sde, loaded.shape, "flow", 0.5, data, steps=20, batch_size=64, lr=1e-3,
                             progress=False, transforms=1, hidden=(16,))
    for name, value in prior.state_dict().items():
        torch.testing.assert_close(fitted[name], value, rtol=1e-4, atol=1e-5)


def _readme_commands(program: str) -> list[str]:
    """Every command line of the README's code blocks that starts with ``program``, continuation
    lines joined and comments dropped."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = text.split("```")[1::2]
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [line.split(" #")[0].strip() for line in lines if line.strip().startswith(program + " ")]


def test_readme_difftime_commands_parse():
    from difftime.cli import build_parser

    commands = _readme_commands("difftime")
    assert len(commands) >= 20
    for command in commands:
        build_parser().parse_args(shlex.split(command)[1:])


def test_readme_torchrun_commands_reach_difftime_whole():
    """torchrun's own parser reads abbreviations of its options anywhere on the line (``--run`` as
    ``--run-path``), so each README command must hand difftime all of its arguments, which
    difftime's parser then accepts."""
    from torch.distributed.run import get_args_parser

    from difftime.cli import build_parser

    commands = _readme_commands("torchrun")
    assert len(commands) >= 8
    assert any(" study " in c and "--run " in c for c in commands)  # the case that needs the --
    for command in commands:
        argv = shlex.split(command.replace("$NODE_RANK", "0").replace("$HEAD", "node0"))[1:]
        launch = get_args_parser().parse_args(argv)
        assert launch.module and launch.training_script == "difftime.cli", command
        script_args = launch.training_script_args
        assert script_args == argv[argv.index("--") + 1:], command
        build_parser().parse_args(script_args)
    # Without the --, torchrun takes study's --run for its own option and stops.
    with pytest.raises(SystemExit):
        get_args_parser().parse_args(["-m", "difftime.cli", "study", "--run", "runs/x", "--out", "y"])
