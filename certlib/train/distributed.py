"""Data-parallel training across processes launched by ``torchrun``.

No launcher of our own: ``torchrun --nproc_per_node=N -m certlib.cli train ...``
sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT and this module
joins the process group from those variables (``env://``): NCCL on CUDA, gloo
on CPU.  Without those variables (or with WORLD_SIZE=1) everything here is a
no-op and the run is a plain single process.

What the trainer does with it (see loop.py):
  * the GLOBAL batch of every step is split across ranks (rank r takes
    positions r, r+N, r+2N, ... of the step's global batch, the interleaving of
    torch's DistributedSampler, without its padding);
  * gradients are averaged by DistributedDataParallel; each rank's loss is its
    per-sample SUM times N / (global batch size), so the average is the exact
    global mean even for a last, partial batch;
  * the power-iteration vectors are broadcast from rank 0 after every update,
    so every rank trains with the same Lipschitz estimate;
  * only rank 0 logs, checkpoints, exports and verifies.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False   # this process initialised the group (and destroys it)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name, "")
    try:
        return int(v) if v != "" else default
    except ValueError:
        raise RuntimeError(f"environment variable {name}={v!r} is not an integer") from None


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``: ``cuda:LOCAL_RANK`` when CUDA is available, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            from certlib.train.config import ConfigError

            raise ConfigError(f"device {name!r} asked for, but this torch build sees no CUDA GPU")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(dev)
    return dev


def setup(device: str) -> tuple[DistInfo, torch.device]:
    """Join the torchrun process group if there is one; pick this rank's device."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", 0)
    if world <= 1:
        return DistInfo(), pick_device(device, 0)
    dev = pick_device(device, local)
    info = DistInfo(rank, world, local)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://", world_size=world, rank=rank)
        info.owns_group = True
    return info, dev


def cleanup(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """In-place sum over ranks (no-op on one process); returns ``t``."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_(tensors: list[torch.Tensor], info: DistInfo, src: int = 0) -> None:
    """Overwrite ``tensors`` on every rank with rank ``src``'s values (one
    coalesced broadcast)."""
    if not info.enabled or not tensors:
        return
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    dist.broadcast(flat, src=src)
    off = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel()
            t.copy_(flat[off:off + n].view_as(t))
            off += n


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
