"""Speed levers of the train path: padding-free packing, answer-only loss, fused kernels, checkpointing.

What each lever does (bench/train_throughput.py measures each on the 14B architecture):
- Packing: a micro-batch's sequences are packed first-fit into rows of `row_len` tokens; each
  sequence restarts `position_ids` at 0 and there is no attention mask, so transformers builds a
  per-sequence (block-diagonal causal) mask from the position ids: no pad token is computed.
- Answer-only loss: the decoder's hidden states are gathered at the target positions (the answer
  tokens) before the 152k-wide lm_head, so full-sequence logits are never materialized.
- Global-batch loss: the loss is summed over targets and divided by the targets of the whole
  optimizer step, so how sequences are split into micro-batches does not change the gradient.
- Attention: flex_attention on CUDA (block-sparse: skips the masked blocks of packed rows; sdpa
  runs its masked kernel over the whole row), sdpa elsewhere or when flex can't compile.
- Kernels: Liger's fused RMSNorm / SwiGLU / RoPE (CUDA only). Frozen non-4-bit weights stay bf16
  (no prepare_model_for_kbit_training fp32 upcast; bench/reference.py's `frozen_to` undoes one).
- Checkpointing: non-reentrant, on all decoder layers or only the first `checkpoint_layers`.
- Fused LoRA: one autograd op per LoRA layer instead of peft's dropout / A / B / scale / clone / add:
  the dropout copy of the input is not kept (its mask is redrawn in backward), so a decoder layer
  that is not recomputed costs about half the memory, and three full-width passes go away.
- Offloaded checkpoints: a checkpointed layer's input waits in pinned host memory (copied out and
  back on a side stream, the way back prefetched one layer ahead), which frees ~9 GiB at
  micro-batch 64 for layers that are not recomputed.
- FP8 (train.fp8, off by default; job/fp8.py): the frozen base's decoder matmuls, forward and
  input gradient, in e4m3 with row-wise scales on cards with fp8 tensor cores (~1.35x a step on an H200).
- Compile (off by default): regional torch.compile, each decoder layer compiled on its own with
  dynamic shapes (identical layers share one graph; checkpointing wraps the compiled layer).
- Micro-batch: with packing, more sequences per micro-batch amortize the NF4 dequantization of
  every weight (the measured best within 36 GiB: 64 sequences, full checkpointing).

`speed_up(model, train_spec, device, trainer)` applies all of it; bench/RESULTS.md has the numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch
import torch.nn.functional as F

from job.fused_lora import fuse_lora

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Levers:
    """The speed switches of one training run (TrainSpec fields map onto these)."""
    packing: bool = True
    row_len: int = 2048
    """Tokens per packed row (at least the longest sequence); attention cost grows with it."""
    answer_only_loss: bool = True
    liger: bool = True
    checkpoint_layers: int | None = None
    """With gradient checkpointing: how many decoder layers recompute (None: all of them)."""
    attn_implementation: str = "sdpa"
    compile: bool = False
    """Regional torch.compile of every decoder layer (set_compile)."""
    fused_lora: bool = False
    """job/fused_lora.py's forward on every LoRA layer (same function, less memory and traffic)."""
    offload_checkpoints: bool = False
    """Checkpointed layers keep their input in pinned host memory (job/offload.py)."""
    fp8: bool = False
    """The frozen base's decoder linears run their matmuls in fp8 e4m3 (job/fp8.py; Hopper/Ada)."""
    fp8_fast_accum: bool = True
    """With fp8: the forward's `_scaled_mm` uses fast accumulation (False: exact)."""
    fp8_backward: str = "fp8"
    """With fp8: dx = dy @ W in fp8 | bf16 (dequantized weight, as bnb does)."""
    fp8_attention: bool = False
    """With fp8: attention's q/o projections too (the MLP's always; job/fp8.py projections)."""


# --- batches ---------------------------------------------------------------------------------

