"""Distributed data parallel through PyTorch's own engine (torchrun), and nothing home-made.

`torchrun --nproc-per-node N -m cnnlab train ...` sets RANK / WORLD_SIZE / LOCAL_RANK; `setup`
joins the process group (gloo on CPU, NCCL on GPUs). Every rank trains on its shard, sums are
all-reduced, and only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cnnlab.core.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1  # processes on this machine, which share its cores

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def setup() -> DistInfo:
    """Join the process group when launched by torchrun; a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")),
                    int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            if info.local_world > torch.cuda.device_count():  # set_device would fail with "invalid device ordinal"
                raise UserError(f"torchrun started {info.local_world} processes on this machine, which has "
                                f"{torch.cuda.device_count()} GPUs; use --nproc-per-node {torch.cuda.device_count()} "
                                "(one process per GPU)")
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend)
    return info


def is_main_process() -> bool:
    """False in every process of a torchrun launch but rank 0 (which alone writes and prints)."""
    return int(os.environ.get("RANK", "0")) == 0


def device_for(info: DistInfo) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def data_parallel(model: torch.nn.Module, device: torch.device, info: DistInfo) -> torch.nn.Module:
    """`model` in DistributedDataParallel under torchrun (on a GPU, told its one device), else as it is."""
    if not info.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def all_sum(values: list[float], info: DistInfo, device: torch.device = torch.device("cpu")) -> list[float]:
    """Element-wise sum of `values` over all ranks (identity for one process)."""
    if not info.active:
        return values
    return all_sum_tensor(torch.tensor(values, dtype=torch.float64, device=device), info).tolist()


def all_sum_tensor(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """`t` summed over all ranks, in place on its device (identity for one process)."""
    if info.active:
        dist.all_reduce(t)
    return t


def broadcast(obj, info: DistInfo):
    """Rank 0's `obj` on every rank."""
    if not info.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.active:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.active and dist.is_initialized():
        dist.destroy_process_group()
