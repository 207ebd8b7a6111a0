"""Data parallelism for ``torchrun --nproc_per_node N -m saga_train``.

Every rank holds the whole (frozen) MLLM. Trainable parameters start identical (broadcast from
rank 0); each rank embeds its share of the batch's classes, samples and replays its own pairs,
and the trainable gradients are averaged with one all-reduce per tensor before clipping and the
optimizer step, so parameters stay identical across ranks. Single process: every call is a no-op.
L_GRPO's token count and L_KL's rollout count are summed over ranks; each rank divides its terms by
count / world_size, so the gradient average divides the summed terms by the global count once.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); no-op without torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    return info


def world_size() -> int:
    """Processes of the default torch.distributed group (1 when it is not initialized)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def broadcast_parameters(params, info: DistInfo) -> None:
    if info.enabled:
        for p in params:
            dist.broadcast(p.data, src=0)


def average_gradients(params, info: DistInfo) -> None:
    """Mean of every trainable gradient over ranks (a missing gradient counts as zeros)."""
    if not info.enabled:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad.div_(info.world_size)


def all_sum(values: dict, info: DistInfo) -> dict:
    """Element-wise sum of a dict of numbers over ranks (for logging)."""
    if not info.enabled:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, t.tolist()))


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shard(items, info: DistInfo) -> list:
    """This rank's share of ``items`` (round robin)."""
    return list(items)[info.rank::info.world_size]
