"""Several processes matching one synthetic set together (``torchrun``), and what they must agree on.

Every rank holds the same synthetic set, draws the same segments from the same generators and
applies the same update; a rank computes only its own share of the segments, and the gradient
sums are added across ranks with an all-reduce. Rank 0 alone writes (checkpoints, logs, metrics,
images). Collectives wait at most ``timeout_s``: a rank that stopped answering stops the others with
:class:`RanksLost` instead of a hang (torchrun itself ends the group when one of its processes exits).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist

from .errors import UsageError


class RanksLost(UsageError):
    """A collective failed: another rank died, or did not answer within the timeout."""


@dataclass(frozen=True)
class Ranks:
    """Where this process stands among the processes of one run (torchrun's environment)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this process writes the run's files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


SINGLE = Ranks()


def ranks_from_environment() -> Ranks:
    """torchrun's RANK / WORLD_SIZE / LOCAL_RANK; one process when they are not set."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1:
        return SINGLE
    return Ranks(int(os.environ.get("RANK", 0)), world, int(os.environ.get("LOCAL_RANK", 0)))


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def start_group(ranks: Ranks, device: torch.device, timeout_s: float) -> None:
    """Join torchrun's process group (NCCL on GPUs, gloo on the CPU); nothing for one process."""
    if not ranks.distributed or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device), timeout=datetime.timedelta(seconds=timeout_s))


def stop_group(ranks: Ranks) -> None:
    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()


def share_of(count: int, ranks: Ranks) -> range:
    """The contiguous block of ``count`` items (segments) that ``ranks.rank`` computes; ``count``
    must be a multiple of the world size (the caller checks it)."""
    if count % ranks.world:
        raise ValueError(f"{count} segments do not split evenly over {ranks.world} ranks")
    size = count // ranks.world
    return range(ranks.rank * size, (ranks.rank + 1) * size)


def _lost(what: str, ranks: Ranks, timeout_s: Optional[float], error: BaseException) -> RanksLost:
    waited = f" or did not answer within {timeout_s:g} s" if timeout_s else ""
    return RanksLost(f"rank {ranks.rank} of {ranks.world}: {what} failed, another rank stopped{waited} "
                     f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no detail'}). The "
                     f"first rank to fail printed the cause; fix it and rerun with --resume and the same --name: "
                     f"the run continues from its last checkpoint, on any number of processes.")


def sum_across(tensors: Sequence[torch.Tensor], ranks: Ranks, timeout_s: Optional[float] = None) -> None:
    """Replace each tensor by its sum over the ranks, in place (one all-reduce of one flat buffer)."""
    if not ranks.distributed or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    try:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    except (RuntimeError, dist.DistError) as error:
        raise _lost("adding the gradients", ranks, timeout_s, error) from None
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def share_from_rank0(value: Optional[dict], ranks: Ranks, timeout_s: Optional[float] = None) -> dict:
    """Rank 0's ``value`` on every rank (a small picklable dict: how its preparation went)."""
    if not ranks.distributed:
        return value
    message: List[Optional[dict]] = [value if ranks.main else None]
    try:
        dist.broadcast_object_list(message, src=0)
    except (RuntimeError, dist.DistError) as failure:
        raise _lost("waiting for rank 0 to prepare the run", ranks, timeout_s, failure) from None
    return message[0]


def wait_for_all(ranks: Ranks, what: str, timeout_s: Optional[float] = None) -> None:
    if not ranks.distributed:
        return
    try:
        dist.barrier()
    except (RuntimeError, dist.DistError) as error:
        raise _lost(what, ranks, timeout_s, error) from None


class Handshake:
    """What rank 0 tells the other processes once it has prepared the run (or failed to): the run's
    name, whether it resumed, whether it had already finished, or the error that stopped it, so that
    no process waits on a rank 0 that quit. For one process it does nothing. ``describe`` turns that
    error into the sentence the other ranks raise."""

    def __init__(self, ranks: Ranks, timeout_s: float, describe: Callable[[BaseException], str] = str):
        self.ranks, self.timeout_s, self.sent, self.describe = ranks, timeout_s, False, describe

    def send(self, **news) -> None:
        if not self.sent:
            self.sent = True
            share_from_rank0(news, self.ranks, self.timeout_s)

    def receive(self) -> dict:
        news = share_from_rank0(None, self.ranks, self.timeout_s)
        if news.get("error"):
            raise UsageError(f"rank {self.ranks.rank}: rank 0 stopped before the run began: {news['error']}")
        return news

    def __enter__(self) -> "Handshake":
        return self

    def __exit__(self, kind, error, trace) -> bool:
        if error is not None and not self.sent:
            self.send(error=self.describe(error) or type(error).__name__)
        return False
