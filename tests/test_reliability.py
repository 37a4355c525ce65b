"""Crash safety: SIGKILL at random points and exact resume, the NaN/Inf guard, keep-last-K checkpoints."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from difftime.cli import main
from difftime.config import build_config
from difftime.data import load_data
from difftime.errors import DifftimeError
from difftime.run import CHECKPOINT_FILES, load_run, saved_checkpoints
from difftime.training import Trainer

# Dropout > 0 so torch's global RNG is part of what a resume must restore.
KILL_CONFIG = {
    "data": "toy:moons:n=2000,n_test=200",
    "net": {"kind": "mlp", "hidden": 32, "depth": 2, "time_dim": 16, "dropout": 0.1},
    "train": {
        "steps": 200,
        "batch_size": 64,
        "lr": 2e-3,
        "warmup": 10,
        "ema_decay": 0.99,
        "log_every": 10,
        "ckpt_every": 5,
        "keep_checkpoints": 2,
    },
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
RESULT_FILES = (*CHECKPOINT_FILES, "state.json")


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "difftime.cli", "train", *args, "--no-progress"],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _newest_step(run: Path) -> int:
    saved = saved_checkpoints(run)
    return int(saved[-1].name[5:]) if saved else 0


def _logged_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_at_random_points_then_resume_is_bitwise_identical(tmp_path):
    """Kill `difftime train` three times (once at a random wall time, which may fall in start-up,
    then twice at random points after fresh progress, often mid-save), resume each time, and
    compare every checkpoint file with an uninterrupted run's."""
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(KILL_CONFIG))
    reference, run = tmp_path / "reference", tmp_path / "killed"
    start = time.monotonic()
    proc = _cli("--config", str(config), "--out", str(reference))
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    reference_wall = time.monotonic() - start

    total = KILL_CONFIG["train"]["steps"]
    events = []
    proc = _cli("--config", str(config), "--out", str(run))
    time.sleep(rng.uniform(0.0, 0.5 * reference_wall))
    for kill in range(3):
        target = None
        if kill > 0:  # past the checkpoint the resumed process starts from, so it dies mid-training
            target = rng.randint(min(_newest_step(run) + 5, total - 10), total - 10)
            deadline = time.monotonic() + 60
            while proc.poll() is None and _newest_step(run) < target and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.1))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        events.append((target, _newest_step(run), proc.returncode))
        if (run / "state.json").is_file() or saved_checkpoints(run):
            load_run(run)  # whatever the kill interrupted, the run dir holds a loadable checkpoint
        if (run / "config.json").is_file():
            proc = _cli("--resume", str(run))
        else:  # killed before the run dir was written: nothing to resume, start it again
            shutil.rmtree(run, ignore_errors=True)
            proc = _cli("--config", str(config), "--out", str(run))
    assert proc.wait(timeout=120) == 0, proc.stderr.read()

    where = f"kill seed {seed}, (target, newest checkpoint, rc) per kill: {events}"
    assert sum(rc == -signal.SIGKILL for _, _, rc in events) >= 2, where
    for name in RESULT_FILES:
        assert (run / name).read_bytes() == (reference / name).read_bytes(), f"{name} differs; {where}"
    assert _logged_steps(run) == _logged_steps(reference), where
    assert [p.name for p in saved_checkpoints(run)] == ["step-00000195", "step-00000200"], where
    assert not list(run.rglob("*.tmp")), where


def _config(steps: int, **train) -> dict:
    return build_config(
        overrides={
            "data": "toy:moons:n=500,n_test=100",
            "net": {"kind": "mlp", "hidden": 16, "depth": 1, "time_dim": 8, "dropout": 0.1},
            "train": {
                "steps": steps,
                "batch_size": 32,
                "lr": 1e-2,
                "warmup": 2,
                "ema_decay": 0.9,
                "log_every": 2,
                "ckpt_every": 2,
                **train,
            },
        }
    )


@pytest.fixture(scope="module")
def moons():
    return load_data("toy:moons:n=500,n_test=100")


def _poison(trainer: Trainer, bad_steps: set[int], where: str) -> None:
    """Make the loss (forward output) or the gradient non-finite on the given 1-based steps."""
    param = next(trainer.model.parameters())
    if where == "gradient":
        param.register_hook(lambda g: g * float("inf") if trainer.step + 1 in bad_steps else g)
    else:
        trainer.model.register_forward_hook(
            lambda m, i, out: out * float("nan") if trainer.step + 1 in bad_steps and m.training else out
        )


