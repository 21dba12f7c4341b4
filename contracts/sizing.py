"""GPU memory and disk a run needs, one formula for both sides: the job's `check` (does the config fit this
card, in which memory mode `train` runs) and the launcher's estimate (which cards a full fine-tune fits, the
disk to ask SkyPilot for). Plain numbers in, GiB out; stdlib only."""
from __future__ import annotations

import math
from dataclasses import dataclass

GIB = 2**30
FIT_SHARE = 0.95          # of a card's memory a fit may use (the estimate runs high; bench/RESULTS.md)
CONTEXT_GIB = 1.5         # the CUDA context and the allocator's slack, on every card
FULL_BYTES_PER_PARAM = 16  # a full fine-tune, sharded over the ranks: fp32 weights, gradients, AdamW m and v
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

CHECKPOINT_BYTES_PER_PARAM = 12  # a sharded DCP checkpoint: fp32 master weights + AdamW m and v
BASE_DOWNLOAD_FACTOR = 1.1       # the base's bf16 safetensors (2 B/param) as downloaded, with the hub's extras
MIN_FREE_GIB = 2.0               # data, logs, the evaluation's outputs: what `job check` wants free besides
SYSTEM_GIB = 60.0                # the machine image (CUDA, drivers) and the job's venv, on the same disk
MARGIN = 1.15                    # the launcher counts parameters from the model's name ("14B" for 14.77B)


