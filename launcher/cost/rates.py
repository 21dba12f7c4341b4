"""Training throughput per card and which cards a run fits, from configs/throughput.yaml: rates measured
on H100/H200 by bench/cost_accuracy.py, other cards derived from datasheet ratios and marked so. The
memory thresholds are the table's (measured) for LoRA and QLoRA; a full fine-tune is sized with the
job's own formula (contracts/sizing.py, in launcher/cost/hours.py)."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import yaml

from contracts.config import RunConfig
from contracts.errors import ContractError
from contracts.sizing import Shape
from launcher import resources
from launcher.gpu import parse_gpu

THROUGHPUT_FILE = resources.path("configs/throughput.yaml")


def load_throughput(path: Path = THROUGHPUT_FILE) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def card_throughput(table: dict, card: str, method: str, params_b: float, count: int = 1,
                    mode: str = "fast") -> tuple[float, float, str]:
    """(tokens/s for `count` cards, relative band, how); `mode` 'lean' reads the lean memory mode's
    measured row instead of the fast one, 'fp8' the fp8 fast mode's (a rate, not a memory mode)."""
    rows = (table.get(mode) or {}) if mode in ("lean", "fp8") else table["measured"]
    size, entry = _nearest_size(rows.get(method) or {}, params_b, method)
    ratio_how, measured, tps = "", entry, float(entry.get("tokens_per_s", 0))
    if "derived_from" in entry:  # a ratio to another method's row, measured beside it (card, date) or assumed
        base = entry["derived_from"]
        measured = _nearest_size(table["measured"][base], size, base)[1]
        tps = float(measured["tokens_per_s"]) * float(entry["ratio"])
        ratio_how = f"{base} x {entry['ratio']} " + (f"(measured on {entry['card']}, {entry['date']}) "
                                                      if entry.get("date") else "(derived) ")
    measured_card = measured.get("card") or table["reference"]
    derived = ("derived_from" in entry and not entry.get("date")) or not measured.get("date")
    label = {"lean": "lean memory mode: ", "fp8": "fp8 fast mode: "}.get(mode, "")
    how = f"{ratio_how}{label}{method} {size:g}B on {measured_card}: {tps:,.0f} tok/s ({measured.get('command', 'prior')})"
    if card != measured_card:
        a, b = table["cards"][card], table["cards"][measured_card]
        r = math.sqrt(a["tflops"] / b["tflops"] * a["tbps"] / b["tbps"])
        tps, derived = tps * r, True
        how += f"; {card} derived x{r:.2f} = sqrt(tflops {a['tflops']}/{b['tflops']} x TB/s {a['tbps']}/{b['tbps']})"
    if abs(params_b - size) / size > 0.05:
        tps, derived = tps * size / params_b, True
        how += f"; scaled x{size / params_b:.3g} for {params_b:.2f}B parameters"
    if count > 1:
        eff, eff_how = multi_gpu_efficiency(table, count)
        tps *= count * eff
        how += f"; x{count} cards x {eff} efficiency ({eff_how})"
    return tps, float(table["band_derived"] if derived else table["band_measured"]), how


def multi_gpu_efficiency(table: dict, count: int) -> tuple[float, str]:
    """(scaling efficiency for `count` GPUs, where it comes from): a measured row (bench/scale.py) serves
    up to the GPU count it was measured at; past it the configured `multi_gpu_efficiency` stands."""
    measured = {int(n): row for n, row in (table.get("multi_gpu_efficiency_measured") or {}).items()}
    configured = float(table.get("multi_gpu_efficiency", 0.9))
    if covering := [n for n in measured if n >= count]:
        row = measured[min(covering)]
        return float(row["efficiency"]), f"measured at {min(covering)} GPUs on {row['card']}, {row['date']}"
    if measured:
        return configured, f"configured; measured only up to {max(measured)} GPUs: {measured[max(measured)]['efficiency']}"
    return configured, "configured, not measured"


def _nearest_size(by_size: dict, params_b: float, method: str) -> tuple[float, dict]:
    if not by_size:
        raise ContractError(f"train.method {method!r}: configs/throughput.yaml has no throughput for it")
    size = min(by_size, key=lambda s: abs(math.log(float(s) / params_b)))
    return float(size), by_size[size]


