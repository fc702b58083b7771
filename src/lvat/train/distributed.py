"""Data-parallel training on torch.distributed: `torchrun --nproc_per_node N -m lvat train ...`.

The contract:

- Batch sizes in the config are GLOBAL: each of the N ranks takes batch / N (must divide).
- Every rank builds identical weights (seeded, then broadcast from rank 0) and uses the same
  labeled split (drawn once on rank 0, broadcast; rank 0 writes split.json).
- Each rank draws its own batches and its own perturbation noise and dropout masks: the batch
  stream and torch's global generator are seeded with `rank_seed(seed, rank)`; rank 0 keeps the
  single-process seed, so a 1-process run is exactly the ordinary run.
- After `loss.backward()` the gradients are averaged with one `all_reduce` over a flat buffer
  (`GradSync`), instead of DistributedDataParallel: VAT/LVAT run forward passes under
  `torch.autograd.grad` w.r.t. the perturbation before the single backward, which DDP's reducer
  hooks are not built for. BatchNorm running statistics ride in the same buffer and are
  averaged too, so all ranks hold identical weights and buffers at every step. Batch statistics
  inside a step are per rank (B / N images), as with DDP without SyncBatchNorm.
- Only rank 0 writes files and prints. Metrics are averaged over ranks when logged.
- Resume restores each rank's batch stream and generator exactly when N is unchanged; with a
  different N it is approximate: every rank starts a fresh stream from (seed + step, rank).

Backend: nccl on CUDA (rank r uses cuda:LOCAL_RANK), gloo on CPU.
"""

from __future__ import annotations

import atexit
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lvat.errors import ConfigError
from lvat.train.setup import resolve_device

# Rank r seeds with (seed + r * 0x9E3779B9) mod 2^32. torch's CPU generator keeps only the low
# 32 bits of a seed, so the stride must act there; the golden-ratio constant spreads ranks far
# from the small seeds other runs use.
RANK_SEED_STRIDE = 0x9E3779B9


@dataclass
class World:
    """This process's place in the job; a single process is rank 0 of 1."""

    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (pickled); identity for a single process."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        """Wait for every rank (e.g. until rank 0 has written the checkpoint)."""
        if self.size > 1:
            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def mean(self, t: Tensor) -> Tensor:
        """Element-wise mean of `t` over ranks (a new tensor)."""
        if self.size == 1:
            return t
        t = t.clone()
        dist.all_reduce(t)
        return t / self.size


def rank_seed(seed: int, rank: int) -> int:
    """Seed of rank `rank`'s batch stream and global generator; rank 0 keeps `seed`."""
    return seed if rank == 0 else (seed + rank * RANK_SEED_STRIDE) % 2**32


def start(device_name: str) -> World:
    """Join the job torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT), or return a single-process world on `device_name`."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if size <= 1:
        return World(device=device)
    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # Once per process, left at exit: a torchrun worker cannot re-create its default group,
        # and `train(stop_at=...)` then `train(resume=True)` in one process must both work.
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=size
        )
        atexit.register(leave, False)
    return World(dist.get_rank(), dist.get_world_size(), device)


def leave(together: bool = True) -> None:
    """Leave the process group. `together` waits for every rank first: a rank that tears gloo
    down while its peer still runs (rank 0 writes results after the last collective) can make
    the peer abort at exit. At exit after an error there is no barrier (a peer may be gone)."""
    if dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()


def finish_worker() -> None:
    """End a torchrun worker after a clean run: leave the group together, then exit without
    interpreter teardown, where gloo's threads sometimes abort a finished process ("terminate
    called without an active exception"). A no-op outside torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    leave()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def local_batch(global_batch: int, world: World, key: str) -> int:
    """This rank's share of a global batch size."""
    if global_batch % world.size:
        raise ConfigError(
            f"{key} = {global_batch} is the global batch over {world.size} processes and must "
            f"be divisible by it"
        )
    return global_batch // world.size


def broadcast_module(model: nn.Module, world: World) -> None:
    """Copy rank 0's parameters and buffers to every rank (identical start, whatever the RNG)."""
    if world.size == 1:
        return
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)


def _bn_running_stats(model: nn.Module) -> list[Tensor]:
    from torch.nn.modules.batchnorm import _BatchNorm

    out = []
    for m in model.modules():
        if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None:
            out += [m.running_mean, m.running_var]
    return out


class GradSync:
    """Average gradients and BatchNorm running statistics over ranks: one all_reduce per dtype.

    Called between `loss.backward()` and `optimizer.step()`. A parameter without a gradient on
    this rank contributes zeros (and receives the average), so every rank sends equal buffers.
    Running means average to exactly the running mean of the global batch (it is linear);
    running variances to the mean of per-rank variances (between-rank spread of the means is
    left out, as with DDP).
    """

    def __init__(self, model: nn.Module, world: World) -> None:
        self.world = world
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.buffers = _bn_running_stats(model)

    def __call__(self) -> None:
        if self.world.size == 1:
            return
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        tensors = [p.grad for p in self.params] + self.buffers
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.all_reduce(flat)
            flat /= self.world.size
            for t, piece in zip(group, flat.split([t.numel() for t in group]), strict=True):
                t.copy_(piece.view_as(t))


def rank_states(world: World, batches: dict, rng: dict) -> dict[str, Any]:
    """Checkpoint entries for every rank's batch stream and generators (call on every rank)."""
    if world.size == 1:
        return {}
    return {"world_size": world.size, "ranks": world.gather({"batches": batches, "rng": rng})}


def own_state(state: dict[str, Any], world: World) -> dict[str, Any] | None:
    """This rank's {"batches", "rng"} from a checkpoint, or None when it cannot be exact (the
    number of processes changed): the caller then starts a fresh stream."""
    saved = int(state.get("world_size", 1))
    if saved != world.size:
        return None
    if world.size == 1:
        return {"batches": state["batches"], "rng": state["rng"]}
    return state["ranks"][world.rank]
