"""The answer-only loss: the decoder's hidden states are gathered at the target positions (the answer
tokens) before the 152k-wide lm_head, so full-sequence logits are never materialized. The sum is
divided by the targets of the whole optimizer step (job/sft.py, job/full.py), so how sequences are
split into micro-batches does not change the gradient."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from job.batches import IGNORE_INDEX
from job.model import causal_lm_of


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
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss  # CUDA only: imported where used
        return LigerFusedLinearCrossEntropyLoss(reduction="sum")(head.weight, h, y)
    return F.cross_entropy(head(h).float(), y, reduction="sum")
