"""Multi-process training on torch.distributed: one process per device, launched by torchrun.

A process is part of a group when torchrun's environment (WORLD_SIZE > 1, RANK, LOCAL_RANK)
says so; :func:`session` joins it with gloo on CPU and nccl on CUDA. Every rank computes the
same global batch order and keeps its slice of each batch (:func:`shard`); gradients are
averaged across ranks, so the parameters, the optimizer and the EMA stay identical on every
rank, and rank 0 alone writes files. In one process every helper here is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from difftime.errors import DifftimeError


def launched() -> bool:
    """Whether torchrun started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextmanager
def session(device: str = "cpu") -> Iterator[str]:
    """Join torchrun's process group for the duration; yields this rank's device.

    On CUDA each rank takes the GPU of its LOCAL_RANK. Outside torchrun, or when the group is
    already initialised (by the caller), it yields ``device`` and does nothing else.
    """
    if not launched() or dist.is_initialized():
        yield device
        return
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
        backend = "nccl"
    elif dev.type == "cpu":
        backend = "gloo"
    else:
        raise DifftimeError(f"multi-process training runs on cpu or cuda devices, got --device {device}")
    dist.init_process_group(backend)
    try:
        yield str(dev)
    finally:
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


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


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
