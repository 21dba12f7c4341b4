"""The model: pretrained (from_pretrained + BitsAndBytesConfig) or random (built from `model.arch`),
4-bit NF4 base for qlora, then peft LoRA adapters from `config.lora`.

The random 14B is built layer by layer on the GPU in bf16, each nn.Linear replaced by a bnb
Linear4bit quantized there: never 30 GB through CPU RAM or disk.
"""
from __future__ import annotations

import torch
from torch import nn

from contracts.config import RunConfig
from contracts.errors import ContractError
from job.env import quiet_bnb_cpu_notice
from job.tokenizer import padded_vocab

quiet_bnb_cpu_notice()

# Qwen2.5-14B(-Instruct)'s config.json shapes.
PRESETS: dict[str, dict] = {
    "qwen2.5-14b": dict(hidden_size=5120, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
                        intermediate_size=13824, vocab_size=152064, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                        max_position_embeddings=32768, tie_word_embeddings=False),
    # Same family, small enough for CPU tests of the same builder.
    "qwen2-tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=128, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                       max_position_embeddings=1024, tie_word_embeddings=True),
}


def compute_dtype(cfg: RunConfig, device: torch.device) -> torch.dtype:
    """bf16 on a GPU that has it (the config's precision), fp32 on CPU."""
    if device.type == "cpu" or cfg.train.precision == "fp32":
        return torch.float32
    return torch.float16 if cfg.train.precision == "fp16" else torch.bfloat16


def qwen2_config(cfg: RunConfig, vocab: int):
    """A Qwen2Config from `model.arch` (or its preset); vocab = the tokenizer's padded size."""
    from transformers import Qwen2Config

    arch = dict(cfg.model.arch or {})
    preset = arch.pop("preset", None)
    if preset is not None:
        if preset not in PRESETS:
            raise ContractError(f"model.arch.preset: {preset!r} is not accepted ({' | '.join(PRESETS)})")
        arch = {**PRESETS[preset], **arch}
    arch.setdefault("vocab_size", vocab)
    if arch["vocab_size"] < vocab:
        raise ContractError(f"model.arch.vocab_size: {arch['vocab_size']} < the tokenizer's {vocab} tokens")
    try:
        qc = Qwen2Config(**arch)
    except (TypeError, ValueError) as e:
        raise ContractError(f"model.arch: {arch!r} is not a valid Qwen2 config ({e})") from None
    if qc.hidden_size % qc.num_attention_heads:
        raise ContractError(f"model.arch: hidden_size {qc.hidden_size} is not a multiple of num_attention_heads")
    return qc


def model_config(cfg: RunConfig):
    """The model's transformers config (no weights): built from `model.arch` (random init, or Qwen2.5-14B's
    known shapes), else read from the hub."""
    if cfg.model.init == "random":
        return qwen2_config(cfg, 151680)
    if "qwen2.5-14b" in cfg.model.id.lower():
        return qwen2_config(cfg.with_overrides({"model.arch": {"preset": "qwen2.5-14b"}}), 152064)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(cfg.model.id, revision=cfg.model.revision)
    except OSError as e:
        raise ContractError(f"model.id: {cfg.model.id!r}: no config reachable ({str(e).splitlines()[0]})") from None


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The *ForCausalLM inside a PeftModel (LoRA layers are injected in place, so it trains them),
    also under a DistributedDataParallel wrapper."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def build(cfg: RunConfig, tok, device: torch.device):
    """The model ready for training: base (4-bit for qlora), LoRA on `lora.target_modules`."""
    model = build_base(cfg, tok, device)
    model.config.use_cache = False
    return model if cfg.train.method == "full" else add_lora(model, cfg)


def build_base(cfg: RunConfig, tok, device: torch.device):
    """The base model (4-bit NF4 for qlora): pretrained, or random from `model.arch` seeded by
    `train.seed`, so evaluation rebuilds exactly the base an adapter was trained on."""
    dtype = compute_dtype(cfg, device)
    quantize = cfg.train.method == "qlora"
    if cfg.model.init == "random":
        return build_random(qwen2_config(cfg, padded_vocab(tok)), device, dtype, quantize, cfg.train.seed)
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype) if quantize else None
    try:
        return AutoModelForCausalLM.from_pretrained(
            cfg.model.id, dtype=dtype, revision=cfg.model.revision, attn_implementation="sdpa", quantization_config=nf4,
            device_map={"": device.index or 0} if device.type == "cuda" else {"": "cpu"})
    except OSError as e:
        raise ContractError(f"model.id: {cfg.model.id!r} could not be loaded ({str(e).splitlines()[0]})") from None


def build_random(qc, device: torch.device, dtype: torch.dtype, quantize: bool, seed: int = 0):
    """Random weights (normal, std initializer_range), one decoder layer at a time on `device`."""
    from transformers import Qwen2ForCausalLM
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    qc._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(qc)
    std = qc.initializer_range
    for layer in model.model.layers:
        layer.to_empty(device=device)
        _init_(layer, std, dtype)
        if quantize:
            replace_linear_4bit(layer, dtype, device)
    for mod in (model.model.embed_tokens, model.model.norm, model.lm_head):
        mod.to_empty(device=device)
        _init_(mod, std, dtype)
    if qc.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    with torch.device(device):
        model.model.rotary_emb = Qwen2RotaryEmbedding(qc)  # its buffers were on meta
    if quantize:
        mark_4bit(model, dtype)
    else:
        model.to(dtype=dtype)
    return model


def mark_4bit(model, dtype: torch.dtype) -> None:
    """Mark a model whose Linears are bnb Linear4bit the way from_pretrained(BitsAndBytesConfig) does,
    so that peft wraps them with its bnb 4-bit LoRA layer and Trainer/TRL treat it as QLoRA."""
    from transformers import BitsAndBytesConfig
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)
    model.config.quantization_config = qcfg
    model.hf_quantizer = Bnb4BitHfQuantizer(qcfg)
    model.is_quantized = True  # what the quantizer's preprocess_model sets
    model.quantization_method = qcfg.quant_method
    model.is_loaded_in_4bit = True  # ... and its _process_model_after_weight_loading
    model.is_4bit_serializable = True


@torch.no_grad()
def _init_(module: nn.Module, std: float, dtype: torch.dtype) -> None:
    for name, p in module.named_parameters(recurse=True):
        p.data = p.data.to(dtype)
        if name.endswith("bias"):
            p.zero_()
        elif p.dim() == 1:
            p.fill_(1.0)  # RMSNorm weights
        else:
            p.normal_(0.0, std)


def replace_linear_4bit(module: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """Swap every nn.Linear under `module` for a bnb NF4 Linear4bit (double quant), quantized on `device`."""
    import bitsandbytes as bnb

    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=dtype, compress_statistics=True, quant_type="nf4",
                                  device="meta")
            q.weight = bnb.nn.Params4bit(child.weight.data.to(dtype), requires_grad=False,
                                         compress_statistics=True, quant_type="nf4")
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data.to(dtype), requires_grad=False)
            q.to(device)  # Params4bit quantizes on its first move to a device
            setattr(module, name, q)
        else:
            replace_linear_4bit(child, dtype, device)


def add_lora(model, cfg: RunConfig):
    from peft import LoraConfig, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lc = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                    target_modules=list(cfg.lora.target_modules), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lc)
