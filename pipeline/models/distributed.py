"""Training under ``torchrun``: the process group, this process's place in it, and the per-step reduction.

Under ``torchrun --nproc_per_node N`` (``WORLD_SIZE`` > 1) both networks are wrapped in
DistributedDataParallel (gloo on CPU, nccl on CUDA); rank 0 alone logs and writes files. Without
``torchrun`` the same code runs as a world of one and no process group is created.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from pipeline.core.errors import CheckFailed

__all__ = ["DistContext", "init_distributed", "shutdown_distributed", "wrap_ddp", "reduce_stats", "check_same_weights"]


@dataclass(frozen=True)
class DistContext:
    """This process's place in the training job.

    Attributes:
        world_size: processes training together (1 without ``torchrun``).
        rank: this process's global rank.
        local_rank: its rank on this machine (picks the CUDA device).
        owns_group: True when :func:`init_distributed` created the process group (and so destroys it).
    """

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        """More than one process: wrap in DDP, reduce statistics, compare weights at the end."""
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that logs and writes files."""
        return self.rank == 0


def init_distributed(device_name: str) -> DistContext:
    """Join (or create) the process group ``torchrun`` describes in the environment.

    Args:
        device_name: the ``model.device`` setting; ``cpu`` (or no CUDA) selects the gloo backend.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    owns = False
    if not dist.is_initialized():
        use_cuda = device_name != "cpu" and torch.cuda.is_available()
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        owns = True
    return DistContext(
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        owns_group=owns,
    )


def shutdown_distributed(ddp: DistContext) -> None:
    """Destroy the process group if :func:`init_distributed` created it (a caller's group is left alone)."""
    if ddp.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(module: nn.Module, device: torch.device, ddp: DistContext) -> nn.Module:
    """``module`` wrapped in DistributedDataParallel when training on several processes, else itself."""
    if not ddp.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def reduce_stats(stats: dict[str, torch.Tensor], flags: dict[str, bool], ddp: DistContext) -> dict[str, float]:
    """Average the step's statistics over ranks and agree on stopping (one small all-reduce).

    Args:
        stats: the step's statistics (0-d tensors), averaged over ranks.
        flags: reasons to stop (time budget spent, Ctrl-C seen), summed over ranks so that every
            rank stops at the same step when any rank raised one.
        ddp: the process group.

    Returns:
        The averaged statistics as floats, and each flag as the number of ranks that raised it.
    """
    keys, names = list(stats), list(flags)
    device = stats[keys[0]].device
    values = torch.stack([stats[key].float() for key in keys] + [torch.tensor(float(flags[name]), device=device) for name in names])
    if ddp.enabled:
        dist.all_reduce(values)
        values[: len(keys)] /= ddp.world_size
    numbers = values.cpu().tolist()
    return {**dict(zip(keys, numbers[: len(keys)])), **dict(zip(names, numbers[len(keys) :]))}


def check_same_weights(digest: str, ddp: DistContext) -> None:
    """Refuse to finish when the ranks' final weights differ (DDP keeps them equal; a difference is a bug).

    Raises:
        CheckFailed: two ranks hold different weights.
    """
    if not ddp.enabled:
        return
    digests: list[str | None] = [None] * ddp.world_size
    dist.all_gather_object(digests, digest)
    if len(set(digests)) != 1:
        raise CheckFailed("DDP ranks ended with different weights; this is a bug, please report it.")
