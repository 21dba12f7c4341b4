"""contracts/sizing.py, the memory the job's `check` and the launcher's estimate both size with, against
references of their own: Qwen2.5-14B's tensors as published, arithmetic written out by hand, and the
peaks measured on an H200 that the activation formula was fitted to."""
from __future__ import annotations

import pytest

from contracts.sizing import GIB, QWEN2_5_14B, Shape, adapter_fit, full_fit, lora_params

# Qwen/Qwen2.5-14B's safetensors, tensor by tensor (config.json: hidden 5120, intermediate 13824,
# 48 layers, 40 heads, 8 kv heads of 128, vocab 152064, untied; q/k/v carry biases).
LAYER_TENSORS = {
    "q_proj.weight": 5120 * 5120, "q_proj.bias": 5120, "k_proj.weight": 1024 * 5120, "k_proj.bias": 1024,
    "v_proj.weight": 1024 * 5120, "v_proj.bias": 1024, "o_proj.weight": 5120 * 5120,
    "gate_proj.weight": 13824 * 5120, "up_proj.weight": 13824 * 5120, "down_proj.weight": 5120 * 13824,
    "input_layernorm.weight": 5120, "post_attention_layernorm.weight": 5120,
}
EMBED, LM_HEAD, NORM = 152064 * 5120, 152064 * 5120, 5120


def test_the_14b_shape_counts_the_published_parameters():
    layer = sum(LAYER_TENSORS.values())
    assert QWEN2_5_14B.layer_params == layer == 275_268_608
    assert QWEN2_5_14B.params == 48 * layer + EMBED + LM_HEAD + NORM == 14_770_033_664  # "14.8B" on the hub


def test_a_shape_reads_a_transformers_config():
    class Qwen2Config:  # the attribute names transformers uses
        hidden_size, intermediate_size, num_hidden_layers = 64, 128, 2
        num_attention_heads, num_key_value_heads, vocab_size, tie_word_embeddings = 4, 2, 1000, True

    tiny = Shape.of(Qwen2Config)
    assert tiny == Shape(64, 128, 2, 4, 2, 1000, True) and tiny.kv == 32
    # per layer: q 64x64+64, k and v 32x64+32 each, o 64x64, MLP 3x64x128, two norms of 64; one tied embedding
    assert tiny.params == 2 * (4096 + 64 + 2 * (2048 + 32) + 4096 + 3 * 8192 + 128) + 64_000 + 64


def test_lora_counts_rank_times_in_plus_out_per_target():
    # r x (in + out) per projection per layer, at the 14B's shapes
    per_layer = 16 * ((5120 + 5120) * 2 + (5120 + 1024) * 2 + (5120 + 13824) * 3)
    assert lora_params(QWEN2_5_14B, 16) == 48 * per_layer
    assert lora_params(QWEN2_5_14B, 16, ["q_proj", "v_proj"]) == 48 * 16 * (10240 + 6144)


def test_a_full_fine_tune_shards_16_bytes_a_parameter_and_gathers_two_layers():
    fit = full_fit(QWEN2_5_14B, world=8, precision="bf16", activations_gib=10.0)
    n = 14_770_033_664
    sharded = n * (4 + 4 + 8) / 8 / 2**30  # fp32 weights, gradients, AdamW m and v, over 8 ranks
    gathered = (EMBED + LM_HEAD) * 2 / 2**30 + 2 * sum(LAYER_TENSORS.values()) * (2 + 4) / 2**30  # bf16 + fp32 grads
    assert fit["sharded_gib"] == pytest.approx(sharded, abs=0.01) == pytest.approx(27.51, abs=0.01)
    assert fit["gathered_gib"] == pytest.approx(gathered, abs=0.01)
    assert fit["total_gib"] == pytest.approx(sharded + gathered + 10.0 + 1.5, abs=0.02)
    one = full_fit(QWEN2_5_14B, world=1, precision="fp32", activations_gib=0.0)
    assert one["base_gib"] == pytest.approx(n * 4 / GIB, abs=0.01) and one["sharded_gib"] == pytest.approx(8 * sharded, abs=0.01)


# Peak GPU memory + 1.5 GiB CUDA context, measured on an H200 for QLoRA r16 on 7 targets of the 14B
# (micro-batch 64 = 20.6k packed tokens): (tokens, micro_batch, recomputed layers, fused LoRA, offloaded, GiB).
MEASURED = [
    (20_600, 64, None, False, False, 29.8),
    (20_600, 64, None, True, False, 28.7),
    (20_600, 64, 46, True, False, 32.3),
    (20_600, 64, 43, True, False, 42.9),
    (41_200, 128, None, False, False, 45.0),
    (41_200, 128, None, True, False, 43.0),
    (15_200, 64, None, False, False, 23.4),  # the job on real rows
    (20_600, 64, 43, True, True, 33.1),
]


@pytest.mark.parametrize("tokens,micro_batch,layers,fused,offload,measured", MEASURED)
def test_the_adapter_fit_runs_at_or_a_little_above_each_measured_peak(tokens, micro_batch, layers, fused, offload,
                                                                       measured):
    fit = adapter_fit(QWEN2_5_14B, method="qlora", lora_r=16, tokens=tokens, micro_batch=micro_batch,
                      gradient_checkpointing=True, checkpoint_layers=layers, fused_lora=fused,
                      offload_checkpoints=offload)
    assert measured <= fit["total_gib"] <= measured * 1.15, fit  # high, never low: a refused card beats an OOM


def test_offloading_moves_the_recomputed_inputs_to_host_memory():
    common = dict(method="qlora", lora_r=16, tokens=20_600, micro_batch=64, gradient_checkpointing=True,
                  checkpoint_layers=None, fused_lora=True)
    kept, off = adapter_fit(QWEN2_5_14B, **common, offload_checkpoints=False), \
        adapter_fit(QWEN2_5_14B, **common, offload_checkpoints=True)
    per_layer_input = 20_600 * 5120 * 2 / 2**30  # one bf16 hidden state per token
    assert off["host_gib"] == pytest.approx(48 * per_layer_input, abs=0.01) and kept["host_gib"] == 0
    assert kept["total_gib"] - off["total_gib"] == pytest.approx(46 * per_layer_input, abs=0.02)  # two stay on the card
