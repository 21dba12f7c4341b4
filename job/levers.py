"""Which speed levers a training run really gets on this machine (issue #12).

The config asks (train.liger, attn_implementation, fused_lora, packing, checkpoint_layers,
offload_checkpoints); the machine decides whether it can give them: Liger needs CUDA and the
liger-kernel package, flex_attention needs CUDA, Triton and a C compiler. `job check` prints
the report and refuses (exit 3) a lever the config turns on that the machine can't provide,
unless `train.require_levers: false`; the train `start` event carries the same report.
"""
from __future__ import annotations

import importlib.util
from importlib import metadata

from contracts.config import RunConfig
from contracts.errors import ContractError
from contracts.events import LEVERS  # the names, in the event schema

# A lever the machine lacks -> (the package to install, the config key that turns it off).
NEEDS = {"liger": ("liger-kernel", "train.liger"), "flex_attention": ("triton", "train.attn_implementation")}


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
    elif probe_flex and not _flex_works(on_gpu):
        out["flex_attention"] = {"on": False, "why": "flex_attention does not compile here (needs Triton and a C "
                                 "compiler)", "missing": "triton"}
    else:
        out["flex_attention"] = {"on": True, "why": f"triton {_version('triton')}" if on_gpu else attn}
    lora = t.method in ("qlora", "lora")
    out["fused_lora"] = {"on": bool(t.fused_lora and lora),
                         "why": "train.fused_lora" if lora else f"no LoRA layers (train.method: {t.method})"}
    if not t.fused_lora:
        out["fused_lora"]["why"] = "train.fused_lora: false"
    out["packing"] = {"on": bool(t.packing), "why": "padding-free rows" if t.packing else "train.packing: false"}
    if not t.gradient_checkpointing:
        n, why = 0, "train.gradient_checkpointing: false"
    elif t.checkpoint_layers is None:
        n, why = layers, "all decoder layers"
    else:
        n = min(t.checkpoint_layers, layers) if layers is not None else t.checkpoint_layers
        why = f"train.checkpoint_layers: {t.checkpoint_layers}"
    out["checkpointed_layers"] = {"on": n != 0, "layers": n, "of": layers, "why": why}
    ckpt = out["checkpointed_layers"]["on"]
    if not t.offload_checkpoints:
        out["offload"] = {"on": False, "why": "train.offload_checkpoints: false"}
    else:
        out["offload"] = {"on": bool(ckpt), "why": "checkpointed layers' inputs in pinned host memory" if ckpt
                          else "nothing is checkpointed"}
    out["fp8"] = _fp8_report(t, on_gpu, lora)
    assert tuple(out) == LEVERS
    return out


def _fp8_report(t, on_gpu: bool, lora: bool) -> dict:
    """fp8 needs fp8 tensor cores (compute capability 8.9+) and a frozen base; a card without them
    trains in bf16 (the same function at bf16 rounding): reported off with the reason, never refused."""
    if not getattr(t, "fp8", False):
        return {"on": False, "why": "train.fp8: false"}
    if not lora:
        return {"on": False, "why": f"the base is trained (train.method: {t.method}); fp8 is for frozen weights"}
    from job.fp8 import available, recipe

    ok, why = available("cuda") if on_gpu else (False, "CUDA only (fp8 tensor cores)")
    if ok:
        why += "; " + recipe(getattr(t, "fp8_fast_accum", True), getattr(t, "fp8_backward", "fp8"),
                             getattr(t, "fp8_attention", False))
    return {"on": ok, "why": why}


def missing(levers: dict) -> list[tuple[str, str, str]]:
    """(lever, package, config key) for each lever asked for but unavailable here."""
    return [(name, lv["missing"], NEEDS[name][1]) for name, lv in levers.items() if lv.get("missing")]


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


def _flex_works(on_gpu: bool) -> bool:
    from job.fast import flex_attention_works

    return flex_attention_works("cuda" if on_gpu else "cpu")


def for_this_machine(cfg: RunConfig, probe_flex: bool = True) -> dict:
    """`report` for the machine this runs on: CUDA as torch sees it, the model's decoder layer count."""
    import torch

    return report(cfg, torch.cuda.is_available(), layers=decoder_layers(cfg), probe_flex=probe_flex)


def decoder_layers(cfg: RunConfig) -> int | None:
    """The model's decoder layer count from its config (no weights); None when it can't be read."""
    from job.check import _model_config, _model_helpers

    try:
        return int(getattr(_model_config(cfg, *_model_helpers()), "num_hidden_layers"))
    except (ContractError, AttributeError, TypeError, ValueError, OSError):  # the report says "all" instead
        return None
