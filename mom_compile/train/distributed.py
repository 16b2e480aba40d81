"""Data parallelism with FSDP2 under torchrun: one process per device, each block's weights (and
gradients and optimizer state) sharded across the processes and gathered block by block.

Without torchrun's environment (WORLD_SIZE) everything here is the identity: one process, no
process group. Under torchrun, CUDA devices talk through NCCL and CPUs through gloo.
"""
from __future__ import annotations

import datetime
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over all processes (the tensor itself in one process)."""
        if self.distributed:
            tensor = tensor.clone()
            dist.all_reduce(tensor)
        return tensor


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def init_world(device: str) -> World:
    """Join torchrun's process group when launched by it; `device` is "cuda", "cuda:N" or "cpu"
    (under torchrun, "cuda" means this process's LOCAL_RANK device)."""
    kind = torch.device(device).type
    if "WORLD_SIZE" not in os.environ:
        return World(0, 1, torch.device(device))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if kind == "cuda":
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    dist.init_process_group("nccl" if kind == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30))
    return World(dist.get_rank(), dist.get_world_size(), torch.device(device))


def close_world(world: World) -> None:
    if world.distributed:
        dist.destroy_process_group()


def shard_model(model: nn.Module, compile_blocks: bool) -> None:
    """fully_shard each block, then the root (embeddings, final norm, head). With compile_blocks,
    each block's forward is compiled first (fullgraph): FSDP's gather hooks then run between the
    compiled blocks, outside the graphs."""
    from torch.distributed.fsdp import fully_shard

    # The blocks return (hidden, router logits) where the router logits are a view of the
    # projection; FSDP warns that an in-place op on a returned view would skip its hooks. Nothing
    # modifies them in place (the load-balancing loss only reads them).
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    for block in model.model.layers:
        if compile_blocks:
            block.forward = torch.compile(block.forward, fullgraph=True, dynamic=False)
        fully_shard(block)
    fully_shard(model)


def full_parameters(model: nn.Module, world: World) -> dict[str, torch.Tensor] | None:
    """Every parameter whole, on the CPU, in process 0 (None in the others); a collective."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if isinstance(p, DTensor) else p
        if world.main:
            out[name] = full.detach().to("cpu", copy=True)
    return out if world.main else None
