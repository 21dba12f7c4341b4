"""The small LoRA models and rows the job's speed tests share (packing, fused LoRA, compile, offload, fp8,
the lean memory mode, the trainer): a 2-layer Qwen2 with peft LoRA on every projection, random token rows
whose answer tokens are the labels."""
from __future__ import annotations

import random

import peft
import torch
import transformers

from bench import reference
from job.batches import IGNORE_INDEX, count_targets
from job.levers import set_checkpointing
from job.loss import answer_loss_sum

ARCH = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, vocab_size=512)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def eval_lora_model(seed: int = 0):
    """LoRA on a random base in eval mode (no dropout: comparisons are exact), LoRA B not zero."""
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(**ARCH, attn_implementation="sdpa")
    base = transformers.Qwen2ForCausalLM(cfg).float().eval()  # eval: no dropout, the comparison is exact
    lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False,
                           target_modules=TARGETS)
    return peft.get_peft_model(base, lora)


def train_lora_model(dropout: float, base=None):
    """LoRA with `dropout` on `base` (a random one when None), the base frozen, in train mode."""
    torch.manual_seed(0)
    if base is None:
        base = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**ARCH, attn_implementation="sdpa")).float()
    for p in base.parameters():
        p.requires_grad_(False)
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout,
                                                      init_lora_weights=False, target_modules=TARGETS))
    model.train()
    return model


def lora_examples(n: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p, a = rng.randint(5, 40), rng.randint(1, 4)
        ids = [rng.randrange(1, ARCH["vocab_size"]) for _ in range(p + a)]
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * p + ids[p:]})
    return out


def loss_and_grads(model, batches, answer_only: bool) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    total = sum(count_targets(b) for b in batches)
    s_all = 0.0
    for b in batches:
        s = answer_loss_sum(model, b) if answer_only else reference.hf_loss_sum(model, b)
        (s / total).backward()
        s_all += float(s.detach())
    grads = [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]
    return s_all / total, grads


def run_saved(model, batch, checkpointing: bool | None):
    """Loss, LoRA gradients and the distinct bytes autograd keeps for backward (seeded dropout).

    `checkpointing` None: the model's checkpointing as it is set."""
    if checkpointing is not None:
        set_checkpointing(model, checkpointing)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    kept: dict[int, int] = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        s = answer_loss_sum(model, batch)
    s.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    return float(s.detach()), grads, sum(kept.values())
