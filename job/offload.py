"""Gradient checkpointing whose saved layer inputs wait in host memory instead of on the GPU.

With non-reentrant checkpointing a decoder layer keeps only its input for backward (a
[tokens, hidden] bf16 tensor: ~0.2 GiB a layer at micro-batch 64, ~9 GiB for the 14B's 48 layers).
`offloaded_checkpoint` saves that input through saved-tensor hooks that copy it to pinned host
memory on a side CUDA stream (the compute stream does not wait), and free the GPU copy once the
copy is done. In backward, when a layer's input is unpacked for its recompute, the copy back of
the input saved just before it (the next one backward needs) starts on the side stream, so it
overlaps this layer's recompute and backward. The memory this frees pays for leaving more layers
un-checkpointed (each one not recomputed saves ~1/48 of the recompute).

Only CUDA tensors of at least `min_bytes` move; small ones (position ids, rotary tables) stay put.
`copy_cpu=True` makes CPU tensors take the same road with plain copies, so the tests can run the
bookkeeping without a GPU (a CPU run has nothing to gain from it).
"""
from __future__ import annotations

import weakref
from functools import partial

import torch
from torch.utils.checkpoint import checkpoint


class _Record:
    __slots__ = ("host", "device", "copied", "prev", "gpu", "ready", "used", "__weakref__")

    def __init__(self, host, device, copied, prev):
        self.host, self.device, self.copied, self.prev = host, device, copied, prev
        self.gpu = self.ready = None
        self.used = False


class HostOffload:
    """pack/unpack hooks for torch.autograd.graph.saved_tensors_hooks (see the module's doc)."""

    def __init__(self, min_bytes: int = 1 << 20, copy_cpu: bool = False):
        self.min_bytes, self.copy_cpu = min_bytes, copy_cpu
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._last = None
        self.stats = {"packed": 0, "prefetched": 0, "bytes": 0}

    def _side(self, device: torch.device):
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def pack(self, t: torch.Tensor):
        nbytes = t.numel() * t.element_size()
        if nbytes < self.min_bytes or not (t.is_cuda or (self.copy_cpu and t.device.type == "cpu")):
            return t
        if t.is_cuda:
            side = self._side(t.device)
            side.wait_stream(torch.cuda.current_stream(t.device))
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            with torch.cuda.stream(side):
                host.copy_(t, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(side)
            t.record_stream(side)  # its GPU memory is reused only after the copy out
        else:
            host, copied = t.detach().clone(), None
        rec = _Record(host, t.device, copied, self._last)
        self._last = weakref.ref(rec)
        self.stats["packed"] += 1
        self.stats["bytes"] += nbytes
        return rec

    def unpack(self, rec):
        if not isinstance(rec, _Record):
            return rec
        out = self._take(rec)
        prev = rec.prev() if rec.prev is not None else None
        if prev is not None and not prev.used and prev.gpu is None:
            self._prefetch(prev)
        return out

    def _take(self, rec: _Record) -> torch.Tensor:
        rec.used = True
        if rec.gpu is not None:
            out, rec.gpu = rec.gpu, None
            if out.is_cuda:
                cur = torch.cuda.current_stream(rec.device)
                cur.wait_event(rec.ready)
                out.record_stream(cur)
            return out
        if rec.device.type == "cuda":
            torch.cuda.current_stream(rec.device).wait_event(rec.copied)
            return rec.host.to(rec.device, non_blocking=True)
        return rec.host.clone()

    def _prefetch(self, rec: _Record) -> None:
        self.stats["prefetched"] += 1
        if rec.device.type != "cuda":
            rec.gpu = rec.host.clone()
            return
        side = self._side(rec.device)
        with torch.cuda.stream(side):
            side.wait_event(rec.copied)
            rec.gpu = rec.host.to(rec.device, non_blocking=True)
            rec.ready = torch.cuda.Event()
            rec.ready.record(side)


def offloaded_checkpoint(fn, *args, offload: HostOffload, **kwargs):
    """torch.utils.checkpoint (non-reentrant) with the checkpoint's inputs saved through `offload`.

    The hooks wrap only the checkpoint call: the tensors the layer saves while it runs go through
    the checkpoint's own (inner) hooks and are recomputed; only its inputs reach `offload`.
    """
    kwargs.setdefault("use_reentrant", False)
    with torch.autograd.graph.saved_tensors_hooks(offload.pack, offload.unpack):
        return checkpoint(fn, *args, **kwargs)


def install(blocks, offload: HostOffload | None = None) -> HostOffload:
    """Make each checkpointed decoder layer in `blocks` save its input through host memory."""
    offload = offload or HostOffload()
    for block in blocks:
        block._gradient_checkpointing_func = partial(offloaded_checkpoint, offload=offload)
    return offload
