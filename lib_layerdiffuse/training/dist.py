"""Distributed helpers: torchrun-native, and a no-op in a plain single process.

``torchrun --nproc_per_node N -m lib_layerdiffuse.train ...`` sets RANK, WORLD_SIZE and
LOCAL_RANK (and the rendezvous variables); :func:`init` reads them and starts the process
group: NCCL when CUDA is present, gloo otherwise. Without those variables everything runs
in one process, unchanged. Gradients are averaged by DistributedDataParallel only.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else default


def init(device: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Start the process group from torchrun's environment (idempotent).

    device: "cpu", "cuda" or None (CUDA if available). With CUDA each process takes
    ``cuda:LOCAL_RANK``. A rank that waits longer than ``timeout_s`` in a collective (a peer
    died) raises instead of hanging; torchrun then stops the whole job.
    """
    rank, world, local = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group(
            backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s)
        )
    if torch_dist.is_initialized():
        rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
    return DistInfo(rank, world, dev)


def barrier() -> None:
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        torch_dist.barrier()


def cleanup() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode, no gradients: a frozen model is never wrapped in DDP and holds no .grad."""
    return module.eval().requires_grad_(False)


def wrap(module: nn.Module, info: DistInfo) -> nn.Module:
    """DDP around a trainable module when world_size > 1, the module itself otherwise."""
    if any(not p.requires_grad for p in module.parameters()):
        raise ValueError("wrap() is for trainable modules; frozen ones stay unwrapped (use freeze())")
    if not info.distributed:
        return module
    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(module, device_ids=ids)


def mean_across_ranks(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Average scalar logs over ranks (a collective: every rank must call it)."""
    if not info.distributed or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=info.device)
    torch_dist.all_reduce(t)
    t /= info.world_size
    return dict(zip(keys, t.tolist(), strict=True))


def any_across_ranks(flag: bool, info: DistInfo) -> bool:
    """Whether ``flag`` is true on any rank (a collective: every rank must call it)."""
    if not info.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return bool(t.item())
