"""FP8 (e4m3) matmuls for the frozen base's linear layers (Hopper: torch._scaled_mm, row-wise scales).

With QLoRA the base weights are frozen, so each decoder linear does two matmuls a pass and no weight
gradient: the forward `y = x @ W^T` (twice with recompute) and the activation gradient `dx = dy @ W`.
Those are ~90% of a step's FLOPs. `enable_fp8(model)` swaps the forward of the frozen MLP projections
(gate/up/down, ~77% of the decoder's linear FLOPs) inside the decoder layers, and with
`attention=True` attention's q/o too (bnb's NF4 `Linear4bit`, or a frozen bf16 `nn.Linear` for
`method: lora`; k/v never: see ATTENTION), for one autograd op that runs both in fp8:

- forward: W is dequantized (NF4 -> bf16, as bnb's own matmul does every pass) and quantized to e4m3
  with one scale per output row; x with one scale per token; `_scaled_mm` accumulates in fp32 and
  writes bf16 (fast accumulation on, as torchao's row-wise recipe does for the output).
- backward: dy quantized per token (e4m3: row-wise scales leave it enough range, as torchao's
  row-wise recipe does), W^T quantized per input column, `dx = dy @ W` in fp8 with exact accumulation.
- nothing is saved for backward (the weight is re-read from the module; x is not needed, the base is
  frozen), so a layer that is not recomputed keeps less than bnb's matmul does.
Two switches pick another recipe (train.fp8_fast_accum: exact accumulation; train.fp8_backward: bf16 dx
from the dequantized W, as bnb does); docs/speed.md says what each measured.

The weights stay NF4 in memory: the fp8 copies are transient, one layer at a time. What changes is
the rounding of the matmul inputs (e4m3: 3 mantissa bits) on top of the NF4 weights; the bench's
20-step loss check against the plain bf16 stack is what says whether that is within noise.

Row-wise quantization is one Triton kernel on CUDA (a row read once: absmax, scale, cast); plain
torch ops elsewhere. Off CUDA the fp8 product is emulated in fp32 from the same e4m3 values and
scales (CPU tests check the wrapper; the device microbench checks `_scaled_mm` against it).
Only layers whose in/out widths are multiples of 16 are switched (`_scaled_mm`'s rule); the token
count is padded to a multiple of 16 when it is not one.
"""
from __future__ import annotations

import functools

import torch

from job.fused_lora import swap_forward
from job.model import causal_lm_of

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
_TRITON = None  # the Triton kernel, or False when Triton is not there


def available(device: torch.device | str) -> tuple[bool, str]:
    """(usable, why): fp8 matmuls need a CUDA device of compute capability >= 8.9 (Ada/Hopper)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, "CUDA only (fp8 tensor cores)"
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        return False, f"compute capability {cap[0]}.{cap[1]} has no fp8 tensor cores (needs 8.9+: L4, H100, H200)"
    if not hasattr(torch, "_scaled_mm"):
        return False, f"torch {torch.__version__} has no _scaled_mm"
    return True, f"e4m3 row-wise, torch {torch.__version__}"


# --- row-wise quantization ----------------------------------------------------------------------------

def quant_rows_torch(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) with t ~= q * scale row by row: q e4m3, scale fp32 of shape (rows, 1)."""
    amax = t.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12)
    scale = amax / E4M3_MAX
    q = (t.float() / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale


def _triton_kernel():
    global _TRITON
    if _TRITON is None:
        try:
            import triton
            import triton.language as tl

            @triton.jit
            def _quant_rows(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, BLOCK: tl.constexpr):
                row = tl.program_id(0).to(tl.int64)
                offs = tl.arange(0, BLOCK)
                mask = offs < K
                x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
                amax = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12)
                scale = amax / 448.0
                q = tl.clamp(x / scale, -448.0, 448.0)
                tl.store(q_ptr + row * stride_q + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
                tl.store(s_ptr + row, scale)

            _TRITON = (triton, _quant_rows)
        except Exception:  # noqa: BLE001 - no Triton (or no compiler): the torch ops do it
            _TRITON = False
    return _TRITON


def quant_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise e4m3 quantization of a 2-D tensor: one Triton pass on CUDA, torch ops elsewhere."""
    kern = _triton_kernel() if t.is_cuda else False
    rows, k = t.shape
    if not kern or k > 32768 or t.stride(-1) != 1:
        return quant_rows_torch(t)
    triton, fn = kern
    q = torch.empty((rows, k), device=t.device, dtype=E4M3)
    s = torch.empty((rows, 1), device=t.device, dtype=torch.float32)
    block = triton.next_power_of_2(k)
    fn[(rows,)](t, q, s, k, t.stride(0), q.stride(0), BLOCK=block, num_warps=16 if block >= 8192 else 8 if block >= 2048 else 4)
    return q, s


# --- the product ----------------------------------------------------------------------------------------

def scaled_mm(a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor, out_dtype: torch.dtype,
              fast_accum: bool) -> torch.Tensor:
    """(a * sa) @ (b * sb): a (M, K) e4m3 row-major, b (K, N) e4m3 column-major, sa (M, 1), sb (1, N)."""
    if a.is_cuda:
        return torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=out_dtype, use_fast_accum=fast_accum)
    return ((a.float() * sa) @ (b.float() * sb)).to(out_dtype)  # the same e4m3 values, fp32 arithmetic


def _pad16(t: torch.Tensor) -> torch.Tensor:
    extra = -t.shape[0] % 16
    return t if not extra else torch.cat([t, t.new_zeros((extra, t.shape[1]))])


def frozen_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The layer's weight as a dense (out, in) tensor: NF4 dequantized (bnb), or the weight itself."""
    w = layer.weight
    if type(w).__name__ == "Params4bit":
        import bitsandbytes.functional as bf

        return bf.dequantize_4bit(w.data, w.quant_state)
    return w


class _Fp8Linear(torch.autograd.Function):
    """y = x @ W^T + b with e4m3 inputs; dx = dy @ W likewise; W frozen (no weight gradient)."""

    @staticmethod
    def forward(ctx, x, layer, out_dtype, fast_accum=True, backward="fp8"):  # noqa: D401 - autograd API
        k = x.shape[-1]
        x2 = x.reshape(-1, k)
        m = x2.shape[0]
        xq, xs = quant_rows(_pad16(x2))
        wq, ws = quant_rows(frozen_weight(layer))
        y = scaled_mm(xq, wq.t(), xs, ws.t(), out_dtype, fast_accum=fast_accum)[:m]
        if layer.bias is not None:
            y = y + layer.bias.to(out_dtype)
        ctx.layer, ctx.shape, ctx.dx_in = layer, x.shape, backward
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, g):
        none = (None,) * 4
        if not ctx.needs_input_grad[0]:
            return (None, *none)
        layer = ctx.layer
        n = g.shape[-1]
        g2 = g.reshape(-1, n)
        if ctx.dx_in == "bf16":  # bnb's way: the dequantized weight, a plain matmul in the grad's dtype
            return ((g2 @ frozen_weight(layer).to(g.dtype)).view(ctx.shape), *none)
        m = g2.shape[0]
        gq, gs = quant_rows(_pad16(g2))
        wtq, wts = quant_rows(frozen_weight(layer).t().contiguous())  # (in, out): one scale per input column
        dx = scaled_mm(gq, wtq.t(), gs, wts.t(), g.dtype, fast_accum=False)[:m]
        return (dx.view(ctx.shape), *none)


