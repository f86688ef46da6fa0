"""Distributed-training helpers: process-group set-up from ``torchrun`` and feature gathering.

Contrastive losses need the embeddings of the *whole* global batch on every rank. As in
open_clip (``gather_features(..., gather_with_grad=True)``) the features are all-gathered with
:func:`torch.distributed.nn.functional.all_gather`, whose backward sums the incoming gradients
over ranks (a reduce-scatter). Every rank then computes the same full-batch loss ``L``; the
gradient that reaches a rank's local features is ``world_size * dL/d(local features)``, and
DDP's averaging of parameter gradients over ranks gives exactly the single-process gradient of
``L`` on the concatenated batch. Per-rank batches must all have the same size (use
``drop_last=True``): ``all_gather`` needs equal shapes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the only rank that logs and writes checkpoints)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


def rank_and_world_size() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when none is initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_distributed(*, backend: str | None = None, device: str | None = None) -> DistInfo:
    """Initialise ``torch.distributed`` from the ``torchrun`` environment, if there is one.

    Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (set by ``torchrun``); without them (a plain
    ``python -m training.pretrain``) nothing is initialised and a single-process
    :class:`DistInfo` is returned.

    Args:
        backend: ``"nccl"`` or ``"gloo"``; default ``nccl`` when CUDA is available, else ``gloo``.
        device: force a device (``"cpu"``, ``"cuda"``); default ``cuda:<LOCAL_RANK>`` when CUDA is
            available, else ``cpu``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid torchrun environment: RANK={rank}, WORLD_SIZE={world_size}")
    cuda = torch.cuda.is_available() and device != "cpu"
    if device is None:
        device = f"cuda:{local_rank}" if cuda else "cpu"
    if world_size == 1:
        return DistInfo(0, 1, 0, device)
    if backend is None:
        backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(torch.device(device))
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend)
    logger.info("initialised %s process group: rank %d of %d on %s", backend, rank, world_size, device)
    return DistInfo(rank, world_size, local_rank, device)


def cleanup_distributed() -> None:
    """Destroy the default process group if one was initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _check(rank: int, world_size: int) -> bool:
    """Validate an explicit (rank, world_size); True when a real gather is needed."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if world_size == 1:
        return False
    actual = rank_and_world_size()
    if actual != (rank, world_size):
        raise ValueError(
            f"rank/world_size ({rank}, {world_size}) do not match the initialised process group {actual}"
        )
    return True


def gather_with_grad(x: torch.Tensor, *, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0, keeping gradients flowing back to each rank.

    With ``world_size == 1`` this returns ``x`` unchanged (no process group needed). Otherwise
    the result is ``cat([x_rank0, x_rank1, ...])`` and its backward sums gradients over ranks
    (see the module docstring for why that matches single-process training under DDP).
    """
    if not _check(rank, world_size):
        return x
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(x.contiguous()), dim=0)


def gather_no_grad(x: torch.Tensor, *, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """Concatenate ``x`` (e.g. boolean masks, labels) from all ranks along dim 0, no gradient."""
    if not _check(rank, world_size):
        return x
    is_bool = x.dtype == torch.bool
    y = x.to(torch.uint8) if is_bool else x.contiguous()  # gloo has no bool all_gather
    parts = [torch.empty_like(y) for _ in range(world_size)]
    torch.distributed.all_gather(parts, y)
    out = torch.cat(parts, dim=0)
    return out.bool() if is_bool else out
