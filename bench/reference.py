"""Naive references the job's fast paths are checked against: nothing in job/ runs these.

- `score_one_by_one`: one full forward per candidate answer with standard causal attention, the
  reference for job/scoring.py's tree scorer (tests/test_job_evaluate.py, bench/eval_throughput.py).
- `step`: a plain training loop over one global batch (`micro_batches` as the Trainer draws them,
  packed or padded; answer-only loss or the stock full-logits loss, `hf_loss_sum`), the reference
  the Trainer path of job/sft.py is checked against (tests/test_job_fast_*.py) and the loop
  bench/train_throughput.py times; `frozen_to` undoes peft's fp32 upcast for the plain stack.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

from job import data as D
from job.batches import PackedCollator, collate_padded, count_targets
from job.levers import Levers
from job.loss import answer_loss_sum
from job.load import device_of


def score_one_by_one(model, tok, prompt: list[int], lo: int, hi: int, values: Sequence[int] | None = None
                     ) -> list[float]:
    """The naive reference: one full forward per candidate answer, standard causal attention.
    Slow (the prompt is recomputed per answer); the tests and the bench compare against it."""
    end = D.answer_end_id(tok)
    dev = device_of(model)
    scores = []
    for v in (range(lo, hi + 1) if values is None else values):
        ans = list(tok(str(v), add_special_tokens=False)["input_ids"]) + [end]
        ids = torch.tensor([prompt + ans[:-1]], device=dev)
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
        scores.append(sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(ans)))
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    return [w / sum(weights) for w in weights]


# --- training: the plain loop ------------------------------------------------------------------

def micro_batches(examples: Sequence[dict], micro_batch: int, levers: Levers, pad_id: int) -> list[dict]:
    """Consecutive groups of `micro_batch` sequences (as the Trainer draws them), collated.

    Packed: each group's sequences packed into rows of `row_len`; padded: the plain stack's batch.
    """
    out = []
    for i in range(0, len(examples), micro_batch):
        group = examples[i:i + micro_batch]
        flex = levers.attn_implementation == "flex_attention"
        out.append(PackedCollator(pad_id, levers.row_len, flex)(group) if levers.packing else collate_padded(group, pad_id))
    return out


def hf_loss_sum(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The stock loss (full-sequence logits) scaled back to a sum, for the lever comparison."""
    out = model(**batch, use_cache=False)
    return out.loss.float() * count_targets(batch)


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, micro_batches: Iterable[dict],
         levers: Levers, device: torch.device | str, dtype: torch.dtype = torch.bfloat16,
         max_grad_norm: float | None = 1.0, scheduler=None, after_micro=None) -> float:
    """One optimizer step over a global batch; returns its mean loss per target token.

    Every micro-batch's summed loss is divided by the global batch's target count, so packing
    (uneven micro-batches) gives the same gradient as any other split of the same sequences.
    """
    micro_batches = list(micro_batches)
    total = sum(count_targets(b) for b in micro_batches)
    loss_sum = 0.0
    use_amp = torch.device(device).type == "cuda" and dtype != torch.float32
    for b in micro_batches:
        b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=use_amp):
            s = answer_loss_sum(model, b, levers.liger) if levers.answer_only_loss else hf_loss_sum(model, b)
        (s / total).backward()
        loss_sum += float(s.detach())
        if after_micro is not None:
            after_micro(b)
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum / max(total, 1)


def frozen_to(model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Cast frozen, non-4-bit floating weights (embeddings, lm_head, norms) to `dtype`.

    peft's prepare_model_for_kbit_training upcasts them to fp32, which makes the 152k lm_head an
    fp32 matmul and the residual stream fp32; trainable (LoRA) weights are left as they are.
    """
    n = 0
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype and type(p).__name__ != "Params4bit":
            p.data = p.data.to(dtype)
            n += p.numel()
    return n
