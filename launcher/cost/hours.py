"""The hours of a run on one card, term by term (low / expected / high, and how each was computed):
fixed terms (provisioning, image, model download and load, data, prepare, evaluation, the download
back, teardown) + training = tokens / throughput. Spot adds a preemption allowance."""
from __future__ import annotations

import math
from dataclasses import dataclass

from contracts.config import RunConfig
from contracts.sizing import (FULL_BYTES_PER_PARAM, GIB, QWEN2_5_14B, adapter_fit, fits, full_fit, lora_params,
                              output_bytes_per_param)
from launcher.cost.rates import card_throughput, fp8_rate, memory_mode, model_shape
from launcher.cost.tokens import Tokens

LOCAL_INFRA_PREFIXES = ("local", "ssh://")  # your own machines: no cloud price, no provisioning
# Bandwidth assumptions (MB/s) for low / expected / high time: cloud VM <-> Hugging Face, and laptop <-> VM.
CLOUD_MBPS = (500.0, 200.0, 60.0)
LAPTOP_MBPS = (50.0, 20.0, 5.0)
# Spot runs as a managed job: a preemption costs a restart (the fixed terms before training) plus half a
# checkpoint interval of training again. The rate is assumed, not measured (about one in ten hours).
SPOT_PREEMPTIONS_PER_H = 0.1
_NOT_RESTARTED = ("training", "checkpoints", "evaluation", "adapter download", "teardown")


@dataclass(frozen=True)
class Term:
    """One line of the hours sum, in seconds, with how it was computed."""

    name: str
    low_s: float
    expected_s: float
    high_s: float
    how: str


@dataclass(frozen=True)
class CardPlan:
    """The hours for one kind of card (every offer of that card shares them)."""

    card: str
    count: int
    tokens_per_s: float
    throughput_band: float
    throughput_how: str
    terms: tuple[Term, ...]
    memory_mode: str | None = "fast"  # fast | lean (a card too small for fast) | None (fits neither)
    checkpoint_interval_s: float = 0.0  # expected training seconds between checkpoints

    def hours(self, spot: bool = False) -> tuple[float, float, float]:
        low, exp, high = (sum(getattr(t, f) for t in self.terms) / 3600 for f in ("low_s", "expected_s", "high_s"))
        if spot:
            allowance = self.preemption_allowance()
            exp, high = exp + allowance["expected_s"] / 3600, high + allowance["high_s"] / 3600
        return low, exp, high

    def preemption_allowance(self) -> dict:
        """Preemptions x (restart + half a checkpoint interval), at SPOT_PREEMPTIONS_PER_H on the expected
        hours and at twice the rate on the high ones."""
        restart_exp = sum(t.expected_s for t in self.terms if t.name not in _NOT_RESTARTED)
        restart_high = sum(t.high_s for t in self.terms if t.name not in _NOT_RESTARTED)
        n_exp = SPOT_PREEMPTIONS_PER_H * sum(t.expected_s for t in self.terms) / 3600
        n_high = 2 * SPOT_PREEMPTIONS_PER_H * sum(t.high_s for t in self.terms) / 3600
        half = self.checkpoint_interval_s / 2
        return {"rate_per_h": SPOT_PREEMPTIONS_PER_H, "preemptions": n_exp, "restart_s": restart_exp,
                "half_interval_s": half, "expected_s": n_exp * (restart_exp + half),
                "high_s": n_high * (restart_high + half)}