def _files(run: Path) -> dict[str, bytes]:
    return {name: (run / name).read_bytes() for name in RESULT_FILES}


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_a_non_finite_step_stops_training_naming_it_and_keeps_the_last_good_checkpoint(tmp_path, moons, where):
    trainer = Trainer(_config(10), moons)
    trainer.write_config(tmp_path)
    _poison(trainer, {7}, where)
    with pytest.raises(DifftimeError) as info:
        trainer.fit(tmp_path, progress=False)
    message = str(info.value)
    assert f"non-finite {where}" in message and "at step 7" in message, message
    assert "last good checkpoint (step 6)" in message and "train.skip_nonfinite" in message, message
    assert json.loads((tmp_path / "state.json").read_text())["step"] == 6
    assert [p.name for p in saved_checkpoints(tmp_path)] == ["step-00000002", "step-00000004", "step-00000006"]
    load_run(tmp_path)  # the kept checkpoint is intact and finite


def test_skipped_steps_change_nothing_and_resume_exactly(tmp_path, moons):
    bad = {3, 6}
    straight = Trainer(_config(12, skip_nonfinite=2), moons)
    _poison(straight, bad, "loss")
    straight.fit(tmp_path / "a", progress=False)
    assert straight.skipped == [3, 6]

    first = Trainer(_config(5, skip_nonfinite=2), moons)
    _poison(first, bad, "gradient")
    first.fit(tmp_path / "b", progress=False)
    resumed = Trainer(_config(12, skip_nonfinite=2), moons)
    _poison(resumed, bad, "loss")
    resumed.load(tmp_path / "b")
    assert resumed.skipped == [3]
    resumed.fit(tmp_path / "b", progress=False)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")

    third = Trainer(_config(12, skip_nonfinite=2), moons)
    _poison(third, {3, 6, 9}, "loss")
    with pytest.raises(DifftimeError, match=r"at step 9 \(train.skip_nonfinite=2 already used on steps \[3, 6\]\)"):
        third.fit(tmp_path / "c", progress=False)


def test_weights_that_become_non_finite_are_never_saved(tmp_path, moons):
    trainer = Trainer(_config(6), moons)
    trainer.fit(tmp_path, progress=False)
    before = _files(tmp_path)
    with torch.no_grad():
        next(trainer.ema.module.parameters())[0] = float("inf")
    with pytest.raises(DifftimeError, match="EMA weight .* holds NaN or Inf after step 6; the last good checkpoint"):
        trainer.save(tmp_path)
    assert _files(tmp_path) == before


def test_keep_last_k_checkpoints(tmp_path, moons):
    Trainer(_config(9, keep_checkpoints=2), moons).fit(tmp_path, progress=False)
    assert [p.name for p in saved_checkpoints(tmp_path)] == ["step-00000008", "step-00000009"]
    assert (tmp_path / "checkpoints" / "step-00000009" / "state.json").read_bytes() == (
        tmp_path / "state.json"
    ).read_bytes()


def test_resume_after_a_kill_while_publishing_or_before_the_first_checkpoint(tmp_path, moons, capsys):
    Trainer(_config(8), moons).fit(tmp_path / "a", progress=False)

    torn = tmp_path / "torn"
    trainer = Trainer(_config(4), moons)
    trainer.write_config(torn)
    trainer.fit(torn, progress=False)
    # A kill after checkpoints/step-4 was written but while the top level was being replaced.
    (torn / "state.json").unlink()
    (torn / "model.safetensors").write_bytes(b"half-written")
    (torn / ".ema.safetensors.x1y2.tmp").write_bytes(b"leftover")
    assert load_run(torn).step == 4  # readers fall back to the complete folder
    resumed = Trainer(_config(8), moons)
    resumed.load(torn)
    assert resumed.step == 4 and not list(torn.glob("*.tmp"))
    resumed.fit(torn, progress=False)
    assert _files(tmp_path / "a") == _files(torn)

    # Killed before the first checkpoint: only config.json; the run restarts at step 0, exactly.
    early = tmp_path / "early"
    config_file = tmp_path / "c.json"
    config_file.write_text(json.dumps(_config(8)))
    assert main(["train", "--config", str(config_file), "--out", str(early), "--steps", "1", "--no-progress"]) == 0
    for name in (*RESULT_FILES, "metrics.jsonl"):
        (early / name).unlink()
    shutil.rmtree(early / "checkpoints")
    assert main(["train", "--resume", str(early), "--steps", "8", "--no-progress"]) == 0
    assert "at step 0" in capsys.readouterr().err
    assert _files(tmp_path / "a") == _files(early)