def pack_rows(lengths: Sequence[int], row_len: int) -> list[list[int]]:
    """Indices of `lengths` packed first-fit-decreasing into rows of at most `row_len` tokens."""
    cap = max(row_len, max(lengths, default=0))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, left in enumerate(room):
            if lengths[i] <= left:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(cap - lengths[i])
    return rows


@dataclass
class PackedCollator:
    """A Trainer data collator: one micro-batch's sequences packed into rows, no padding inside.

    Features carry `input_ids` and either `labels` or TRL's `completion_mask` (1 = answer token).
    """
    pad_id: int
    row_len: int = 2048
    fixed_width: bool = False

    def __call__(self, features: Sequence[dict]) -> dict:
        examples = [_with_labels(f) for f in features]
        rows = pack_rows([len(e["input_ids"]) for e in examples], self.row_len)
        return collate_packed(examples, rows, self.pad_id, self.row_len if self.fixed_width else None)


def _with_labels(f: dict) -> dict:
    ids = list(f["input_ids"])
    if "labels" in f:
        return {"input_ids": ids, "labels": list(f["labels"])}
    mask = f.get("completion_mask") or f.get("assistant_masks")
    if mask is None:
        return {"input_ids": ids, "labels": ids}
    return {"input_ids": ids, "labels": [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]}


def collate_packed(examples: Sequence[dict], rows: Sequence[Sequence[int]], pad_id: int,
                   width: int | None = None) -> dict:
    """Rows of concatenated sequences: input_ids, position_ids (restart per sequence), labels.

    `width` fixes the row length (flex_attention compiles once per shape); default: the fullest row.
    """
    width = max([sum(len(examples[i]["input_ids"]) for i in row) for row in rows] + [width or 0])
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    lab = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            x, y = examples[i]["input_ids"], examples[i]["labels"]
            n = len(x)
            ids[r, at:at + n] = torch.as_tensor(x)
            pos[r, at:at + n] = torch.arange(n)
            lab[r, at:at + n] = torch.as_tensor(y)
            lab[r, at] = IGNORE_INDEX  # a sequence's first token is never a target across the seam
            at += n
        # The tail is its own segment (positions from 0), attended only by itself, never a target.
        pos[r, at:] = torch.arange(width - at)
    return {"input_ids": ids, "position_ids": pos, "labels": lab}


def collate_padded(examples: Sequence[dict], pad_id: int) -> dict:
    """The plain (unpacked) batch (the full fine-tune without packing; the bench's plain stack): right-padded to the longest sequence, with an attention mask."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(examples), width), dtype=torch.long)
    lab = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for r, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[r, :n] = torch.as_tensor(e["input_ids"])
        att[r, :n] = 1
        lab[r, :n] = torch.as_tensor(e["labels"])
        lab[r, 0] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": att, "labels": lab}


def count_targets(batch: dict) -> int:
    """Positions that carry a loss (labels shifted by one, as the causal LM predicts)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


# --- the loss ----------------------------------------------------------------------------------

