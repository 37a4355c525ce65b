"""Devices and processes: what ``--device`` / ``device=`` means (:func:`resolve_device`), and
multi-process training on torch.distributed, one process per device, launched by torchrun.

A process is part of a group when torchrun's environment (WORLD_SIZE > 1, RANK, LOCAL_RANK)
says so; :func:`session` joins it with gloo on CPU and nccl on CUDA. Every rank computes the
same global batch order and keeps its slice of each batch (:func:`shard`); gradients are
averaged across ranks, so the parameters, the optimizer and the EMA stay identical on every
rank, and rank 0 alone writes files. The study deals whole work items to the ranks instead
(:func:`deal`: item k to rank k mod world size, results gathered in order on every rank), runs
rank-0 work with :func:`on_main`, and gives a rank a whole item to do by itself within
:func:`alone`. In one process every helper here is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from difftime.errors import DifftimeError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:K"


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """The torch device that ``--device NAME`` and every ``device=`` of the library mean: the one place
    that reads a device name, so every command and function accepts the same names.

    "auto" is CUDA when this torch sees a GPU, else the CPU; "cpu"; "cuda" (the current CUDA device)
    or "cuda:K". Any other name, and a CUDA device that this process cannot see, is one DifftimeError
    line that names the fix, before any work starts.

    >>> resolve_device("cpu")
    device(type='cpu')
    >>> resolve_device("auto") == (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
    ...                            else torch.device("cpu"))
    True
    >>> resolve_device("gpu")
    Traceback (most recent call last):
    ...
    difftime.errors.DifftimeError: unknown device 'gpu'; expected auto, cpu, cuda or cuda:K (e.g. --device cuda:0)
    """
    text = str(name).strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index):
        raise DifftimeError(f"unknown device {str(name)!r}; expected {DEVICE_CHOICES} (e.g. --device cuda:0)")
    if device.type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        why = "this process sees no CUDA GPU" + (f" (torch {torch.__version__} is a CPU-only build)"
                                                  if torch.version.cuda is None else "")
        raise DifftimeError(f"device {str(name)!r}: {why}; use --device cpu (or auto), or run on a machine with an "
                            "NVIDIA GPU and a CUDA build of torch")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= count:
        raise DifftimeError(f"device {str(name)!r}: this process sees {count} CUDA GPU(s), cuda:0 to "
                            f"cuda:{count - 1}; choose one of them (CUDA_VISIBLE_DEVICES renumbers them)")
    return torch.device("cuda", index)


def module_device(module: Any, default: str | torch.device = "cpu") -> torch.device:
    """The device of a module's first parameter or buffer: where its inputs must go. ``default`` for
    anything that holds no tensor (a plain function as eps-network, the standard prior)."""
    if isinstance(module, torch.nn.Module):
        for tensor in (*module.parameters(), *module.buffers()):
            return tensor.device
    return torch.device(default)


def launched() -> bool:
    """Whether torchrun started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextmanager
def session(device: str = "cpu") -> Iterator[str]:
    """Join torchrun's process group for the duration; yields this rank's device, as a string.

    ``device`` is any name :func:`resolve_device` reads ("auto" included). On CUDA each rank takes
    the GPU of its LOCAL_RANK and the group talks over nccl; on the CPU over gloo. Outside torchrun,
    or when the group is already initialised (by the caller), it yields the resolved device and
    does nothing else.
    """
    dev = resolve_device(device)
    if not launched() or dist.is_initialized():
        yield str(dev)
        return
    if dev.type == "cuda":
        dev = resolve_device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend)
    try:
        yield str(dev)
    finally:
        dist.destroy_process_group()


_ALONE: list[bool] = []  # non-empty inside `alone()`


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() and not _ALONE else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() and not _ALONE else 0


@contextmanager
def alone() -> Iterator[None]:
    """Within the block this rank works as if it were the only process: every helper here (and so
    training, prior fits and writes guarded by :func:`is_main`) acts as in one process. The study
    uses it for work it gives to one rank, such as one network of a per-T study."""
    _ALONE.append(True)
    try:
        yield
    finally:
        _ALONE.pop()


def owns(index: int) -> bool:
    """Whether this rank does work item ``index`` when items are dealt round-robin: item k goes to
    rank k mod world size, the same deal on every rank."""
    return index % world_size() == rank()


def is_main() -> bool:
    return rank() == 0


def shard(batch: Tensor) -> Tensor:
    """This rank's contiguous slice of a global batch, which must split evenly across ranks."""
    world = world_size()
    if world == 1:
        return batch
    if len(batch) % world:
        raise DifftimeError(
            f"a global batch of {len(batch)} does not split evenly across {world} processes; "
            f"use a batch size divisible by {world}"
        )
    n = len(batch) // world
    return batch[rank() * n:(rank() + 1) * n]


def mean(value: Tensor) -> Tensor:
    """The average of ``value`` over ranks (``value`` itself in one process); NaN anywhere is NaN everywhere."""
    if world_size() == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / world_size()


def average_gradients(params: Iterable[Tensor]) -> None:
    """Average the gradients of ``params`` across ranks in one flat all-reduce, for models outside DDP."""
    grads = [p.grad for p in params if p.grad is not None]
    if world_size() == 1 or not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= world_size()
    for grad, averaged in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
        grad.copy_(averaged)


def broadcast(tensors: Iterable[Tensor]) -> None:
    """Overwrite ``tensors`` in place with rank 0's values."""
    if world_size() > 1:
        for tensor in tensors:
            dist.broadcast(tensor.data, src=0)


def gather(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` (picklable) as a list on rank 0; None on the other ranks."""
    if world_size() == 1:
        return [obj]
    out: list[Any] | None = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable, CPU tensors inside) as a list in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_owned(owned: dict[int, Any]) -> dict[int, Any]:
    """The union of every rank's {item index: result} (:func:`owns`), on every rank."""
    return {k: v for part in all_gather(owned) for k, v in part.items()}


def deal(count: int, work: Callable[[int], Any], replay: Callable[[int], Any] | None = None) -> list[Any]:
    """``work(k)`` for the items k = 0..count-1 that this rank :func:`owns`, ``replay(k)`` (when given)
    for the others, in order k, so a random stream that every item draws from advances on every rank
    as it does in one process; returns every item's result, in order, on every rank."""
    owned = {}
    for k in range(count):
        if owns(k):
            owned[k] = work(k)
        elif replay is not None:
            replay(k)
    return [value for _, value in sorted(gather_owned(owned).items())]


def on_main(fn: Callable[[], Any]) -> Any:
    """``fn()`` run on rank 0 only, its result given to every rank. A DifftimeError there is raised
    on every rank with the same line, so all ranks stop the same way instead of waiting."""
    if world_size() == 1:
        return fn()
    box: list[Any] = [None]
    if is_main():
        try:
            box[0] = ("ok", fn())
        except DifftimeError as exc:
            box[0] = ("error", str(exc))
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise DifftimeError(value)
    return value


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