def test_a_flipped_digit_in_state_json_is_caught(tmp_path, moons):
    trainer = Trainer(_config(4), moons)
    trainer.write_config(tmp_path)
    trainer.fit(tmp_path, progress=False)
    text = (tmp_path / "state.json").read_text()
    (tmp_path / "state.json").write_text(text.replace('"step": 4', '"step": 5'))
    with pytest.raises(DifftimeError, match="does not match its own checksum"):
        Trainer(_config(8), moons).load(tmp_path)
    with pytest.raises(DifftimeError, match="does not match its own checksum"):
        load_run(tmp_path)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, moons):
    run = tmp_path_factory.mktemp("small")
    trainer = Trainer(_config(4), moons)
    trainer.write_config(run)
    trainer.fit(run, progress=False)
    return run


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(RESULT_FILES), where=st.floats(0, 1), bit=st.integers(0, 7))
def test_any_flipped_bit_in_a_checkpoint_is_refused_before_anything_runs(small_run, moons, name, where, bit):
    path = small_run / name
    original = path.read_bytes()
    data = bytearray(original)
    data[int(where * (len(data) - 1))] ^= 1 << bit
    path.write_bytes(bytes(data))
    try:
        with pytest.raises(DifftimeError):
            Trainer(_config(8), moons).load(small_run)
        if name in ("ema.safetensors", "state.json"):
            with pytest.raises(DifftimeError):
                load_run(small_run)
    finally:
        path.write_bytes(original)


# ------------------------------------------------------------------------------- prior fitting


def _flow(sde, data):
    from difftime.priors import make_prior

    return make_prior("flow", sde, 0.4, data, seed=1, transforms=2, hidden=[16, 16])


def test_prior_fitting_is_deterministic_and_resumes_exactly_after_an_interruption(tmp_path, moons, monkeypatch):
    from difftime.priors import fit_prior
    from difftime.sde import VPSDE

    sde = VPSDE()
    options = {
        "steps": 60,
        "batch_size": 64,
        "eval_every": 10,
        "patience": 100,
        "n_eval": 200,
        "seed": 3,
        "progress": False,
    }
    straight = _flow(sde, moons)
    expected = fit_prior(straight, sde, 0.4, moons, **options)
    again = _flow(sde, moons)
    assert fit_prior(again, sde, 0.4, moons, **options)["history"] == expected["history"]
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in straight.state_dict().items())

    interrupted = _flow(sde, moons)
    calls = {"n": 0}
    log_prob = type(interrupted).log_prob

    def dies_at_call_37(self, x):
        calls["n"] += 1
        if calls["n"] == 37:  # mid-way between the evaluations at steps 30 and 40
            raise KeyboardInterrupt
        return log_prob(self, x)

    monkeypatch.setattr(type(interrupted), "log_prob", dies_at_call_37)
    checkpoint = tmp_path / "partial"
    with pytest.raises(KeyboardInterrupt):
        fit_prior(interrupted, sde, 0.4, moons, checkpoint=checkpoint, **options)
    monkeypatch.undo()
    assert json.loads((checkpoint / "state.json").read_text())["step"] == 30

    resumed = _flow(sde, moons)
    result = fit_prior(resumed, sde, 0.4, moons, checkpoint=checkpoint, **options)
    assert result["history"] == expected["history"] and result["steps"] == 60
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in straight.state_dict().items())
    assert not checkpoint.exists()


def test_a_failed_or_interrupted_refit_never_damages_the_good_prior(tmp_path, moons, monkeypatch):
    from difftime.priors import load_prior, make_prior, save_prior
    from difftime.sde import VPSDE

    good = make_prior("gaussian", VPSDE(), 0.4, moons)
    folder = tmp_path / "priors" / "gaussian-T0.4"
    save_prior(good, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(DifftimeError, match="cannot write .*No space left on device"):
        save_prior(good, folder, extra={"refit": True})
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before

    # A save killed between its two renames leaves the previous prior in the .old sibling.
    folder.rename(folder.with_name(".gaussian-T0.4.old"))
    load_prior(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