@dataclass(frozen=True)
class Shape:
    """A Qwen2-family decoder's sizes."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False

    @classmethod
    def of(cls, qc) -> Shape:
        """From a transformers config (Qwen2Config, AutoConfig): its attribute names."""
        return cls(qc.hidden_size, qc.intermediate_size, qc.num_hidden_layers, qc.num_attention_heads,
                   qc.num_key_value_heads, qc.vocab_size, bool(qc.tie_word_embeddings))

    @property
    def kv(self) -> int:
        """The k and v projections' width (grouped-query attention)."""
        return self.kv_heads * (self.hidden // self.heads)

    @property
    def layer_params(self) -> int:
        h, kv, i = self.hidden, self.kv, self.intermediate
        return 2 * h * h + h + 2 * h * kv + 2 * kv + 3 * h * i + 2 * h  # q, o (q's bias), k, v (biases), MLP, 2 norms

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.embedding_params + self.hidden  # + the final norm


QWEN2_5_14B = Shape(hidden=5120, intermediate=13824, layers=48, heads=40, kv_heads=8, vocab=152064)


def lora_params(shape: Shape, r: int, targets=LORA_TARGETS) -> int:
    """LoRA's A and B matrices: r x (in + out) per target projection per layer."""
    h, kv, i = shape.hidden, shape.kv, shape.intermediate
    dims = {"q_proj": 2 * h, "k_proj": h + kv, "v_proj": h + kv, "o_proj": 2 * h,
            "gate_proj": h + i, "up_proj": h + i, "down_proj": h + i}
    return shape.layers * r * sum(dims.get(t, 2 * h) for t in targets)


def adapter_fit(shape: Shape, *, method: str, lora_r: int, tokens: int, micro_batch: int,
                gradient_checkpointing: bool, checkpoint_layers: int | None, fused_lora: bool,
                offload_checkpoints: bool) -> dict:
    """Peak GPU memory of one micro-batch of `tokens` (packed): the base (4-bit ~0.55 B/param for qlora,
    bf16 otherwise and for the embeddings), LoRA + AdamW, and the activations: a hidden state per
    recomputed layer, everything a layer saves for each layer that is not recomputed, the backward's
    working set. Fitted to the 14B on an H200 (bench/RESULTS.md). Offloaded checkpoints keep the
    recomputed layers' inputs in pinned host memory (`host_gib`), two on the card."""
    n, emb = shape.params, shape.embedding_params
    base = (n - emb) * (0.55 if method == "qlora" else 2.0) + emb * 2.0
    lora = lora_params(shape, lora_r) * (2 + 2 + 8 + 4)  # weights, grads, Adam states, fp32 master
    h, i, layers, t = shape.hidden, shape.intermediate, shape.layers, tokens
    ckpt = 0 if not gradient_checkpointing else (
        layers if checkpoint_layers is None else max(0, min(checkpoint_layers, layers)))
    # Per token, in 2-byte units; peft's own LoRA forward also keeps the dropout copies.
    kept = t * 2 * ((10 * h + 3 * i) if fused_lora else (19 * h + 4.5 * i))
    working = t * 2 * ((12 * h + 4.5 * i) if fused_lora else (14 * h + 5.4 * i))
    slack = (2.6 if fused_lora else 2.8) * GIB
    inputs = t * h * 2 * (min(ckpt, 2) if offload_checkpoints else ckpt)
    host = t * h * 2 * ckpt if offload_checkpoints else 0
    acts = inputs + working + max(slack, (layers - ckpt) * kept)
    logits = micro_batch * 8 * shape.vocab * 4 * 2
    total = (base + lora + acts + logits) / GIB + CONTEXT_GIB
    return {"params": n, "base_gib": round(base / GIB, 2), "lora_gib": round(lora / GIB, 2),
            "activations_gib": round((acts + logits) / GIB, 2), "total_gib": round(total, 2),
            "host_gib": round(host / GIB, 2)}


def full_fit(shape: Shape, *, world: int, precision: str, activations_gib: float) -> dict:
    """Per-GPU memory of a full fine-tune over `world` ranks: FULL_BYTES_PER_PARAM sharded, the gathered
    compute copies (embedding + lm_head, two decoder layers in flight with their unsharded fp32
    gradients), one micro-batch's activations (adapter_fit's), the CUDA context."""
    n, world = shape.params, max(1, world)
    compute = 4 if precision == "fp32" else 2
    sharded = n * FULL_BYTES_PER_PARAM / world / GIB
    gathered = (shape.embedding_params * compute + 2 * shape.layer_params * (compute + 4)) / GIB
    total = sharded + gathered + activations_gib + CONTEXT_GIB
    return {"params": n, "world": world, "sharded_gib": round(sharded, 2), "gathered_gib": round(gathered, 2),
            "activations_gib": activations_gib, "total_gib": round(total, 2), "base_gib": round(n * compute / GIB, 2),
            "lora_gib": 0.0, "host_gib": 0.0, "bytes_per_param": FULL_BYTES_PER_PARAM}


def fits(need_gib: float, card_gib: float) -> bool:
    return need_gib <= FIT_SHARE * card_gib


# --- disk ------------------------------------------------------------------------------------

def output_bytes_per_param(precision: str) -> int:
    """out/model/ is written in the training precision: fp32 on CPU/fp32 configs, else bf16."""
    return 4 if precision == "fp32" else 2


def full_disk(params: float, *, nodes: int = 1, checkpoint_every: int, keep_checkpoints: int,
              precision: str = "bf16", pretrained: bool = True) -> dict:
    """GiB a full fine-tune of `params` parameters writes on one node of `nodes`: its share of each
    checkpoint, the output weights (node 0), the downloaded base (pretrained), and MIN_FREE_GIB.
    `total_gib` is the checkpoints + output; `need_gib` everything `job check` asks to be free."""
    nodes = max(1, int(nodes))
    kept = 0 if not checkpoint_every else max(int(keep_checkpoints), 1) + 1  # the kept ones + the one being written
    ckpt = params * CHECKPOINT_BYTES_PER_PARAM / nodes / GIB
    out = params * output_bytes_per_param(precision) / GIB
    base = base_download_gib(params) if pretrained else 0.0
    total = kept * ckpt + out
    return {"nodes": nodes, "checkpoints": kept, "checkpoint_gib": round(ckpt, 1), "output_gib": round(out, 1),
            "base_gib": round(base, 1), "total_gib": round(total, 1), "need_gib": round(total + base + MIN_FREE_GIB, 1)}


def base_download_gib(params: float) -> float:
    return params * 2 / GIB * BASE_DOWNLOAD_FACTOR


def machine_disk_gb(need_gib: float, *, floor_gb: int = 0) -> int:
    """The `resources.disk_size` to ask for: (need + SYSTEM_GIB) x MARGIN in GB (SkyPilot's unit; 1 GiB
    = 1.074 GB), rounded up to 10, never below `floor_gb` (the template's value)."""
    gb = (need_gib + SYSTEM_GIB) * MARGIN * GIB / 1e9
    return max(int(floor_gb), int(math.ceil(gb / 10.0)) * 10)
