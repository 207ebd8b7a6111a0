"""Multi-GPU training: ``torchrun --nproc_per_node N -m saga_train`` (and ``--nnodes`` for several machines).

What each rank holds and does (single process: every call here is a no-op and the step is unchanged):

* Trainable weights (vision tower, pooler, proxies) are replicated: identical at the start
  (``broadcast_parameters``) and kept identical by averaging their gradients (``GradientSync``) before
  the clip and the optimizer step, which every rank takes.
* Phase A: each rank embeds a contiguous slice of the step's batch (``batch_slice``: 8 images over 3
  ranks -> 3/3/2, so a class may straddle ranks) and ``gather_rows`` all-gathers the embeddings and
  labels, so L_DML is the loss of the WHOLE batch on every rank, negatives and proxies included.
  Scaling: every rank computes the same global loss L. The gathered rows of other ranks are constants;
  this rank's own rows are the tensor it embedded, and a hook multiplies the gradient flowing back into
  them by ``world_size``. Rank r's tower gradient is then ``world * dL/dtheta|_(rows of r)``, and the
  average over ranks is ``sum_r dL/dtheta|_(rows of r) = dL/dtheta``, the single-process gradient.
  Proxies are replicated and used by the unscaled loss: every rank gets the full ``dL/dproxies``, whose
  average is itself. (It is the arithmetic of ``torch.distributed.nn.functional.all_gather``, whose
  backward SUMS the world's identical copies; the hook saves that backward collective.)
* Phases B and C: the step's pairs are drawn from a seed shared by all ranks and split over ranks; each
  completion samples from its own generator (``rollout.sample_groups(seeds=...)``), so the groups
  sampled, and the K kept, do not depend on the world size (train.phase_b). L_GRPO's token count and
  L_KL's rollout count are summed over ranks and each rank divides its terms by count / world_size
  (TRL's ``num_items_in_batch``), so the average of the gradients divides the summed terms by the
  global count once.
* ``--shard-llm`` (``shard_language_model``): the frozen LLM's decoder layers are sharded with FSDP2
  (``fully_shard``, dim-0 shards, each layer all-gathered for its forward and again for its backward,
  which the gradients INTO the tower need; the layers have no gradients of their own). The token
  embedding, final norm and LM head stay replicated (the replay reads ``lm_head.weight`` and calls
  ``embed_tokens`` outside the text model's forward). Every forward of a sharded layer is a collective,
  so in this mode the ranks run the LLM in lockstep: ``generate(synced_gpus=True)``, one generate call
  per draw on every rank, and the same replay passes (``replay.replay_plan`` in lockstep).

Why the gradients are synchronized by ``GradientSync`` (flattened buckets, one all-reduce each, after
the last backward of the step) and not by DDP: a SAGA step runs a variable number of backward calls per
rank (phase A one; phase C one per completion micro-batch and one per shared prefix, per contributing
group, so a rank without a contributing group runs none), and phase C's graphs reach only part of the
trainable weights (the pooler through L_KL, not the proxies). DDP ties its collectives to backward
calls: it would need ``no_sync`` around all of them but a last one that every rank runs over every
parameter, which a rank without a group does not have, plus ``find_unused_parameters``. Here the
collectives run once per step, after every rank's last backward, whatever each rank did: one all-reduce
of "which parameters have a gradient on some rank", then the same buckets in the same order on every
rank, a gradient missing on a rank counting as zeros, so no rank can hang. What DDP would add,
overlapping the all-reduce with the last backward, is small in a step dominated by generation; the
buckets are launched asynchronously back to back.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

BUCKET_BYTES = 25 * 2**20  # DDP's default bucket_cap_mb


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
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():  # CUDA: nccl for the tensors on GPUs, gloo for the few counts kept on the CPU
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo")
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


class GradientSync:
    """Mean over ranks of every trainable gradient, in flattened buckets.

    First one small all-reduce tells every rank which parameters have a gradient on SOME rank; the others
    keep ``grad = None`` (AdamW then skips them, as one process would). The rest are grouped, in order, into
    buckets of one device and dtype of at most ``bucket_bytes``; each bucket is flattened into one buffer
    (a missing gradient as zeros), its all-reduce launched asynchronously, and the gradients become views of
    the reduced buffer (no copy back; the old gradient tensors are freed bucket by bucket, so the transient
    memory is one bucket)."""

    def __init__(self, params, info: DistInfo, bucket_bytes: int = BUCKET_BYTES):
        self.params, self.info, self.bucket_bytes = list(params), info, bucket_bytes

    def buckets(self, params) -> list:
        by_kind, out = {}, []
        for p in params:
            by_kind.setdefault((p.device, p.dtype), []).append(p)
        for group in by_kind.values():
            bucket, size = [], 0
            for p in group:
                if bucket and size + p.numel() * p.element_size() > self.bucket_bytes:
                    out.append(bucket)
                    bucket, size = [], 0
                bucket.append(p)
                size += p.numel() * p.element_size()
            out.append(bucket)
        return out

    def __call__(self) -> None:
        if not self.info.enabled:
            return
        present = all_max([int(p.grad is not None) for p in self.params], self.info)
        pending = []
        for bucket in self.buckets([p for p, has in zip(self.params, present) if has]):
            flat = _flatten_dense_tensors([p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket])
            for p, view in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                p.grad = view
            pending.append((flat, dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True)))
        for flat, work in pending:
            work.wait()
            flat.div_(self.info.world_size)


def batch_slice(size: int, info: DistInfo) -> slice:
    """This rank's contiguous share of ``size`` items: near-equal, the first ``size % world`` ranks one more."""
    base, extra = divmod(size, info.world_size)
    start = info.rank * base + min(info.rank, extra)
    return slice(start, start + base + (info.rank < extra))