BACKWARDS = ("fp8", "bf16")


def recipe(fast_accum: bool, backward: str, attention: bool = False) -> str:
    """The recipe in words: which projections, the forward's accumulation and where dx is computed."""
    return (f"{'/'.join(projections(attention))}; forward {'fast' if fast_accum else 'exact'} accumulation, "
            f"dx in {'bf16 (dequantized weight)' if backward == 'bf16' else 'fp8'}")


def _fp8_forward(self, x: torch.Tensor, *args, fast_accum: bool = True, backward: str = "fp8", **kwargs) -> torch.Tensor:
    dev = x.device.type
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    with torch.autocast(dev, enabled=False):
        return _Fp8Linear.apply(x.to(dt), self, dt, fast_accum, backward)


# Which projections run in fp8 (the measurements are in bench/RESULTS.md):
# - the MLP's, always: most of the gain, and its loss stays within the seed-to-seed noise of the plain stack;
# - attention's q/o only with train.fp8_attention: a little faster, but its loss leaves that noise;
# - never k/v (GQA: 5120 -> 1024 in the 14B): as fast as bnb's matmul there, so fp8 would only add rounding.
MLP = ("gate_proj", "up_proj", "down_proj")
ATTENTION = ("q_proj", "o_proj")
_EVERY = MLP + ATTENTION + ("k_proj", "v_proj")


def projections(attention: bool = False) -> tuple[str, ...]:
    """The projections switched to fp8: the MLP's, and attention's q/o with `attention`."""
    return ATTENTION + MLP if attention else MLP


def _frozen_linears(model: torch.nn.Module, names: tuple[str, ...] = MLP):
    """Frozen linear layers named in `names` inside the decoder layers (never the lm_head or embeddings)."""
    for block in causal_lm_of(model).model.layers:
        for qual, m in block.named_modules():
            w = getattr(m, "weight", None)
            if (type(m).__name__ in ("Linear4bit", "Linear") and not hasattr(m, "lora_A") and _named(qual, names)
                    and w is not None and not w.requires_grad and isinstance(m, torch.nn.Linear)
                    and not (m.in_features % 16 or m.out_features % 16)):
                yield m


def _named(qual: str, names: tuple[str, ...]) -> bool:
    """Whether a module path inside a decoder layer ("self_attn.q_proj", or peft's
    "self_attn.q_proj.base_layer") is one of the projections in `names`."""
    parts = qual.split(".")
    if parts and parts[-1] == "base_layer":
        parts = parts[:-1]
    return bool(parts) and parts[-1] in names


def enable_fp8(model: torch.nn.Module, enabled: bool = True, fast_accum: bool = True, backward: str = "fp8",
               names: tuple[str, ...] = MLP) -> int:
    """Switch the frozen decoder linears named in `names` (default: the MLP's; see projections()) to
    the fp8 forward (or every switched one back); returns how many.

    fast_accum: the forward's `_scaled_mm` uses Hopper's fast accumulation (False: exact, as dx's);
    backward: "fp8" (dx = dy @ W in e4m3) or "bf16" (dx from the dequantized weight, as bnb does)."""
    if backward not in BACKWARDS:
        raise ValueError(f"fp8 backward {backward!r} is not accepted ({' | '.join(BACKWARDS)})")
    fwd = functools.partial(_fp8_forward, fast_accum=bool(fast_accum), backward=backward)
    if not enabled:  # back: whatever was switched, whichever names it was switched with
        return swap_forward([m for m in _frozen_linears(model, _EVERY) if "forward" in m.__dict__], fwd, False)
    return swap_forward(_frozen_linears(model, names), fwd, True)
