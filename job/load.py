"""The model as evaluation and prediction use it: the base exactly as train built it (job/model.py),
the adapter applied, and, when asked or when the GPU holds it, every 4-bit weight dequantized and
the adapter merged in (dense GEMMs). Torch is imported inside the functions: `job evaluate
--baseline` loads no model and needs none of it.
"""
from __future__ import annotations

from contracts.config import RunConfig
from contracts.errors import ContractError
from job.dist import local_rank
from job.tokenizer import load_tokenizer

DEFAULT_TOKENS_PER_BATCH = 32768  # bench/eval_throughput.py: 65536 is no faster on the 14B
EVAL_PRECISIONS = ("auto", "bf16", "nf4")


def load_model(cfg: RunConfig, adapter: str | None, precision: str = "nf4",
               tokens_per_batch: int = DEFAULT_TOKENS_PER_BATCH):
    """(tokenizer, model in eval mode) for this config, with the adapter applied when given;
    dense and merged when `precision` (auto|bf16|nf4) asks for it and, for auto, the GPU holds it."""
    import torch

    if precision not in EVAL_PRECISIONS:
        raise ContractError(f"--eval-precision: {precision!r} is not accepted ({' | '.join(EVAL_PRECISIONS)})")
    from job.model import build_base  # torch-heavy: only where a model is loaded, never for --help

    tok = load_tokenizer(cfg.model.tokenizer, cfg.model.id, cfg.model.revision)
    # The base exactly as train built it (job/model.py: same seed, same 4-bit NF4), so an adapter fits.
    device = torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    model = build_base(cfg, tok, device)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    model.requires_grad_(False)  # no autograd graph, without flipping the process-wide grad mode
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    decoder, head = core(model)
    dtype = head.weight.dtype
    need = extra_dense_bytes(model, dtype) + activation_bytes(tokens_per_batch, decoder.config.hidden_size)
    if choose_precision(precision, free, need) == "bf16":
        model = merge_dense(model, dtype).requires_grad_(False)
    return tok, model


def choose_precision(requested: str, free_bytes: int | None, needed_bytes: int) -> str:
    """bf16 or nf4. auto: bf16 only on a GPU (free_bytes given) whose free memory covers the growth
    from 4-bit to dense plus one forward's activations; CPU evaluation is for checks, kept as built."""
    if requested != "auto":
        return requested
    return "bf16" if free_bytes is not None and free_bytes >= needed_bytes else "nf4"


def activation_bytes(tokens_per_batch: int, hidden: int) -> int:
    """Peak activations of one scoring forward, with slack (bench-14b, H200: ~9 GiB at 32768 tokens)."""
    return tokens_per_batch * hidden * 64 + 2 * 2**30


def is_4bit(m) -> bool:
    return type(m).__name__ == "Linear4bit" and type(m).__module__.startswith("bitsandbytes")


def extra_dense_bytes(model, dtype) -> int:
    """How much more memory the model takes once every 4-bit weight is dense in `dtype`."""
    import torch

    size = torch.empty((), dtype=dtype).element_size()
    return sum(m.in_features * m.out_features * size - m.weight.data.numel() * m.weight.data.element_size()
               for m in model.modules() if is_4bit(m))


def merge_dense(model, dtype):
    """The plain causal LM with every 4-bit weight dequantized to `dtype` and the active LoRA adapters
    merged in (W + B@A*scaling, summed in fp32), one layer at a time: evaluation runs dense GEMMs only."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    _densify_(base, dtype)
    base._eval_dense = True
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the freed 4-bit blocks
    return base


def _densify_(module, dtype) -> None:
    from peft.tuners.lora import LoraLayer

    for name, child in list(module.named_children()):
        if isinstance(child, LoraLayer):
            dense = _dense_linear(child.get_base_layer(), dtype)
            w = dense.weight.data.float()
            for a in child.active_adapters:
                if a in child.lora_A:
                    if child.use_dora.get(a):
                        raise ContractError(f"--eval-precision bf16: adapter {a!r} uses DoRA (merge not supported; use nf4)")
                    w += child.get_delta_weight(a).float()
            dense.weight.data = w.to(dtype)
            setattr(module, name, dense)
        elif is_4bit(child):
            setattr(module, name, _dense_linear(child, dtype))
        else:
            _densify_(child, dtype)


def _dense_linear(layer, dtype):
    """An nn.Linear in `dtype` with the weights of `layer` (bnb 4-bit dequantized, or a plain Linear)."""
    from torch import nn

    if is_4bit(layer):
        import bitsandbytes.functional as F

        data, state = layer.weight.data, layer.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # bnb repacks for its CPU bf16 kernel on an eval forward
            data, state = F._convert_weight_packed_for_cpu_inverse(data, state)
        w = F.dequantize_4bit(data, state).to(dtype)
    else:
        w = layer.weight.data.to(dtype)
    lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    lin.weight = nn.Parameter(w, requires_grad=False)
    if layer.bias is not None:
        lin.bias = nn.Parameter(layer.bias.data.to(dtype), requires_grad=False)
    return lin


def device_of(model):
    return next(model.parameters()).device


def core(model):
    """(decoder, lm_head) of a causal LM, through a PeftModel wrapper if there is one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model, base.lm_head