def gather_rows(rows: torch.Tensor, labels: torch.Tensor, info: DistInfo):
    """``(rows, labels)`` of all ranks concatenated in rank order (any number of rows per rank, 0 included).

    Other ranks' rows arrive as constants; this rank's rows are ``rows`` itself, whose gradient is
    multiplied by the world size (see the module docstring: with every rank computing the same loss on
    the gathered rows, gradient averaging then gives the single-process gradient).
    """
    if not info.enabled:
        return rows, labels
    sizes = [torch.zeros(1, dtype=torch.long, device=rows.device) for _ in range(info.world_size)]
    dist.all_gather(sizes, torch.tensor([rows.shape[0]], device=rows.device))
    sizes = [int(s) for s in sizes]
    longest = max(sizes)

    def padded(t):
        return torch.cat([t.detach(), t.new_zeros((longest - t.shape[0], *t.shape[1:]))])

    parts = []
    for local in (rows, labels):
        out = [torch.empty_like(padded(local)) for _ in range(info.world_size)]
        dist.all_gather(out, padded(local).contiguous())
        parts.append([t[:n] for t, n in zip(out, sizes)])
    if rows.requires_grad:
        rows.register_hook(lambda grad: grad * info.world_size)
    parts[0][info.rank] = rows
    parts[1][info.rank] = labels
    return torch.cat(parts[0]), torch.cat(parts[1])


def all_sum(values: dict, info: DistInfo) -> dict:
    """Element-wise sum of a dict of numbers over ranks."""
    if not info.enabled:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, t.tolist()))


def all_max(values: list, info: DistInfo) -> list:
    """Element-wise maximum of a list of ints over ranks (every rank passes the same length)."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


# ------------------------------------------------------------------------------------------ --shard-llm
def shard_language_model(model, device: torch.device) -> None:
    """FSDP2 over the frozen LLM's decoder layers (one ``fully_shard`` group per layer; the text model
    is the root, its embedding and final norm left replicated as ``ignored_params``). A layer's
    parameters are all-gathered before its forward and freed after it (and again for its backward),
    so a rank holds 1/world of the decoder weights plus one layer at a time."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    lm = model.model.language_model
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in lm.layers:
        fully_shard(layer, mesh=mesh)
    in_layers = {id(p) for p in lm.layers.parameters()}
    fully_shard(lm, mesh=mesh, ignored_params={p for p in lm.parameters() if id(p) not in in_layers})


def llm_parameter_bytes(model) -> dict:
    """Bytes of LLM parameters this rank holds: ``decoder_layers`` (its shards under ``--shard-llm``),
    ``replicated`` (embedding, final norm, LM head) and ``decoder_layers_total`` (unsharded size)."""
    lm = model.model.language_model

    def local(p):
        return p.to_local() if hasattr(p, "to_local") else p

    layers = list(lm.layers.parameters())
    in_layers = {id(p) for p in layers}
    others = {id(p): p for p in [*lm.parameters(), *model.lm_head.parameters()] if id(p) not in in_layers}
    return {"decoder_layers": sum(local(p).numel() * p.element_size() for p in layers),
            "replicated": sum(p.numel() * p.element_size() for p in others.values()),
            "decoder_layers_total": sum(p.numel() * p.element_size() for p in layers)}