def plan_card(cfg: RunConfig, table: dict, card: str, count: int, params_b: float, tokens: Tokens,
              local: bool) -> CardPlan:
    t, ev = cfg.train, cfg.eval
    mode = memory_mode(table, card, t.method, params_b, t.memory_mode)
    if t.method == "full":  # sharded over every GPU of the run (job/check.py refuses what does not fit)
        need = full_need_gib(cfg, params_b, count, tokens)
        mode = "fast" if fits(need, table["cards"][card]["memory_gib"]) else None
    rate = "fp8" if mode == "fast" and fp8_rate(table, cfg, card) else (mode or "fast")
    tps, band, how = card_throughput(table, card, t.method, params_b, count, mode=rate)
    scale = params_b / 14.0
    terms = [] if local else [
        Term("provisioning", 120, 300, 900, "SkyPilot VM from launch to SSH (typical range, not measured)"),
        Term("image / setup", 120, 300, 600, "pull the job image (~10 GB) or install the pinned lock")]
    if cfg.model.init == "pretrained":
        gb = params_b * 2
        terms.append(_transfer("model download", gb, CLOUD_MBPS, f"{gb:.1f} GB bf16 safetensors from the hub"))
    terms.append(Term("model load + 4-bit" if t.method == "qlora" else "model load", 60 * scale, 120 * scale,
                      300 * scale, f"read and quantize {params_b:.1f}B parameters"))
    if tokens.kind == "hub":
        terms.append(_transfer("dataset download", 1.4, CLOUD_MBPS, "SocSci210: 17 parquet shards, ~1.4 GB"))
    elif tokens.kind in ("raw", "prepared") and not local:
        gb = tokens.data_bytes / 1e9
        terms.append(_transfer("dataset upload", gb, LAPTOP_MBPS, f"{gb * 1000:,.0f} MB synced from your machine"))
    if tokens.kind != "prepared":
        rows = tokens.train_rows / max(cfg.data.subset, 1e-9) + tokens.test_rows
        terms.append(Term("prepare", rows / 10000, rows / 5000, rows / 2000,
                          f"split + tokenize ~{rows:,.0f} rows at 2k-10k rows/s"))
    t_exp = tokens.tokens / tps
    terms.append(Term("training", tokens.low / (tps * (1 + band)), t_exp, tokens.high / (tps * (1 - band)),
                      f"{tokens.tokens:,.0f} tokens ({tokens.steps:,} steps x {t.global_batch} rows) / "
                      f"{tps:,.0f} tok/s; band: tokens {tokens.low / tokens.tokens:.2f}-"
                      f"{tokens.high / tokens.tokens:.2f}, throughput +-{band:.0%}. {how}"
                      if tokens.tokens else "no tokens"))
    start = float(table.get("train_startup_s", 0.0))
    terms.append(Term("trainer startup", start * (1 - band), start, start * (1 + band),
                      "first step (warm-up), optimizer init, adapter save (bench/cost_accuracy.py)"))
    ckpts = tokens.steps // t.checkpoint_every if t.checkpoint_every else 0
    interval_s = t_exp * min(1.0, t.checkpoint_every / tokens.steps) if t.checkpoint_every and tokens.steps else t_exp
    ck_s = 3 * lora_bytes(cfg, params_b) / 300e6 + 2
    terms.append(Term("checkpoints", ckpts * ck_s * 0.5, ckpts * ck_s, ckpts * ck_s * 3,
                      f"{ckpts} saves of adapter + optimizer state"))
    if ev.enabled and tokens.test_rows:
        rows = tokens.test_rows if ev.rows is None else min(ev.rows, tokens.test_rows)
        prefill = rows * tokens.prompt_tokens_per_row / (tps * float(table["eval_prefill_ratio"]))
        step = table["decode_step_s"].get(card, table["decode_step_s"]["default"]) * scale
        batches = math.ceil(rows / ev.batch_size)
        models = 2 if ev.base else 1  # eval.base: the base model is evaluated on the same rows too
        e, b = (prefill + batches * ev.max_new_tokens * step) * models, float(table["band_derived"])
        terms.append(Term("evaluation", e * (1 - b), e, e * (1 + b),
                          f"{rows:,} test rows: prefill {prefill / 60:,.0f} min + decode {ev.max_new_tokens} tokens x "
                          f"{batches:,} batches at {step:.3f} s (derived)"
                          + (", twice (the adapter and the base model)" if models == 2 else "")))
    if not local and t.method == "full":
        gb = full_output_gb(params_b)
        terms.append(_transfer("model download (back)", gb, LAPTOP_MBPS,
                               f"{gb:.1f} GB of full weights (out/model) to your machine"))
    elif not local:
        mb = lora_bytes(cfg, params_b) / 1e6 + 5
        terms.append(Term("adapter download", *(10 + mb / r for r in LAPTOP_MBPS),
                          f"~{mb:,.0f} MB adapter + report to your machine"))
    if not local:
        terms.append(Term("teardown", 30, 90, 300, "billed until the cloud confirms the VM is gone"))
    return CardPlan(card=card, count=count, tokens_per_s=tps, throughput_band=band, throughput_how=how,
                    terms=tuple(terms), memory_mode=mode, checkpoint_interval_s=interval_s)


