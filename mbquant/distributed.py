"""Scale-out under ``torchrun``: one process per device, gloo on CPU, nccl on GPU.

:func:`from_env` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); outside torchrun
it returns a single-process :class:`Dist`, so the same code runs both ways. Only rank 0 writes files.

What runs where: QAT trains on every rank (DistributedDataParallel, a DistributedSampler per rank). PTQ and
``check`` shard evaluation: calibration, bias correction and lowering run on every rank (same seed, same images,
so the same ranges; the programs' digests are compared and a difference is an error), each rank evaluates every
``world``-th image, and the per-image outcomes are gathered so that every paired statistic is computed on all
images exactly as in one process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ConfigError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def all_sum(self, values: list[float]) -> list[float]:
        """Sum a few numbers over all ranks (metrics: loss sums, correct counts, sample counts)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def gather_rng(self) -> list[torch.Tensor]:
        """Every rank's CPU RNG state, in rank order (each rank draws its own dropout/augmentation)."""
        state = torch.get_rng_state()
        if not self.active:
            return [state]
        out = [torch.empty_like(state) for _ in range(self.world)]
        if self.backend == "nccl":
            moved = [o.to(self.device) for o in out]
            torch.distributed.all_gather(moved, state.to(self.device))
            return [m.cpu() for m in moved]
        torch.distributed.all_gather(out, state)
        return out

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable: per-image results, file digests), in rank order, on every rank."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def shard(self, n: int) -> list[int]:
        """This rank's share of ``range(n)`` for evaluation (every item counted exactly once)."""
        return list(range(self.rank, n, self.world))


def from_env() -> Dist:
    """Join the process group torchrun set up (or run alone when WORLD_SIZE is unset or 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    try:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"WORLD_SIZE={world} but RANK is missing or invalid; launch with "
                          f"`torchrun --nproc_per_node=N -m mbquant qat ...`") from exc
    use_cuda = torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend, rank=rank, world_size=world)
    return Dist(rank, world, local_rank, backend, device)


def shutdown(dist: Dist) -> None:
    if dist.active and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
