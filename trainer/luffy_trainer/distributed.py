"""Process-group setup and the few collectives the trainer needs, for one process or N torchrun ranks.

Rank 0 drives rollouts, rewards, logging and progress; every rank holds a shard of the policy (FSDP2) and trains on
its share of each mini-batch. On one CPU process nothing here creates a process group.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

# torchrun reads its arguments from PET_* variables (as Kubeflow sets them); a process started some other way with
# only those set still finds its master.
PET_FALLBACKS = {"MASTER_ADDR": "PET_MASTER_ADDR", "MASTER_PORT": "PET_MASTER_PORT"}


@dataclass(frozen=True)
class World:
    """This process's place among the training ranks."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(timeout_s: float = 1800.0) -> World:
    """Join the torchrun process group when launched by torchrun (nccl on GPU, gloo on CPU); else a world of one.

    The long timeout lets ranks whose pods start late join the rendezvous instead of failing the early ones.
    """
    for name, fallback in PET_FALLBACKS.items():
        if name not in os.environ and fallback in os.environ:
            os.environ[name] = os.environ[fallback]
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        log.info("rank %d/%d joined the %s process group", rank, world_size, backend)
    return World(rank=rank, world_size=world_size, local_rank=local_rank)


def device_of(world: World) -> torch.device:
    return torch.device("cuda", world.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def shard_model(model: nn.Module, layers: list[nn.Module], world: World, param_dtype: torch.dtype | None) -> None:
    """FSDP2: each transformer layer is a unit, the root holds the rest (embeddings, final norm, output head).

    With `param_dtype` (bf16 on GPU) parameters are gathered in that dtype for compute while the sharded master
    copy and the gradient reduction stay in float32.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device_type = device_of(world).type
    if not dist.is_initialized():  # one GPU without torchrun: FSDP2's device mesh still needs a process group
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh(device_type, (world.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def broadcast_object(obj: Any, world: World) -> Any:
    """Rank 0's object on every rank."""
    if not world.distributed:
        return obj
    box = [obj if world.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(values: list[float], world: World, device: torch.device) -> list[float]:
    if not world.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(value: int, world: World, device: torch.device) -> int:
    if not world.distributed:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def full_parameters(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Full (unsharded) parameters one at a time, names without `prefix`; collective under FSDP2.

    Every rank must iterate to the end in the same order (each sharded parameter is all-gathered when reached), so
    at most one gathered parameter exists at a time beyond what the consumer keeps.
    """
    from torch.distributed.tensor import DTensor

    for name, param in model.named_parameters():
        tensor = param.detach()
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        yield name.removeprefix(prefix), tensor
