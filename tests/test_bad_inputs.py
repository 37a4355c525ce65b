"""Malformed inputs across configs, data, checkpoints, priors, output folders and CLI arguments.

Every case must end with exit code 2 and one line on stderr that names the problem, print no
traceback, and leave every good output of an earlier command (a run, its prior, samples and an
evaluation, byte for byte and by mtime) exactly as it was.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import pickle
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from difftime.cli import main
from difftime.io import sha256_file

TINY = {
    "data": "toy:moons:n=400,n_test=100",
    "net": {"kind": "mlp", "hidden": 16, "depth": 1, "time_dim": 8},
    "train": {"steps": 4, "batch_size": 32, "warmup": 1, "log_every": 2, "ckpt_every": 2},
}


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """Good outputs: a run with a fitted prior, a samples file and an evaluation."""
    ws = tmp_path_factory.mktemp("good")
    (ws / "tiny.json").write_text(json.dumps(TINY))
    run = str(ws / "run")
    for argv in (
        ["train", "--config", str(ws / "tiny.json"), "--out", run],
        ["fit-prior", run, "--T", "0.5", "--prior", "gaussian"],
        ["sample", run, "--T", "0.5", "--prior", "gaussian", "--steps", "2", "--n", "4", "--out", str(ws / "good.npz")],
        ["evaluate", run, "--metrics", "elbo", "--n", "4", "--n-t", "2", "--out", str(ws / "good.json")],
    ):
        assert main([*argv, "--no-progress"] if argv[0] != "sample" else argv) == 0, argv
    return ws


def _fingerprint(root: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p.relative_to(root)): (sha256_file(p), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()
    }


# ---------------------------------------------------------------------------------- builders
# Each takes (ws, tmp) and writes the malformed input the case's argv refers to.


def _text(name: str, text: str) -> Callable[[Path, Path], None]:
    return lambda ws, tmp: (tmp / name).write_text(text)


def _config(name: str, obj: dict) -> Callable[[Path, Path], None]:
    return _text(name, json.dumps(obj))


def _npz(**arrays: np.ndarray) -> Callable[[Path, Path], None]:
    return lambda ws, tmp: np.savez(tmp / "d.npz", **arrays)


def _idx_bytes(arr: np.ndarray, magic: int | None = None) -> bytes:
    magic = (0x08 << 8 | arr.ndim) if magic is None else magic
    return struct.pack(">I", magic) + b"".join(struct.pack(">I", s) for s in arr.shape) + arr.tobytes()


def _idx(break_it: Callable[[Path, dict[str, bytes]], None]) -> Callable[[Path, Path], None]:
    def build(ws: Path, tmp: Path) -> None:
        rng = np.random.default_rng(0)
        root = tmp / "idx"
        root.mkdir()
        files = {
            "train-images-idx3-ubyte": _idx_bytes(rng.integers(0, 256, (20, 6, 6), dtype=np.uint8)),
            "train-labels-idx1-ubyte": _idx_bytes(rng.integers(0, 10, 20, dtype=np.uint8)),
            "t10k-images-idx3-ubyte": _idx_bytes(rng.integers(0, 256, (5, 6, 6), dtype=np.uint8)),
            "t10k-labels-idx1-ubyte": _idx_bytes(rng.integers(0, 10, 5, dtype=np.uint8)),
        }
        for name, data in files.items():
            (root / name).write_bytes(data)
        break_it(root, files)

    return build


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def _cifar_with_evil_batch(ws: Path, tmp: Path) -> None:
    root = tmp / "cifar"
    root.mkdir()
    good = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]})
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (root / name).write_bytes(good)
    (root / "data_batch_4").write_bytes(pickle.dumps({b"data": _Evil(), b"labels": [0]}))


def _copy(change: Callable[[Path], None]) -> Callable[[Path, Path], None]:
    """A copy of the good run in tmp/copy, broken by ``change``."""

    def build(ws: Path, tmp: Path) -> None:
        shutil.copytree(ws / "run", tmp / "copy")
        change(tmp / "copy")

    return build


def _flip_byte(name: str, where: float) -> Callable[[Path], None]:
    def change(run: Path) -> None:
        data = bytearray((run / name).read_bytes())
        data[int(where * (len(data) - 1))] ^= 0x01
        (run / name).write_bytes(bytes(data))

    return change


def _truncate(name: str) -> Callable[[Path], None]:
    return lambda run: (run / name).write_bytes((run / name).read_bytes()[:-17])


def _without_checksums(then: Callable[[Path], None]) -> Callable[[Path], None]:
    def change(run: Path) -> None:
        (run / "state.json").unlink()
        shutil.rmtree(run / "checkpoints")
        then(run)

    return change


def _edit_json(name: str, edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def change(run: Path) -> None:
        obj = json.loads((run / name).read_text())
        edit(obj)
        (run / name).write_text(json.dumps(obj))

    return change


def _set_hidden(cfg: dict) -> None:
    cfg["resolved"]["net"]["hidden"] = 24


def _prior_T(cfg: dict) -> None:
    cfg["T"] = cfg["config"]["T"] = 0.7


def _fail(code: int) -> Callable[..., None]:
    def raiser(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return raiser


def _nothing(ws: Path, tmp: Path) -> None:
    return None


class Case(NamedTuple):
    argv: str  # split on spaces after formatting {ws}, {run}, {tmp}
    message: str  # a fragment the one-line error must contain
    build: Callable[[Path, Path], None] = _nothing
    patch: tuple[str, str, int] | None = None  # (module attribute, call name, errno) made to fail


PRIOR = "priors/gaussian-T0.5"
NEW = "--out {tmp}/new"
CASES = {
    # configs
    "config: unknown key": Case(
        f"train --config {{tmp}}/c.json {NEW}",
        "unknown config key 'train.stpes'",
        _config("c.json", {"train": {"stpes": 3}}),
    ),
    "config: unknown section": Case(
        f"train --config {{tmp}}/c.json {NEW}", "unknown config key 'trian'", _config("c.json", {"trian": {}})
    ),
    "config: string for a float": Case(
        f"train --config {{tmp}}/c.json {NEW}",
        "'train.lr' must be of type float",
        _config("c.json", {"train": {"lr": "fast"}}),
    ),
    "config: int for a bool": Case(
        f"train --config {{tmp}}/c.json {NEW}",
        "'train.bf16' must be of type bool",
        _config("c.json", {"train": {"bf16": 1}}),
    ),
    "config: number for a section": Case(
        f"train --config {{tmp}}/c.json {NEW}", "'net' must be an object", _config("c.json", {"net": 5})
    ),
    "config: NaN": Case(
        f"train --config {{tmp}}/c.json {NEW}",
        "'train.lr' must be a finite number, got nan",
        _text("c.json", '{"train": {"lr": NaN}}'),
    ),
    "config: Infinity": Case(
        f"train --config {{tmp}}/c.json {NEW}",
        "'sde.T_max' must be a finite number, got inf",
        _text("c.json", '{"sde": {"T_max": Infinity}}'),
    ),
    "config: ema_decay out of range": Case(
        f"train --config {{tmp}}/c.json {NEW}",
        "train.ema_decay must be in [0, 1)",
        _config("c.json", {"train": {"ema_decay": 1.5}}),
    ),
    "config: T not above eps": Case(
        f"train --config {{tmp}}/c.json {NEW}", "need 0 < sde.eps < train.T", _config("c.json", {"train": {"T": 0.0}})
    ),
    "config: keep_checkpoints 0": Case(
        f"train --config {{tmp}}/c.json {NEW}",
        "train.keep_checkpoints must be >= 1",
        _config("c.json", {"train": {"keep_checkpoints": 0}}),
    ),
    "config: negative skip_nonfinite": Case(
        f"train --config {{tmp}}/c.json {NEW}",
        "train.skip_nonfinite must be >= 0",
        _config("c.json", {"train": {"skip_nonfinite": -1}}),
    ),
    "config: odd time_dim": Case(
        f"train --config {{tmp}}/c.json {NEW}", "net.time_dim must be even", _config("c.json", {"net": {"time_dim": 7}})
    ),
    "config: attention level out of range": Case(
        f"train --config {{tmp}}/c.json {NEW}", "net.attn_levels", _config("c.json", {"net": {"attn_levels": [5]}})
    ),
    "config: VE sigmas reversed": Case(
        f"train --config {{tmp}}/c.json {NEW}",
        "sigma_max must be > sigma_min",
        _config("c.json", {"sde": {"kind": "ve", "sigma_min": 5.0, "sigma_max": 1.0}}),
    ),
    "config: negative seed": Case(
        f"train --config {{tmp}}/c.json {NEW}", "seed must be in [0, 2**63)", _config("c.json", {"seed": -1})
    ),
    "config: not JSON": Case(f"train --config {{tmp}}/c.json {NEW}", "is not valid JSON", _text("c.json", "{not json")),
    "config: a JSON list": Case(
        f"train --config {{tmp}}/c.json {NEW}", "must hold a JSON object, got list", _text("c.json", "[1, 2]")
    ),
    "config: missing file": Case(f"train --config {{tmp}}/missing.json {NEW}", "does not exist"),
    "config: a pickle": Case(f"train --config {{tmp}}/c.pt {NEW}", "pickle-based .pt file", _text("c.pt", "whatever")),
    # data sources
    "data: missing npz": Case(f"train --data npz:{{tmp}}/none.npz {NEW}", "does not exist"),
    "data: a pickle": Case(
        f"train --data npz:{{tmp}}/d.pkl {NEW}", "pickle-based .pkl file", _text("d.pkl", "whatever")
    ),
    "data: corrupt npz": Case(
        f"train --data npz:{{tmp}}/d.npz {NEW}", "cannot read", _text("d.npz", "PK\x03\x04 not really a zip")
    ),
    "data: empty arrays": Case(
        f"train --data npz:{{tmp}}/d.npz {NEW}",
        "is empty (shape (0, 2))",
        _npz(train=np.zeros((0, 2), np.float32), test=np.zeros((3, 2), np.float32)),
    ),
    "data: shapes disagree": Case(
        f"train --data npz:{{tmp}}/d.npz {NEW}",
        "expected the same dtype and per-example",
        _npz(train=np.ones((5, 3), np.float32), test=np.ones((5, 4), np.float32)),
    ),
    "data: missing idx dir": Case(f"train --data idx:{{tmp}}/none {NEW}", "is not a directory"),
    "data: wrong IDX magic": Case(
        f"train --data idx:{{tmp}}/idx {NEW}",
        "has magic 0x00000000, expected 0x00000803",
        _idx(
            lambda root, f: (root / "train-images-idx3-ubyte").write_bytes(
                b"\0\0\0\0" + f["train-images-idx3-ubyte"][4:]
            )
        ),
    ),
    "data: corrupt gzip": Case(
        f"train --data idx:{{tmp}}/idx {NEW}",
        "is not a valid gzip file",
        _idx(lambda root, f: (root / "t10k-labels-idx1-ubyte").rename(root / "t10k-labels-idx1-ubyte.gz")),
    ),
    "data: truncated IDX": Case(
        f"train --data idx:{{tmp}}/idx {NEW}",
        "truncated or corrupt",
        _idx(lambda root, f: (root / "t10k-images-idx3-ubyte").write_bytes(f["t10k-images-idx3-ubyte"][:-9])),
    ),
    "data: truncated gzip": Case(
        f"train --data idx:{{tmp}}/idx {NEW}",
        "is not a valid gzip file",
        _idx(
            lambda root, f: (root / "train-labels-idx1-ubyte").write_bytes(
                gzip.compress(f["train-labels-idx1-ubyte"])[:-6]
            )
        ),
    ),
    "data: empty image folder": Case(f"train --data folder:{{tmp}} {NEW}", "holds 0 image files"),
    "data: unknown source": Case(f"train --data nope:x {NEW}", "unknown data source 'nope'"),
    "data: a pickle that runs code": Case(
        f"train --data cifar10:{{tmp}}/cifar {NEW}",
        "refers to posix.system; refusing to unpickle it",
        _cifar_with_evil_batch,
    ),
    # run dirs, checkpoints and priors
    "run: missing": Case("sample {tmp}/none --out {ws}/good.npz", "not a difftime run directory"),
    "run: a .pth file": Case(
        "sample {tmp}/model.pth --out {ws}/good.npz", "pickle-based .pth file", _text("model.pth", "whatever")
    ),
    "run: truncated weights": Case(
        "sample {tmp}/copy --out {ws}/good.npz", "does not match the checksum", _copy(_truncate("ema.safetensors"))
    ),
    "run: a flipped byte in the weights": Case(
        "train --resume {tmp}/copy --steps 6",
        "does not match the checksum",
        _copy(_flip_byte("model.safetensors", 0.7)),
    ),
    "run: a flipped byte in the optimizer state": Case(
        "train --resume {tmp}/copy --steps 6",
        "does not match the checksum",
        _copy(_flip_byte("state.safetensors", 0.5)),
    ),
    "run: state.json edited": Case(
        "train --resume {tmp}/copy --steps 6",
        "does not match its own checksum",
        _copy(_edit_json("state.json", lambda m: m.update(step=5))),
    ),
    "run: truncated weights, no checksums": Case(
        "sample {tmp}/copy --out {ws}/good.npz",
        "is not a readable safetensors file",
        _copy(_without_checksums(_truncate("ema.safetensors"))),
    ),
    "run: config does not match weights": Case(
        "sample {tmp}/copy --out {ws}/good.npz",
        "the network in config.json expects shape (24, 8)",
        _copy(_edit_json("config.json", _set_hidden)),
    ),
    "run: config.json not JSON": Case(
        "sample {tmp}/copy --out {ws}/good.npz",
        "is not valid JSON",
        _copy(lambda run: (run / "config.json").write_text("{")),
    ),
    "prior: a flipped byte": Case(
        "sample {tmp}/copy --T 0.5 --prior gaussian --out {ws}/good.npz",
        "do not match the checksum",
        _copy(_flip_byte(f"{PRIOR}/prior.safetensors", 0.9)),
    ),
    "prior: T outside the run's horizon": Case(
        "sample {run} --T 1.5 --prior gaussian --out {ws}/good.npz", "T <= T_max"
    ),
    "prior: not fitted at this T": Case("evaluate {run} --T 0.3 --prior gaussian --out {ws}/good.json", "fit-prior"),
    "prior: folder holds another T": Case(
        "evaluate {tmp}/copy --T 0.5 --prior gaussian --out {ws}/good.json",
        "holds a prior for T=0.7",
        _copy(_edit_json(f"{PRIOR}/config.json", _prior_T)),
    ),
    "prior: refit without --overwrite": Case("fit-prior {run} --T 0.5 --prior gaussian", "--overwrite"),
    # command-line arguments
    "cli: zero steps": Case(f"train --steps 0 {NEW}", "expected an integer >= 1, got '0'"),
    "cli: negative n": Case("sample {run} --n -3 --out {ws}/good.npz", "expected an integer >= 1"),
    "cli: wrong output suffix": Case("sample {run} --out {ws}/good.json", "--out must end in .npz"),
    "cli: unknown metric": Case("evaluate {run} --metrics elbo,bogus --out {ws}/good.json", "unknown ['bogus']"),
    "cli: unknown command": Case("frobnicate", "invalid choice: 'frobnicate'"),
    "cli: unknown headroom family": Case(
        "evaluate {run} --T 0.5 --headroom nope --out {ws}/good.json", "--headroom: unknown prior family nope"
    ),
    "cli: headroom prior not fitted": Case(
        "evaluate {run} --T 0.5 --headroom flow --out {ws}/good.json", "fit-prior"
    ),
    "cli: --grid not a PNG": Case("sample {run} --grid {ws}/g.txt --out {tmp}/s.npz", "--grid writes a PNG image"),
    "cli: unknown sampler": Case(
        "sample {run} --sampler dpm++4m --out {ws}/good.npz",
        "unknown sampler 'dpm++4m'; choose from em, pc, euler, heun, dopri5, ddim, dpm++2m, dpm++3m",
    ),
    "cli: unknown spacing": Case(
        "sample {run} --sampler ddim --spacing cosine --out {ws}/good.npz",
        "unknown spacing 'cosine'; choose from time, logsnr, quadratic, karras",
    ),
    "cli: unknown sampler for the quality metrics": Case(
        "evaluate {run} --metrics swd --sampler unipc3 --out {ws}/good.json", "unknown sampler 'unipc3'; choose from"
    ),
    "cli: --nfe without --study": Case("sample {run} --nfe 10 --out {ws}/good.npz", "--nfe N and --study DIR"),
    "cli: --study without frontier.json": Case(
        "sample {run} --nfe 10 --study {tmp} --out {ws}/good.npz", "has no frontier.json"
    ),
    "cli: no frontier budget <= N": Case(
        "sample {run} --nfe 5 --study {tmp} --out {ws}/good.npz",
        "has no NFE budget <= 5 (its budgets: 6, 10)",
        _config("frontier.json", {"frontier": [
            {"budget": b, "choice": "best", "best": {"T": 0.5, "prior": "standard", "sampler": "ddim", "steps": b - 1,
                                                     "nfe": b, "value": 1.0}} for b in (6, 10)]}),
    ),
    "cli: frontier of another run": Case(
        "sample {run} --nfe 10 --study {tmp} --out {ws}/good.npz",
        "is not the run the study measured",
        _config("frontier.json", {"frontier": [{"budget": 10, "choice": "best", "best": {
            "T": 0.5, "prior": "standard", "sampler": "ddim", "steps": 9, "nfe": 10, "value": 1.0, "run": "elsewhere",
            "run_identity": {"step": 4, "config_sha256": "0" * 64}}}]}),
    ),
    "cli: study with an unknown spacing": Case("study --preset toy --spacing cosine --out {tmp}/s", "study.spacing"),
    "cli: no output": Case("train --data digits", "needs --out"),
    "cli: over an existing run": Case("train --config {ws}/tiny.json --out {run}", "already holds a run"),
    # output folders
    "output: parent is a file": Case("sample {run} --out {ws}/good.npz/s.npz", "cannot write"),
    "output: disk full": Case(
        "sample {run} --out {ws}/good.npz", "No space left on device", patch=("difftime.io.os", "fsync", errno.ENOSPC)
    ),
    "output: not writable": Case(
        "evaluate {run} --metrics elbo --n 2 --n-t 2 --out {ws}/good.json",
        "Permission denied",
        patch=("difftime.io.tempfile", "mkstemp", errno.EACCES),
    ),
    "output: run dir not writable": Case(
        f"train --config {{ws}}/tiny.json {NEW}",
        "Permission denied",
        patch=("difftime.io.tempfile", "mkstemp", errno.EACCES),
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_malformed_input_gives_one_clear_line_exit_2_and_changes_no_good_output(
    ws, tmp_path, capsys, monkeypatch, case
):
    case.build(ws, tmp_path)
    before = _fingerprint(ws)
    if case.patch is not None:
        target, name, code = case.patch
        monkeypatch.setattr(f"{target}.{name}", _fail(code))
    argv = case.argv.format(ws=ws, run=ws / "run", tmp=tmp_path).split(" ")
    assert main([*argv, "--no-progress"] if argv[0] in ("train", "fit-prior", "evaluate") else argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("difftime: error: "), err
    assert case.message in lines[0], lines[0]
    assert "Traceback" not in out + err
    assert _fingerprint(ws) == before
    assert not (tmp_path / "new" / "config.json").exists()


def test_there_are_at_least_30_cases_across_all_kinds():
    kinds = {name.split(":")[0] for name in CASES}
    assert len(CASES) >= 30 and kinds == {"config", "data", "run", "prior", "cli", "output"}