def _transfer(name: str, gb: float, mbps: tuple[float, float, float], what: str) -> Term:
    return Term(name, *(gb * 1000 / r for r in mbps), f"{what} at {mbps[2]:g}-{mbps[0]:g} MB/s (assumed)")


def lora_bytes(cfg: RunConfig, params_b: float) -> float:
    """Adapter size in fp32: the config's shape, else Qwen2.5-14B's scaled to `params_b`."""
    shape = model_shape(cfg)
    scale = 1.0 if shape else (params_b * 1e9 / QWEN2_5_14B.params) ** (2 / 3)
    return lora_params(shape or QWEN2_5_14B, cfg.lora.r, cfg.lora.target_modules) * 4 * scale


def full_need_gib(cfg: RunConfig, params_b: float, gpus: int, tokens: Tokens) -> float:
    """GiB per card of a full fine-tune sharded over `gpus`: the job's own fit (contracts/sizing.py) on the
    config's shape, else Qwen2.5-14B's with the unsharded part scaled to `params_b`; one micro-batch of
    packed rows of the data's mean length (else the rows the job assumes, up to 512 tokens)."""
    t, shape = cfg.train, model_shape(cfg)
    scale = 1.0 if shape else params_b * 1e9 / QWEN2_5_14B.params
    shape = shape or QWEN2_5_14B
    row = int(tokens.tokens / max(tokens.trained_rows, 1)) + 1 if t.packing else min(t.max_length, 512)
    acts = adapter_fit(shape, method="full", lora_r=cfg.lora.r, tokens=t.micro_batch * row, micro_batch=t.micro_batch,
                       gradient_checkpointing=t.gradient_checkpointing, checkpoint_layers=t.checkpoint_layers,
                       fused_lora=t.fused_lora, offload_checkpoints=t.offload_checkpoints)["activations_gib"]
    fit = full_fit(shape, world=gpus, precision=t.precision, activations_gib=acts)
    return params_b * 1e9 * FULL_BYTES_PER_PARAM / max(gpus, 1) / GIB + (fit["total_gib"] - fit["sharded_gib"]) * scale


def full_output_gb(params_b: float) -> float:
    """out/model/ of a full fine-tune, bf16 safetensors: pulled back to your machine by default."""
    return params_b * output_bytes_per_param("bf16")


def full_output_note(params_b: float) -> str:
    """What a full fine-tune brings back: its size and the download time at the assumed laptop bandwidth."""
    gb = full_output_gb(params_b)
    lo, exp, hi = (gb * 1000 / r for r in LAPTOP_MBPS)
    return (f"output: the full fine-tune's weights, ~{gb:.1f} GB ({output_bytes_per_param('bf16')} bytes x "
            f"{params_b:.1f}B params, bf16 safetensors in out/model), pulled back to this machine by default: "
            f"~{exp / 60:,.0f} min at {LAPTOP_MBPS[1]:g} MB/s ({lo / 60:,.0f}-{hi / 60:,.0f} min at "
            f"{LAPTOP_MBPS[0]:g}-{LAPTOP_MBPS[2]:g} MB/s, assumed); the machine is billed until it is done")
