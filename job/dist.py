"""torch.distributed for the job: one process per GPU under torchrun (or N CPU ranks with gloo).

torchrun sets RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; a plain `python -m job`
is world 1 and never touches torch.distributed. The Trainer (accelerate) runs DDP over the process
group started here; rank 0 alone writes events, checkpoints' markers, the adapter and the manifest.
"""
from __future__ import annotations

import os
from typing import Any

from contracts.events import make


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def init() -> bool:
    """Start the process group once when launched by torchrun (nccl on CUDA, gloo on CPU)."""
    if world_size() <= 1:
        return False
    import torch
    import torch.distributed as td

    if not td.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank())
        td.init_process_group(backend=backend)
    return True


def barrier() -> None:
    if world_size() > 1:
        import torch.distributed as td

        if td.is_initialized():
            td.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (identity at world 1)."""
    if world_size() <= 1:
        return obj
    import torch.distributed as td

    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]


def agreed(flag: bool) -> bool:
    """Rank 0's `flag` on every rank. A decision taken from a local clock (a timed save, the deadline) must
    be the same on all ranks: ranks whose clocks disagree by one step would send one into a save's
    collectives while the others wait in the step's all-reduce, and NCCL hangs."""
    return bool(broadcast_object(bool(flag)))


def merge(share: list) -> list | None:
    """Rows scored in shares (None where another rank scored it) -> the full list on rank 0, row
    order kept; None on the other ranks. At world 1 the list itself."""
    if world_size() <= 1:
        return share
    import torch.distributed as td

    shares = [None] * world_size() if is_main() else None
    td.gather_object(share, shares, dst=0)  # every rank's share, in rank order, on rank 0
    if shares is None:
        return None
    merged = [next((s[i] for s in shares if s[i] is not None), None) for i in range(len(share))]
    missing = [i for i, v in enumerate(merged) if v is None]
    if missing:
        raise RuntimeError(f"evaluation shards left rows {missing[:5]} unscored")
    return merged


def destroy() -> None:
    if world_size() > 1:
        import torch.distributed as td

        if td.is_initialized():
            td.destroy_process_group()


class QuietEvents:
    """The EventWriter of ranks other than 0: events are built (and checked) but never written."""

    path = None

    def emit(self, event: str, **fields: Any) -> dict:
        return make(event, **fields)
