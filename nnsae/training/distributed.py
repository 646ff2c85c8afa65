"""Data-parallel training with `torch.distributed` (gloo on CPU, nccl on GPU), launched by torchrun.

    torchrun --nproc_per_node 2 my_train.py      # my_train.py calls nnsae.training.train(...) as usual

`train()` notices an initialised process group (or one torchrun describes through its environment variables, which
it then initialises) and:
- calls `store.shard(rank, world_size)`: the store must then serve this rank's own part of the data, still
  `batch_size_tokens` per step, so one step trains on `world_size · batch_size_tokens` tokens (the global batch,
  which `training_tokens`, the step count and the default lr are computed from);
- averages gradients over ranks before clipping, so every rank applies the same update to identical weights;
- sums dead-latent statistics, norm estimates and logged metrics over ranks; BatchTopK selects its
  `int(k·N_global)` latents over the global batch, and its threshold EMA uses the global minimum;
- writes files from rank 0 only (checkpoints gather every rank's store position to rank 0).

With equal shards this is the same computation as one process on the concatenated global batches (up to float
summation order; tested).
"""

from __future__ import annotations

import os
import pickle
from typing import Any, Iterable

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


class Comm:
    """The few collectives training needs, over the default process group."""

    def __init__(self) -> None:
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        backend = dist.get_backend()
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        out = tensor.detach().to(self.device).clone()
        dist.all_reduce(out, op=_OPS[op])
        return out.to(tensor.device)

    def all_gather_cat(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenation over ranks of 1-D tensors of possibly different lengths."""
        t = tensor.detach().to(self.device).reshape(-1)
        sizes = [torch.zeros(1, dtype=torch.long, device=self.device) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([t.numel()], dtype=torch.long, device=self.device))
        longest = int(max(s.item() for s in sizes))
        padded = torch.zeros(longest, dtype=t.dtype, device=self.device)
        padded[:t.numel()] = t
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:int(s.item())] for p, s in zip(parts, sizes)]).to(tensor.device)

    def average_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        params = [p for p in params if p.grad is not None]
        if not params:
            return
        flat = torch.cat([p.grad.reshape(-1).to(torch.float64 if p.dtype == torch.float64 else p.grad.dtype)
                          for p in params]).to(self.device)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world_size
        offset = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n

    def gather_objects(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj` on rank 0 (None elsewhere), through pickle over the process group."""
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        gathered = self.all_gather_cat(data)
        sizes = self.all_gather_cat(torch.tensor([data.numel()]))
        if not self.is_main:
            return None
        out, offset = [], 0
        for size in sizes.tolist():
            out.append(pickle.loads(gathered[offset:offset + size].numpy().tobytes()))
            offset += size
        return out

    def scatter_objects(self, objs: list[Any] | None) -> Any:
        """Rank r receives `objs[r]` from rank 0."""
        holder = [objs if self.is_main else None]
        dist.broadcast_object_list(holder, src=0)
        return holder[0][self.rank]

    def barrier(self) -> None:
        dist.barrier()


def current_comm() -> Comm | None:
    """A Comm for the current multi-process run, initialising the process group from torchrun's environment if
    needed; None in a single-process run."""
    if not dist.is_available():
        return None
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "MASTER_ADDR" not in os.environ:
            return None
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if dist.get_world_size() <= 1:
        return None
    return Comm()
