"""The speed levers of a training run: what the config asks, what this machine can give, switching them on.

The config asks (train.liger, attn_implementation, fused_lora, packing, checkpoint_layers,
offload_checkpoints, fp8, compile); the machine decides whether it can give them: Liger needs CUDA and
the liger-kernel package, flex_attention needs CUDA, Triton and a C compiler, fp8 a card with fp8 tensor
cores. `job check` prints the report and refuses (exit 3) a lever the config turns on that the machine
can't provide, unless `train.require_levers: false`; the train `start` event carries the same report.

What each lever does to a step: its TrainSpec field's doc (contracts/config.py) and its module say it;
bench/train_throughput.py measures each (bench/RESULTS.md has the numbers). With packing (job/batches.py)
no pad token is computed, and the answer-only loss (job/loss.py) runs the lm_head on the answer tokens only.
Attention: flex_attention on CUDA (block-sparse: skips the masked blocks of packed rows; sdpa runs its
masked kernel over the whole row), sdpa elsewhere or when flex can't compile.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace
from importlib import metadata

import torch

from contracts.config import RunConfig
from contracts.errors import ContractError
from contracts.events import LEVERS  # the names, in the event schema
from job import fp8
from job.fused_lora import fuse_lora
from job.model import causal_lm_of, model_config
from job.offload import install


@dataclass(frozen=True)
class Levers:
    """The levers one training run switches on: TrainSpec's fields (contracts/config.py says what each
    does) resolved for the device; `row_len`: tokens per packed row, at least the longest sequence."""
    packing: bool = True
    row_len: int = 2048
    answer_only_loss: bool = True  # bench/ turns it off to measure the full-vocabulary loss
    liger: bool = True
    checkpoint_layers: int | None = None  # None: every decoder layer (with gradient checkpointing)
    attn_implementation: str = "sdpa"
    compile: bool = False
    fused_lora: bool = False
    offload_checkpoints: bool = False
    fp8: bool = False
    fp8_fast_accum: bool = True
    fp8_backward: str = "fp8"
    fp8_attention: bool = False


# A lever the machine may lack -> the config key that turns it off.
KEYS = {"liger": "train.liger", "flex_attention": "train.attn_implementation"}


def report(cfg: RunConfig, on_gpu: bool, layers: int | None = None, probe_flex: bool = True) -> dict:
    """lever -> {"on": bool, "why": str, ...}; "missing": package when asked for but unavailable."""
    t = cfg.train
    out: dict[str, dict] = {}
    if not t.liger:
        out["liger"] = {"on": False, "why": "train.liger: false"}
    elif not on_gpu:
        out["liger"] = {"on": False, "why": "CUDA only"}
    elif importlib.util.find_spec("liger_kernel") is None:
        out["liger"] = {"on": False, "why": "liger-kernel is not installed", "missing": "liger-kernel"}
    else:
        out["liger"] = {"on": True, "why": f"liger-kernel {_version('liger-kernel')}"}
    attn = t.attn_implementation
    wants_flex = attn == "flex_attention" or (attn == "auto" and on_gpu)
    if not wants_flex:
        why = "auto: sdpa off CUDA" if attn == "auto" else f"train.attn_implementation: {attn}"
        out["flex_attention"] = {"on": False, "why": why}
    elif probe_flex and not flex_attention_works("cuda" if on_gpu else "cpu"):
        out["flex_attention"] = {"on": False, "why": "flex_attention does not compile here (needs Triton and a C "
                                 "compiler)", "missing": "triton"}
    else:
        out["flex_attention"] = {"on": True, "why": f"triton {_version('triton')}" if on_gpu else attn}
    lora = t.method in ("qlora", "lora")
    why = ("train.fused_lora: false" if not t.fused_lora else "train.fused_lora" if lora
           else f"no LoRA layers (train.method: {t.method})")
    out["fused_lora"] = {"on": bool(t.fused_lora and lora), "why": why}
    out["packing"] = {"on": bool(t.packing), "why": "padding-free rows" if t.packing else "train.packing: false"}
    if not t.gradient_checkpointing:
        n, why = 0, "train.gradient_checkpointing: false"
    elif t.checkpoint_layers is None:
        n, why = layers, "all decoder layers"
    else:
        n = min(t.checkpoint_layers, layers) if layers is not None else t.checkpoint_layers
        why = f"train.checkpoint_layers: {t.checkpoint_layers}"
    out["checkpointed_layers"] = {"on": n != 0, "layers": n, "of": layers, "why": why}
    why = ("train.offload_checkpoints: false" if not t.offload_checkpoints else "nothing is checkpointed" if n == 0
           else "checkpointed layers' inputs in pinned host memory")
    out["offload"] = {"on": bool(t.offload_checkpoints and n != 0), "why": why}
    out["fp8"] = _fp8_report(t, on_gpu, lora)
    assert tuple(out) == LEVERS
    return out


def _fp8_report(t, on_gpu: bool, lora: bool) -> dict:
    """fp8 needs fp8 tensor cores (compute capability 8.9+) and a frozen base; a card without them
    trains in bf16 (the same function at bf16 rounding): reported off with the reason, never refused."""
    if not t.fp8:
        return {"on": False, "why": "train.fp8: false"}
    if not lora:
        return {"on": False, "why": f"the base is trained (train.method: {t.method}); fp8 is for frozen weights"}
    ok, why = fp8.available("cuda") if on_gpu else (False, "CUDA only (fp8 tensor cores)")
    if ok:
        why += "; " + fp8.recipe(t.fp8_fast_accum, t.fp8_backward, t.fp8_attention)
    return {"on": ok, "why": why}


def missing(levers: dict) -> list[tuple[str, str, str]]:
    """(lever, package, config key) for each lever asked for but unavailable here."""
    return [(name, lv["missing"], KEYS[name]) for name, lv in levers.items() if lv.get("missing")]


def refusal(levers: dict) -> str | None:
    """The one line `job check` exits 3 with, or None when every lever asked for is there."""
    gaps = missing(levers)
    if not gaps:
        return None
    name, package, key = gaps[0]
    return (f"speed lever {name} is on in the config ({key}) but this machine can't provide it: "
            f"{package} is missing or unusable ({levers[name]['why']}); install the image's "
            f"requirements/job.lock, or set {key} to turn it off, or train.require_levers: false to run slower")


def summary(levers: dict) -> str:
    """One line: `liger on, flex_attention off (CUDA only), ..., checkpointed_layers 46/48`."""
    parts = []
    for name, lv in levers.items():
        if name == "checkpointed_layers":
            parts.append(f"{name} {lv['layers'] if lv['layers'] is not None else 'all'}"
                         f"{'/' + str(lv['of']) if lv.get('of') else ''}")
        else:
            parts.append(f"{name} {'on' if lv['on'] else 'off'}" + ("" if lv["on"] else f" ({lv['why']})"))
    return ", ".join(parts)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def for_this_machine(cfg: RunConfig, probe_flex: bool = True) -> dict:
    """`report` for the machine this runs on: CUDA as torch sees it, the model's decoder layer count."""
    return report(cfg, torch.cuda.is_available(), layers=decoder_layers(cfg), probe_flex=probe_flex)


