"""Files: atomic writes, safetensors and JSON with checksums, refusing pickles, exclusive locks.

The bottom layer: it knows no difftime format. The run directory belongs to
:mod:`difftime.run`, a prior's folder to :mod:`difftime.priors.store`.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor, nn

from difftime.errors import DifftimeError


@functools.cache
def _umask() -> int:
    """The process umask, read once at the first write (reading it means setting it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, rename over ``path``, fsync the folder.

    Any failure (a folder that is not writable, a full disk) leaves an existing ``path`` as it was.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide results from collaborators
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
        fsync_dir(path.parent)
    except OSError as exc:
        raise DifftimeError(
            f"cannot write {path}: {exc.strerror or exc}; check that the folder is writable and the disk "
            "has free space"
        ) from exc
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def fsync_dir(directory: str | Path) -> None:
    """Make renames and deletions in ``directory`` durable, not just the files' bytes."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json_file(path: str | Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; a missing, unreadable or non-object file is one clear error."""
    path = Path(path)
    refuse_pickle(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DifftimeError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DifftimeError(f"cannot read {what} {path}: {exc}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DifftimeError(f"{what} {path} is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise DifftimeError(f"{what} {path} must hold a JSON object, got {type(obj).__name__}")
    return obj


def save_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _json_digest(obj: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def save_checked_json(path: str | Path, obj: dict[str, Any]) -> None:
    """save_json plus a checksum of the content, so a flipped digit is caught, not obeyed."""
    save_json(path, {**obj, "checksum": _json_digest(obj)})


def read_checked_json(path: str | Path, what: str) -> dict[str, Any]:
    obj = read_json_file(path, what)
    digest = obj.pop("checksum", None)  # files from before checksums have none
    if digest is not None and digest != _json_digest(obj):
        raise DifftimeError(f"{what} {path} does not match its own checksum: the file is corrupt")
    return obj


def encode_tensors(tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> bytes:
    return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)


def save_tensors(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> str:
    """Save with safetensors atomically; returns the sha256 of the bytes written."""
    data = encode_tensors(tensors, metadata)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def refuse_pickle(path: str | Path) -> None:
    """Unpickling a file can run arbitrary code, so a user's pickle is refused before it is opened."""
    suffix = Path(path).suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise DifftimeError(
            f"{path} is a pickle-based {suffix} file, and difftime never unpickles user files (that can run "
            "arbitrary code); save weights as safetensors, e.g. safetensors.torch.save_file(torch.load(FILE, "
            "weights_only=True), 'weights.safetensors'), and data as .npz"
        )


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_tensors(path: str | Path, expected_sha256: str | None = None) -> dict[str, Tensor]:
    path = Path(path)
    refuse_pickle(path)
    if not path.is_file():
        raise DifftimeError(f"{path} does not exist")
    if expected_sha256 is not None and sha256_file(path) != expected_sha256:
        raise DifftimeError(
            f"{path} does not match the checksum recorded in state.json: the file is corrupt or "
            "from another checkpoint"
        )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise DifftimeError(f"{path} is not a readable safetensors file: {exc}") from None


def load_state_dict_strict(module: nn.Module, tensors: dict[str, Tensor], source: Path,
                           described_by: str = "config.json") -> None:
    """Load weights requiring the exact keys, shapes and dtypes and finite values, naming what differs."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise DifftimeError(
            f"{source} does not match the network in {described_by}: "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    for key, value in expected.items():
        tensor = tensors[key]
        if tensor.shape != value.shape or tensor.dtype != value.dtype:
            raise DifftimeError(
                f"{source}: tensor {key!r} has shape {tuple(tensor.shape)} and dtype {tensor.dtype}; the "
                f"network in {described_by} expects shape {tuple(value.shape)} and dtype {value.dtype}"
            )
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise DifftimeError(f"{source}: tensor {key!r} holds NaN or Inf values")
    module.load_state_dict(tensors, strict=True)


_HELD: dict[Path, int] = {}  # lock file -> open descriptor, so a process can re-enter its own lock


@contextmanager
def exclusive_lock(lock_file: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_file`` while ``what`` is being written.

    A second process is refused with one line naming the holder's pid and command. The kernel
    drops the lock when its holder dies, so a lock file left by a killed process is taken over.
    Re-entrant within one process (the study trains its run while holding the study's lock).
    """
    lock_file = Path(lock_file).resolve()
    if lock_file in _HELD:
        yield
        return
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise DifftimeError(
            f"{what} is being written by {holder}; wait for it to finish or stop it, then rerun"
        ) from None
    try:
        os.ftruncate(fd, 0)
        command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:200]
        os.pwrite(fd, f"process {os.getpid()} ({command})\n".encode(), 0)
        _HELD[lock_file] = fd
        yield
    finally:
        _HELD.pop(lock_file, None)
        os.close(fd)  # releases the flock; the file stays, empty of meaning until the next holder
