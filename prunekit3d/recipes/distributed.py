"""Where a training process runs: its device and, under ``torchrun``, its rank in the process group.

``torchrun --nproc_per_node=N`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`start` then joins the group (gloo on CPU, nccl on CUDA) and puts each process on
its own GPU. Without them it is a single process and nothing is initialised.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Runtime", "all_sum", "resolve_device", "start", "stop"]


@dataclass
class Runtime:
    """This process's place: ``rank`` of ``world`` processes on ``device``; rank 0 alone writes files."""

    rank: int
    world: int
    device: torch.device
    owns_group: bool  # start() initialised the process group, so stop() tears it down

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def resolve_device(requested: str = "auto") -> torch.device:
    """The device a ``--device`` flag names: "auto" (CUDA if available, else the CPU), "cpu", "cuda", "cuda:N".

    Raises:
        ValueError: not a device name, or CUDA asked for where there is none.
    """
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ValueError(f"--device {requested!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {requested}: CUDA is not available on this machine; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {requested!r}: use auto, cpu, cuda or cuda:N")
    return device


def _device(requested: str, local_rank: int, world: int) -> torch.device:
    device = resolve_device(requested)
    if device.type == "cuda":
        if world > 1:
            device = torch.device("cuda", local_rank)  # torchrun: one GPU per process
        torch.cuda.set_device(device)
    return device


def start(requested_device: str = "auto") -> Runtime:
    """The current process's runtime; joins the ``torchrun`` process group if there is one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = _device(requested_device, int(os.environ.get("LOCAL_RANK", "0")), world)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owns = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    return Runtime(rank, world, device, owns)


def stop(runtime: Runtime) -> None:
    """Wait for every process, then leave the group if :func:`start` joined it."""
    if runtime.owns_group and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over all processes (``t`` itself in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t
