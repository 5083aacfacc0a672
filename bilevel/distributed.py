"""Sharding a UL step across the processes of a ``torch.distributed`` process group.

Every process computes the same meta-batch (or the same UL batch), takes its share, and the
weighted hypergradients are summed with ``all_reduce``: the result is the one a single
process would get on the whole batch, so every process takes the same UL step. Launch with
``torchrun``; use the ``gloo`` backend on CPU and ``nccl`` on GPU.

A single task's UL batch is split by examples only for methods whose hypergradient is linear
in the UL objective (``splits_ul_batch``) and LL dynamics that do not read the UL batch;
otherwise every process computes the whole task and rank 0's result is the one kept.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from bilevel.state import map_tensors, tensor_leaves

Task = tuple[tuple[Any, Any], tuple[Any, Any]]


def active() -> bool:
    """Whether a process group is initialized (with more than one process)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if active() else 0


def is_main_process() -> bool:
    """Rank 0, the one that prints, logs and writes checkpoints."""
    return rank() == 0


def share_of_examples(pair: tuple[Any, Any], r: int, world: int) -> tuple[Any, float] | None:
    """Rows ``r, r + world, ...`` of every tensor of a ``(data, target)`` pair (also inside
    nested data; ``None`` and other leaves are kept as they are) and their fraction of the
    rows, or ``None`` where the pair cannot be split by examples: no tensor, a 0-d tensor,
    tensors whose first dimensions differ, or fewer rows than processes."""
    leaves = [t for _, t in tensor_leaves(pair, "val")]
    if not leaves or any(t.ndim == 0 for t in leaves):
        return None
    n = leaves[0].shape[0]
    if n < world or any(t.shape[0] != n for t in leaves):
        return None
    share = map_tensors(pair, lambda t: t[r::world], lambda other: other)
    return share, len(range(r, n, world)) / n


def shard(tasks: Sequence[Task]) -> tuple[list[Task], float]:
    """This process's share of the tasks and the weight of each in the average.

    Several tasks are dealt out round-robin, each weighing ``1 / len(tasks)``. A single task
    (a hyperparameter problem) has its UL data split along the first dimension instead (every
    tensor of the UL pair, also inside nested data), each share weighing its fraction of the
    examples; this assumes, as usual, that the UL objective is a mean over examples.
    """
    if not active():
        return list(tasks), 1.0 / len(tasks)
    r, world = dist.get_rank(), dist.get_world_size()
    if len(tasks) > 1:
        return list(tasks[r::world]), 1.0 / len(tasks)
    train, val = tasks[0]
    share = share_of_examples(val, r, world)
    if share is None:
        raise ValueError(
            f"the UL batch cannot be split by examples over {world} processes: it needs "
            f"tensors with one row per example along their first dimension (the same number "
            f"of rows in all of them), and at least {world} rows."
        )
    return [(train, share[0])], share[1]


def all_reduce_sum(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Sum equally shaped tensors over all processes, in one flat buffer."""
    tensors = list(tensors)
    if not active():
        return tensors
    # complex tensors travel as their real and imaginary parts, in one real buffer
    parts = [torch.view_as_real(t) if t.is_complex() else t for t in tensors]
    flat = torch.cat([t.reshape(-1) for t in parts])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    out, offset = [], 0
    for t, given in zip(parts, tensors, strict=True):
        part = flat[offset : offset + t.numel()].view_as(t)
        # (a copy: a view of the buffer at an odd offset, after real tensors of odd size,
        # cannot be read as complex)
        out.append(torch.complex(part[..., 0], part[..., 1]) if given.is_complex() else part)
        offset += t.numel()
    return out


def broadcast_modules(*modules: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every process, so that all start equal."""
    if not active():
        return
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def init_from_environment(device: str | torch.device = "cpu") -> bool:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    Uses ``nccl`` for a CUDA ``device`` (each process on GPU ``LOCAL_RANK``) and ``gloo``
    otherwise. Returns whether a group with more than one process is active. Examples call it
    first, so that the same command runs alone or under ``torchrun --nproc_per_node N``.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or active():
        return active()
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return active()


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if active() else 1


def barrier() -> None:
    """Wait until every process gets here (nothing without a process group)."""
    if active():
        dist.barrier()


class PeerError(RuntimeError):
    """Another process raised an error during a UL step; this process stops with it, so that
    no process is left waiting in a collective for one that is gone."""