def decoder_layers(cfg: RunConfig) -> int | None:
    """The model's decoder layer count from its config (no weights); None when it can't be read."""
    try:
        return int(getattr(model_config(cfg), "num_hidden_layers"))
    except (ContractError, AttributeError, TypeError, ValueError, OSError):  # the report says "all" instead
        return None


# --- switching them on ----------------------------------------------------------------------------

def levers_for(train, device: torch.device | str) -> Levers:
    """The levers a TrainSpec asks for on `device` (rows as long as the longest allowed sequence)."""
    same = ("packing", "liger", "checkpoint_layers", "compile", "fused_lora", "offload_checkpoints",
            "fp8_fast_accum", "fp8_backward", "fp8_attention")
    attn = train.attn_implementation
    if attn == "auto":  # flex_attention skips the masked blocks of packed rows; it has no CPU backward
        attn = "flex_attention" if torch.device(device).type == "cuda" else "sdpa"
    return Levers(row_len=train.max_length, attn_implementation=attn, fp8=train.fp8 and fp8.available(device)[0],
                  **{k: getattr(train, k) for k in same})


def resolve(train, device: torch.device | str) -> Levers:
    """levers_for, with flex_attention given up for sdpa where it does not compile (said on stdout)."""
    lv = levers_for(train, device)
    if lv.attn_implementation == "flex_attention" and not flex_attention_works(device):
        print("speed: flex_attention does not compile here; using sdpa (slower with packing)", flush=True)
        lv = replace(lv, attn_implementation="sdpa")
    return lv


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


def speed_up(model: torch.nn.Module, train, device: torch.device | str, lv: Levers | None = None) -> Levers:
    """Switch the levers on in a (LoRA) model: attention, Liger, checkpointing, fused LoRA, fp8, compile."""
    lv = lv or resolve(train, device)
    set_attention(model, lv.attn_implementation)
    if lv.liger and not apply_liger(model) and torch.device(device).type == "cuda":
        print("speed: liger-kernel not installed; fused RMSNorm/SwiGLU/RoPE off (slower)", flush=True)
    set_checkpointing(model, train.gradient_checkpointing, lv.checkpoint_layers, lv.offload_checkpoints)
    fuse_lora(model, lv.fused_lora)
    if lv.fp8:
        n = fp8.enable_fp8(model, fast_accum=lv.fp8_fast_accum, backward=lv.fp8_backward,
                           names=fp8.projections(lv.fp8_attention))
        print(f"speed: fp8 (e4m3) matmuls on {n} frozen linears "
              f"({fp8.recipe(lv.fp8_fast_accum, lv.fp8_backward, lv.fp8_attention)})", flush=True)
    set_compile(model, lv.compile)
    return lv


def set_attention(model: torch.nn.Module, implementation: str) -> None:
    """sdpa (per-sequence mask from position_ids) or flex_attention (block-sparse, true varlen)."""
    causal_lm_of(model).set_attn_implementation(implementation)


def apply_liger(model: torch.nn.Module) -> bool:
    """Liger's fused RMSNorm, SwiGLU and RoPE on a Qwen2 model (CUDA + liger-kernel only)."""
    lm = causal_lm_of(model)
    if not torch.cuda.is_available() or next(lm.parameters()).device.type != "cuda":
        return False
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2  # CUDA only: imported where used
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
        install(blocks)
    return keep


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
