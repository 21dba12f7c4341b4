"""A fused forward for peft's LoRA linear layers: the same function, less memory and traffic.

peft computes, for every LoRA layer (7 a decoder layer, 336 in the 14B):

    out = base(x).clone() + lora_B(lora_A(dropout(x))) * scaling

which writes three more full-width tensors (the clone, the scaled branch, the sum) and keeps a
dropout copy of x and its mask alive for backward: with dropout 0.05 that is about half of a
decoder layer's saved activations. `fuse_lora(model)` swaps each layer's forward for one autograd
Function that computes

    out = addmm(base(x), dropout(x) @ A^T, B^T, alpha=scaling)

and saves only x (which the layer's other LoRA branches save too) and the rank-r activation
`dropout(x) @ A^T`. Backward draws the dropout mask again from the RNG state it was first drawn
with (as activation checkpointing does), so the gradient is the one peft's forward gives; with
gradient checkpointing the recompute restores that state first, so masks agree there too.

Only the plain case is fused: one active adapter, not merged, no DoRA or other variant, no
per-row `adapter_names`. Anything else runs peft's own forward unchanged.
"""
from __future__ import annotations

import contextlib
import types

import torch


class _LoraBranch(torch.autograd.Function):
    """y = base_out + scaling * dropout(x) @ a.T @ b.T, with the mask regenerated in backward."""

    @staticmethod
    def forward(ctx, x, base_out, a, b, p: float, scaling: float):  # noqa: D401 - autograd API
        x2 = x.reshape(-1, x.shape[-1])
        ctx.p, ctx.scaling = p, scaling
        ctx.rng = (torch.cuda.get_rng_state(x.device) if x.is_cuda else torch.get_rng_state()) if p > 0 else None
        xd = torch.ops.aten.native_dropout(x2, p, True)[0] if p > 0 else x2
        h = xd @ a.t()
        out = torch.addmm(base_out.reshape(-1, b.shape[0]), h, b.t(), alpha=scaling)
        ctx.save_for_backward(x, h, a, b)
        return out.view(base_out.shape)

    @staticmethod
    def backward(ctx, g):
        x, h, a, b = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        s, p = ctx.scaling, ctx.p
        need_x, _, need_a, need_b = ctx.needs_input_grad[:4]
        gb = torch.mm(g2.t(), h).mul_(s) if need_b else None
        ga = gx = None
        if need_a or need_x:
            gh = torch.mm(g2, b).mul_(s)
            x2 = x.reshape(-1, x.shape[-1])
            xd, mask = x2, None
            if p > 0:
                with _rng_restored(x.device, ctx.rng):
                    xd, mask = torch.ops.aten.native_dropout(x2, p, True)
            ga = torch.mm(gh.t(), xd) if need_a else None
            if need_x:
                gx = torch.mm(gh, a)
                if mask is not None:
                    gx = torch.ops.aten.native_dropout_backward(gx, mask, 1.0 / (1.0 - p))
                gx = gx.view(x.shape)
        return gx, g, ga, gb, None, None


@contextlib.contextmanager
def _rng_restored(device: torch.device, state: torch.Tensor):
    """Draw with `state`, then put the generator back where it was."""
    if device.type == "cuda":
        with torch.random.fork_rng(devices=[device], device_type="cuda"):
            torch.cuda.set_rng_state(state, device)
            yield
    else:
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(state)
            yield


def _plain_adapter(layer, args, kwargs) -> str | None:
    """The one active vanilla adapter when the fused path applies, else None (peft's own forward)."""
    if args or kwargs or layer.disable_adapters or layer.merged:
        return None
    active = [n for n in layer.active_adapters if n in layer.lora_A]
    if len(active) != 1 or active[0] in getattr(layer, "lora_variant", {}):
        return None
    return active[0]


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    name = _plain_adapter(self, args, kwargs)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    base_out = self.base_layer(x)
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    drop = self.lora_dropout[name]
    p = float(drop.p) if isinstance(drop, torch.nn.Dropout) and drop.training else 0.0
    dt = base_out.dtype  # the compute dtype (bf16 under autocast / from the 4-bit layer)
    with torch.autocast(x.device.type, enabled=False):
        return _LoraBranch.apply(x.to(dt), base_out, a.to(dt), b.to(dt), p, float(self.scaling[name]))


def swap_forward(modules, forward, enabled: bool = True) -> int:
    """Bind `forward` as each module's own forward (enabled) or drop that binding so the class's
    forward is used again; returns how many modules."""
    modules = list(modules)
    for m in modules:
        if enabled:
            m.forward = types.MethodType(forward, m)
        else:
            m.__dict__.pop("forward", None)
    return len(modules)


def fuse_lora(model: torch.nn.Module, enabled: bool = True) -> int:
    """Use the fused forward on every peft LoRA Linear / Linear4bit (or undo it); returns the count."""
    return swap_forward((m for m in model.modules() if type(m).__name__ in ("Linear", "Linear4bit")
                         and hasattr(m, "lora_A") and hasattr(m, "base_layer")), _fused_forward, enabled)