def causal_lm_of(model: torch.nn.Module) -> torch.nn.Module:
    """The *ForCausalLM inside a PeftModel (LoRA layers are injected in place, so it trains them),
    also under a DistributedDataParallel wrapper."""
    model = unwrap_ddp(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def unwrap_ddp(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _decoder_hidden(model: torch.nn.Module, lm: torch.nn.Module, kwargs: dict) -> torch.Tensor:
    """The decoder's last hidden state. Under DDP the forward must go through the wrapper (it arms the
    gradient all-reduce of the backward), so the whole model runs with its lm_head on one position
    only and a hook takes the decoder's output; unwrapped, the decoder runs alone."""
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return lm.model(**kwargs, use_cache=False).last_hidden_state
    box = {}
    hook = lm.model.register_forward_hook(lambda mod, args, out: box.__setitem__("h", out.last_hidden_state))
    try:
        model(**kwargs, use_cache=False, logits_to_keep=1)
    finally:
        hook.remove()
    return box["h"]


def answer_loss_sum(model: torch.nn.Module, batch: dict, liger: bool = False) -> torch.Tensor:
    """Summed cross-entropy over the target positions only; the lm_head sees just those rows."""
    lm = causal_lm_of(model)
    kwargs = {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask") if k in batch}
    return summed_target_loss(_decoder_hidden(model, lm, kwargs), batch["labels"], lm.lm_head, liger)


def summed_target_loss(hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module,
                       liger: bool = False) -> torch.Tensor:
    """The summed cross-entropy of `head` on the decoder's `hidden` states at the target positions of
    `labels` only (shifted by one; IGNORE_INDEX elsewhere): the full logits are never built."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    h, y = hidden[:, :-1][keep], targets[keep]
    if liger and h.is_cuda and h.shape[0] > 4096:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss  # never builds full logits
        return LigerFusedLinearCrossEntropyLoss(reduction="sum")(head.weight, h, y)
    return F.cross_entropy(head(h).float(), y, reduction="sum")


def trainer_loss(model: torch.nn.Module, inputs: dict, num_items_in_batch=None, liger: bool = True) -> torch.Tensor:
    """compute_loss for a Trainer: answer-only summed loss over the global batch's target count."""
    s = answer_loss_sum(model, inputs, liger)
    n = num_items_in_batch if num_items_in_batch is not None else count_targets(inputs)
    return s / n


# --- model switches ------------------------------------------------------------------------------

def trainable_to_fp32(model: torch.nn.Module) -> int:
    """Keep the LoRA weights fp32 (autocast still computes in bf16): TRL casts them to bf16 on a 4-bit
    model, where AdamW updates at lr 1e-5 fall below bf16's resolution and are lost."""
    n = 0
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
            n += p.numel()
    return n


def apply_liger(model: torch.nn.Module) -> bool:
    """Liger's fused RMSNorm, SwiGLU and RoPE on a Qwen2 model (CUDA + liger-kernel only)."""
    lm = causal_lm_of(model)
    if not torch.cuda.is_available() or next(lm.parameters()).device.type != "cuda":
        return False
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2
    except ImportError:
        return False
    apply_liger_kernel_to_qwen2(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=False, model=lm)
    return True


def set_checkpointing(model: torch.nn.Module, enabled: bool, layers: int | None = None, offload: bool = False) -> int:
    """Non-reentrant checkpointing on the first `layers` decoder layers (None: all); returns the count.

    `offload`: the checkpointed layers' inputs wait in pinned host memory (job/offload.py)."""
    lm = causal_lm_of(model)
    blocks = lm.model.layers
    if not enabled:
        lm.gradient_checkpointing_disable()
        return 0
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    keep = len(blocks) if layers is None else max(0, min(layers, len(blocks)))
    for i, block in enumerate(blocks):
        block.gradient_checkpointing = i < keep
    if offload:
        from job.offload import install

        install(blocks)
    return keep


def set_attention(model: torch.nn.Module, implementation: str) -> None:
    """sdpa (per-sequence mask from position_ids) or flex_attention (block-sparse, true varlen)."""
    causal_lm_of(model).set_attn_implementation(implementation)


def resolve_attention(name: str, device: torch.device | str) -> str:
    """`auto`: flex_attention on CUDA (it skips the masked blocks of packed rows), sdpa elsewhere
    (flex_attention has no CPU backward)."""
    if name != "auto":
        return name
    return "flex_attention" if torch.device(device).type == "cuda" else "sdpa"


def flex_attention_works(device: torch.device | str) -> bool:
    """Compile and run flex_attention forward+backward once on a tiny input (it needs Triton and a
    C compiler); a job without them falls back to sdpa instead of failing at its first step."""
    try:
        from torch.nn.attention.flex_attention import flex_attention

        q = torch.randn(1, 1, 128, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
        torch.compile(flex_attention)(q, q, q).sum().backward()
        return True
    except Exception:  # noqa: BLE001 - any failure here means: don't use it
        return False


def set_compile(model: torch.nn.Module, enabled: bool) -> int:
    """Regional torch.compile: `Module.compile` on each decoder layer (or undo it); returns the count.

    Only the layer's own forward is compiled, so HF's checkpoint wrapper stays outside it and the
    recompute replays the compiled graph; dynamic=True because packed micro-batches vary in rows.
    """
    blocks = causal_lm_of(model).model.layers
    for block in blocks:
        if enabled:
            block.compile(dynamic=True)
        else:
            block._compiled_call_impl = None  # what Module.compile set; eager again
    return len(blocks) if enabled else 0


def levers_for(train, device: torch.device | str) -> Levers:
    """The levers a TrainSpec asks for on `device` (rows as long as the longest allowed sequence)."""
    return Levers(packing=train.packing, row_len=train.max_length, answer_only_loss=True,
                  liger=train.liger, checkpoint_layers=train.checkpoint_layers,
                  attn_implementation=resolve_attention(train.attn_implementation, device),
                  compile=train.compile, fused_lora=train.fused_lora,
                  offload_checkpoints=train.offload_checkpoints,
                  fp8=train.fp8 and _fp8_here(device),
                  fp8_fast_accum=getattr(train, "fp8_fast_accum", True), fp8_backward=getattr(train, "fp8_backward", "fp8"),
                  fp8_attention=getattr(train, "fp8_attention", False))


def _fp8_here(device: torch.device | str) -> bool:
    from job.fp8 import available

    return available(device)[0]


def speed_up(model: torch.nn.Module, train, device: torch.device | str, trainer=None, pad_id: int = 0) -> Levers:
    """Apply the levers to a LoRA model and, when given, to its Trainer (one call site in train.py).

    Model: attention implementation, Liger kernels, checkpointing policy. Trainer: the packed
    collator (with packing) and the answer-only loss normalized by the global batch's targets.
    """
    lv = levers_for(train, device)
    if lv.attn_implementation == "flex_attention" and not flex_attention_works(device):
        print("speed: flex_attention does not compile here; using sdpa (slower with packing)", flush=True)
        lv = replace(lv, attn_implementation="sdpa")
    set_attention(model, lv.attn_implementation)
    if lv.liger and not apply_liger(model) and torch.device(device).type == "cuda":
        print("speed: liger-kernel not installed; fused RMSNorm/SwiGLU/RoPE off (slower)", flush=True)
    set_checkpointing(model, train.gradient_checkpointing, lv.checkpoint_layers, lv.offload_checkpoints)
    fuse_lora(model, lv.fused_lora)
    if lv.fp8:
        from job.fp8 import enable_fp8, projections, recipe

        n = enable_fp8(model, fast_accum=lv.fp8_fast_accum, backward=lv.fp8_backward, names=projections(lv.fp8_attention))
        print(f"speed: fp8 (e4m3) matmuls on {n} frozen linears "
              f"({recipe(lv.fp8_fast_accum, lv.fp8_backward, lv.fp8_attention)})", flush=True)
    set_compile(model, lv.compile)
    if trainer is not None:
        trainable_to_fp32(model)
        if lv.packing:
            trainer.data_collator = PackedCollator(pad_id, lv.row_len, lv.attn_implementation == "flex_attention")

        def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = trainer_loss(model, inputs, num_items_in_batch, lv.liger)
            if num_items_in_batch is not None and trainer.args.average_tokens_across_devices:
                # As Trainer.compute_loss: the count is global, DDP averages gradients over ranks.
                loss = loss * (trainer.accelerator.num_processes if trainer.args.n_gpu <= 1 else trainer.args.n_gpu)
            return (loss, None) if return_outputs else loss

        trainer.compute_loss = compute_loss
    return lv