def rate_levers(table: dict, cfg: RunConfig, params_b: float) -> list[str]:
    """The speed levers and package versions the rate was measured with, and a warning for each lever
    this config turns off."""
    size, entry = _nearest_size(table["measured"].get(cfg.train.method) or {}, params_b, cfg.train.method)
    if "derived_from" in entry:
        size, entry = _nearest_size(table["measured"][entry["derived_from"]], size, entry["derived_from"])
    levers, packages, t = entry.get("levers"), entry.get("packages"), cfg.train
    if not levers:
        return []
    on = [f"{k} {v}" if not isinstance(v, bool) else k for k, v in levers.items() if v]
    off = [k for k, v in levers.items() if v is False]
    notes = [f"rate assumes speed levers: {', '.join(on)}" + (f" (off: {', '.join(off)})" if off else "")
             + ("; with " + ", ".join(f"{k} {v}" for k, v in packages.items()) if packages else "")]
    config_off = [name for name, is_off in (("liger", not t.liger),
                                            ("flex_attention", t.attn_implementation not in ("auto", "flex_attention")),
                                            ("fused_lora", not t.fused_lora), ("packing", not t.packing))
                  if is_off and levers.get(name)]
    if config_off:
        notes.append(f"this config turns off {', '.join(config_off)}: expect a slower run than this rate")
    return notes


def fp8_rate(table: dict, cfg: RunConfig, card: str) -> bool:
    """Whether the fp8 row applies: train.fp8, a card with fp8 tensor cores, and a row for the method."""
    return bool(cfg.train.fp8 and card in (table.get("fp8_cards") or ()) and (table.get("fp8") or {}).get(cfg.train.method))


def memory_mode(table: dict, card: str, method: str, params_b: float, wanted: str = "auto") -> str | None:
    """The memory mode the job will pick on `card` (job/check.py plan_memory decides on the machine from
    its fit; this uses the table's thresholds): 'fast' on a card with min_memory_gib, 'lean' with the lean
    mode's (where the table measured it for the method), None for neither. train.memory_mode fast never
    goes lean; lean always does."""
    have = float(table["cards"][card]["memory_gib"])
    lean_need = lean_min_memory_gib(table, method, params_b)
    lean_ok = lean_need is not None and have >= lean_need
    if wanted == "lean":
        return "lean" if lean_ok else None
    if have >= min_memory_gib(table, method, params_b):
        return "fast"
    return "lean" if lean_ok and wanted != "fast" else None


def min_memory_gib(table: dict, method: str, params_b: float) -> float:
    return float(table["min_memory_gib"][method]) * params_b / 14.0


def lean_min_memory_gib(table: dict, method: str, params_b: float) -> float | None:
    need = (table.get("lean_min_memory_gib") or {}).get(method)
    return None if need is None or not (table.get("lean") or {}).get(method) else float(need) * params_b / 14.0


def fitting_cards(table: dict, method: str, params_b: float, wanted: str = "auto") -> list[str]:
    # "-PCIE" rows are variants picked per offer (by instance name), not cards SkyPilot lists.
    return [c for c in table["cards"] if memory_mode(table, c, method, params_b, wanted) and not c.endswith("-PCIE")]


def model_shape(cfg: RunConfig) -> Shape | None:
    """The decoder's sizes where the config spells them out (random init from model.arch), else None."""
    arch = dict(cfg.model.arch or {})
    if cfg.model.init != "random" or "preset" in arch or "hidden_size" not in arch:
        return None
    h, heads = int(arch["hidden_size"]), int(arch.get("num_attention_heads", 1))
    return Shape(h, int(arch.get("intermediate_size", 4 * h)), int(arch.get("num_hidden_layers", 1)), heads,
                 int(arch.get("num_key_value_heads", heads)), int(arch.get("vocab_size", 151936)),
                 bool(arch.get("tie_word_embeddings")))


def model_params_b(cfg: RunConfig) -> float:
    """Parameters in billions: from the architecture for random init, else from the model's name."""
    if (shape := model_shape(cfg)) is not None:
        return shape.params / 1e9
    found = re.search(r"(\d+(?:\.\d+)?)\s*[bB](?![a-zA-Z])", cfg.model.id)
    return float(found.group(1)) if found else 14.0


def asked_card(gpu: Any, table: dict) -> tuple[str, int]:
    """(card, count) of --gpu ("A100:1" or a GpuSpec), refused unless the table can price the card."""
    gpu, accepted = parse_gpu(gpu), ", ".join(table["cards"])
    if why := table.get("unsupported", {}).get(gpu.name):
        raise ContractError(f"--gpu {gpu.name}: cannot run the job ({why}; accepted: {accepted})")
    if gpu.name not in table["cards"]:
        raise ContractError(f"--gpu {gpu.name}: unknown card for the cost model (accepted: {accepted})")
    return gpu.name, gpu.count
