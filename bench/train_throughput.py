"""QLoRA training throughput on the Qwen2.5-14B architecture: the plain HF stack beside the project's path.

One process builds the 14B (random weights, real shapes, NF4 via job/model.py's GPU builder) once,
then trains each variant for a few optimizer steps at global batch 256 on sequences whose lengths
follow SocSci210 (bench/socsci210_lengths.json: full 16-field profiles, Qwen2.5 BPE, chat template).
LoRA adapters are re-created with the same seed for every variant; the data and its order are the
same for all. Tokens = non-pad tokens. MFU = tokens/s x 4 x 14.8e9 FLOPs over a bf16 8192^3 matmul
ceiling measured in the same run.

    python bench/train_throughput.py --tiny                   # CPU dry run of every code path
    python bench/train_throughput.py --levers --out $OUT      # device: each lever added in turn
    python bench/train_throughput.py --final --out $OUT       # device: baseline vs ours, loss curves
    python bench/train_throughput.py --final --targets learnable --baseline-seeds 42,42 --lora-dropout 0 \
        --ours "packing,answer,fp8,mb=32" --global-batch 32 --lr 3e-4
        # the loss check (loss_check): each variant against the plain stack at the same LoRA seed,
        # beside the plain stack run twice (same seed, data, order: the noise), on answers it can learn

Baseline = what a plain transformers + peft + bitsandbytes script does: prepare_model_for_kbit_training
(frozen weights upcast to fp32, reentrant checkpointing), LoRA on the 7 projections, right-padded
micro-batches of the config's micro_batch, the model's own loss over full-sequence logits, bf16
autocast, paged 8-bit AdamW. Ours = job/levers.py's Levers as job/sft.py switches them on. `--method lora`: the same
random weights kept in bf16 (no NF4), the plain stack without the fp32 upcast (bf16 frozen weights,
reentrant checkpointing), every variant on that base.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from contracts.config import LoraSpec, TrainSpec  # noqa: E402
from bench import reference  # noqa: E402
from job.batches import IGNORE_INDEX, count_targets  # noqa: E402
from job.fused_lora import fuse_lora  # noqa: E402
from job.levers import Levers, apply_liger, set_attention, set_checkpointing, set_compile  # noqa: E402

FLOPS_PER_TOKEN_14B = 4 * 14.8e9
LENGTHS = Path(__file__).with_name("socsci210_lengths.json")


@dataclass(frozen=True)
class Variant:
    name: str
    baseline: bool = False
    micro_batch: int = 8
    levers: Levers = field(default_factory=lambda: Levers(liger=False, answer_only_loss=False))
    gc: bool = True
    note: str = ""
    seed: int | None = None
    """The LoRA seed (A's init, dropout masks); None: the config's. The data never changes with it."""


def lever_sweep(mb: int) -> list[Variant]:
    """Each row adds one lever to the row above (the liger rows last: its patch can't be undone)."""
    L = Levers
    off = L(packing=False, answer_only_loss=False, liger=False)
    return [
        Variant("baseline (plain HF)", baseline=True, micro_batch=mb, levers=off),
        Variant("+ frozen bf16, non-reentrant GC", micro_batch=mb, levers=off),
        Variant("+ packing (rows of 2048)", micro_batch=mb, levers=replace(off, packing=True)),
        Variant("+ answer-only loss", micro_batch=mb, levers=L(liger=False)),
        Variant("+ micro-batch 32", micro_batch=32, levers=L(liger=False)),
        Variant("+ micro-batch 64", micro_batch=64, levers=L(liger=False)),
        Variant("+ liger rmsnorm/swiglu/rope (mb 32)", micro_batch=32, levers=L(liger=True)),
        Variant("+ rows of 1024 (mb 32)", micro_batch=32, levers=L(liger=True, row_len=1024)),
        Variant("+ GC on 40 of 48 layers (mb 32)", micro_batch=32, levers=L(liger=True, checkpoint_layers=40)),
        Variant("+ GC on 24 of 48 layers (mb 16)", micro_batch=16, levers=L(liger=True, checkpoint_layers=24)),
        Variant("+ no GC (mb 8)", micro_batch=8, levers=L(liger=True), gc=False),
        Variant("+ flex_attention (mb 32)", micro_batch=32, levers=L(liger=True, attn_implementation="flex_attention")),
    ]


def final_pair(mb: int, ours: list[Variant], seeds: list[int] | None = None) -> list[Variant]:
    plain = Levers(packing=False, answer_only_loss=False, liger=False)
    if not seeds:
        return [Variant("baseline (plain HF)", baseline=True, micro_batch=mb, levers=plain), *ours]
    runs = [seeds[:i + 1].count(s) for i, s in enumerate(seeds)]  # a seed listed again: the repeat
    return [*(Variant(f"baseline (plain HF) seed {s}" + (f" run {n}" if n > 1 else ""), baseline=True,
                      micro_batch=mb, levers=plain, seed=s) for s, n in zip(seeds, runs)), *ours]


# --- data ---------------------------------------------------------------------------------------

# --targets learnable: every answer token is one of these 8 ids, drawn with weights 1/1 .. 1/8 (a
# SocSci210 answer is one option of a short scale). A model can learn that in a few steps, so the loss
# falls (from ~ln(vocab) + its logit spread, ~13 nats, toward the answers' entropy, 1.82 nats) and the
# loss check compares learning curves, not how runs wander on targets nothing can predict.
ANSWER_IDS = tuple(range(1000, 1008))
ANSWER_WEIGHTS = tuple(1 / (i + 1) for i in range(len(ANSWER_IDS)))
TARGETS = ("random", "learnable")


def make_examples(n: int, vocab: int, seed: int, tiny: bool, targets: str = "random") -> list[dict]:
    """`n` sequences with SocSci210's prompt/answer token lengths; loss on the answer only. Prompts are
    random ids; answers are random ids too ("random") or drawn from ANSWER_IDS ("learnable")."""
    pairs = json.loads(LENGTHS.read_text())["prompt_answer"]
    rng, answers = random.Random(seed), random.Random(seed + 1)  # two streams: the same lengths and prompts either way
    out = []
    for _ in range(n):
        p, a = rng.choice(pairs)
        if tiny:
            p = max(4, p // 8)
        ids = [rng.randrange(10, vocab) for _ in range(p + a)]
        if targets == "learnable":
            ids[p:] = answers.choices(ANSWER_IDS, weights=ANSWER_WEIGHTS, k=a)
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * p + ids[p:]})
    return out


# --- model --------------------------------------------------------------------------------------

def build_base(tiny: bool, device: torch.device, dtype: torch.dtype, seed: int, method: str = "qlora"):
    """The frozen base: NF4 (qlora) or bf16 weights (lora), the same random draw either way."""
    from transformers import Qwen2Config

    from job.model import PRESETS, build_random

    arch = dict(PRESETS["qwen2-tiny" if tiny else "qwen2.5-14b"])
    arch["vocab_size"] = 1024 if tiny else 152064
    base = build_random(Qwen2Config(**arch), device, dtype, quantize=method == "qlora", seed=seed)
    base.config.use_cache = False
    # what from_pretrained(BitsAndBytesConfig) sets; peft picks its 4-bit LoRA layer by it
    base.is_loaded_in_4bit = method == "qlora"
    return base


def attach_lora(base, v: Variant, lora: LoraSpec, seed: int, dtype: torch.dtype):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    for p in base.parameters():
        p.requires_grad_(False)
    if v.baseline and getattr(base, "is_loaded_in_4bit", False):
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=v.gc)
    elif v.baseline:  # plain LoRA on a bf16 base: the weights stay bf16 (prepare_model_for_kbit_training would upcast them to fp32)
        if v.gc:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            base.enable_input_require_grads()
    else:
        reference.frozen_to(base, dtype)
    torch.manual_seed(seed)
    lc = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                    target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base, lc)
    if not v.baseline:
        set_checkpointing(model, v.gc, v.levers.checkpoint_layers, v.levers.offload_checkpoints)
        set_attention(model, v.levers.attn_implementation)
        if v.levers.liger and not apply_liger(model):
            print("  (liger not available here: kernels unchanged)")
        fuse_lora(model, v.levers.fused_lora)
        set_compile(model, v.levers.compile)
        if v.levers.fp8:
            from job.fp8 import enable_fp8, projections, recipe
            lv = v.levers
            n = enable_fp8(model, fast_accum=lv.fp8_fast_accum, backward=lv.fp8_backward, names=projections(lv.fp8_attention))
            print(f"  fp8 on {n} frozen linears ({recipe(lv.fp8_fast_accum, lv.fp8_backward, lv.fp8_attention)})")
    model.train()
    return model


def detach_lora(model):
    set_compile(model, False)  # the base's layers outlive the variant: eager for the next one
    from job.fp8 import enable_fp8
    enable_fp8(model, False)
    base = model.unload()
    base.gradient_checkpointing_disable()
    base.disable_input_require_grads()  # prepare_model_for_kbit_training's hook: the baseline's only
    base.set_attn_implementation("sdpa")
    return base


def optimizer_for(model, lr: float, weight_decay: float, device: torch.device):
    params = [p for p in model.parameters() if p.requires_grad]
    if device.type == "cuda":
        import bitsandbytes as bnb
        return bnb.optim.PagedAdamW8bit(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


# --- one variant --------------------------------------------------------------------------------

def run_variant(base, v: Variant, examples: list[dict], steps: int, gb: int, spec: TrainSpec, lora: LoraSpec,
                device: torch.device, dtype: torch.dtype, deadline: float) -> dict:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    seed = spec.seed if v.seed is None else v.seed  # the LoRA seed: the variant's own, else the config's
    model = attach_lora(base, v, lora, seed, dtype)
    opt = optimizer_for(model, spec.lr, spec.weight_decay, device)
    timed_tokens, timed_s, micro_seen = 0, 0.0, 0
    losses, step_s = [], []
    state = {"t": 0.0}

    def tick(batch: dict) -> None:  # after each micro-batch: the first one (warm-up, kernel compiles) isn't timed
        nonlocal timed_tokens, timed_s, micro_seen
        sync()
        now = time.perf_counter()
        if micro_seen >= 1:
            timed_s += now - state["t"]
            timed_tokens += real_tokens(batch)
        micro_seen += 1
        state["t"] = now

    error = None
    try:
        for s in range(steps):
            if time.perf_counter() > deadline and s >= 1:
                print(f"  time budget reached after {s} steps")
                break
            group = examples[s * gb:(s + 1) * gb]
            t0 = time.perf_counter()
            sync()
            state["t"] = time.perf_counter()
            if v.baseline:
                loss = plain_hf_step(model, opt, group, v.micro_batch, device, dtype, tick)
            else:
                mbs = reference.micro_batches(group, v.micro_batch, v.levers, pad_id=0)
                loss = reference.step(model, opt, mbs, v.levers, device, dtype, after_micro=tick)
            sync()
            step_s.append(time.perf_counter() - t0)
            losses.append(loss)
            print(f"  step {s + 1}: loss {loss:.4f}  {step_s[-1]:.1f}s", flush=True)
    except torch.OutOfMemoryError as e:
        error = "OOM"
        print(f"  OOM: {str(e).splitlines()[0][:160]}")
    except Exception as e:  # noqa: BLE001 - one lever failing must not lose the other rows
        error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        print(f"  failed: {error}")
        print("  " + "".join(traceback.format_exc().splitlines(keepends=True)[-30:]), flush=True)  # a bare assert says nothing
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    dynamo = None
    if v.levers.compile:  # how much really compiled: graphs, recompiles, graph-break reasons
        c = torch._dynamo.utils.counters
        dynamo = {"stats": dict(c["stats"]), "graph_breaks": dict(list(c["graph_break"].items())[:8]),
                  "recompiles": dict(list(c["recompiles"].items())[:4]) if "recompiles" in c else {}}
        print(f"  dynamo: {json.dumps(dynamo, default=str)[:1500]}", flush=True)
    del opt
    model.zero_grad(set_to_none=True)
    base = detach_lora(model)
    step_tokens = [sum(len(e["input_ids"]) for e in examples[s * gb:(s + 1) * gb]) for s in range(len(step_s))]
    steady = sum(step_tokens[1:]) / sum(step_s[1:]) if len(step_s) > 1 else None
    return {"name": v.name, "baseline": v.baseline, "seed": seed,
            "steady_tokens_per_s": steady, "micro_batch": v.micro_batch, "gc": v.gc,
            "levers": asdict(v.levers), "steps": len(losses), "losses": losses, "step_s": step_s,
            "tokens_per_s": timed_tokens / timed_s if timed_s else None, "timed_tokens": timed_tokens,
            "peak_gib": peak, "error": error, "dynamo": dynamo, "_base": base}


def real_tokens(batch: dict) -> int:
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    # Packed: the tail segment of a row is padding; real sequences all carry at least one target.
    return int(_packed_real(batch))


def _packed_real(batch: dict) -> int:
    pos, lab = batch["position_ids"], batch["labels"]
    n = 0
    for r in range(pos.shape[0]):
        starts = (pos[r] == 0).nonzero().flatten().tolist() + [pos.shape[1]]
        for a, b in zip(starts[:-1], starts[1:]):
            if (lab[r, a:b] != IGNORE_INDEX).any():
                n += b - a
    return n


def plain_hf_step(model, opt, group: list[dict], mb: int, device, dtype, tick) -> float:
    """The plain loop: padded micro-batches, the model's own loss, normalized over the global batch
    (transformers' Trainer passes num_items_in_batch the same way)."""
    batches = [reference.collate_padded(group[i:i + mb], pad_id=0) for i in range(0, len(group), mb)]
    total = sum(count_targets(b) for b in batches)
    loss_sum = 0.0
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            out = model(**b, num_items_in_batch=torch.tensor(total, device=device), use_cache=False)
        out.loss.backward()
        loss_sum += float(out.loss.detach()) * total
        tick(b)
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss_sum / total


# --- the ceiling and the table ---------------------------------------------------------------------

def matmul_ceiling(device: torch.device, tiny: bool) -> float:
    n = 512 if tiny else 8192
    dt = torch.float32 if device.type == "cpu" else torch.bfloat16
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    iters = 5 if tiny else 50
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync()
    return 2 * n ** 3 * iters / (time.perf_counter() - t)


def rate(r: dict) -> float | None:
    """Whole optimizer steps after the first when there are some; else micro-batches after the first."""
    return r.get("steady_tokens_per_s") or r["tokens_per_s"]


def table(rows: list[dict], card: str, ceiling: float, flops_per_token: float) -> str:
    base = next((r for r in rows if r["baseline"] and rate(r)), None)
    lines = [f"card: {card}   bf16 matmul ceiling: {ceiling / 1e12:.0f} TFLOP/s   "
             f"MFU = tokens/s x {flops_per_token:.3g} / ceiling; tokens/s over steps 2+ where a row has them",
             "", "| variant | micro-batch | tokens/s | MFU | peak GiB | x baseline | loss, first steps |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        tps = rate(r)
        mfu = f"{100 * tps * flops_per_token / ceiling:.1f}%" if tps else "-"
        ratio = f"{tps / rate(base):.2f}x" if tps and base else "-"
        losses = " ".join(f"{x:.3f}" for x in r["losses"][:6]) + (" ..." if len(r["losses"]) > 6 else "")
        err = (r["error"] or "-")[:60]
        lines.append(f"| {r['name']} | {r['micro_batch']} | {f'{tps:,.0f}' if tps else err} | {mfu} | "
                     f"{r['peak_gib']:.1f} | {ratio} | {losses or err} |")
    return "\n".join(lines)


def loss_table(rows: list[dict]) -> str:
    """Loss per optimizer step, every row beside the baseline of its seed, and the largest gap to it."""
    bases = [r for r in rows if r["baseline"] and r["losses"]]
    others = [r for r in rows if not r["baseline"] and r["losses"]]
    if not bases or not others:
        return ""
    shown = [*bases, *others]
    n = max(len(r["losses"]) for r in shown)
    lines = ["| step | " + " | ".join(r["name"] for r in shown) + " |", "|---" * (1 + len(shown)) + "|"]
    for i in range(n):
        cell = lambda r: f"{r['losses'][i]:.4f}" if i < len(r["losses"]) else "-"  # noqa: E731
        lines.append(f"| {i + 1} | " + " | ".join(cell(r) for r in shown) + " |")
    for r in others:
        base = _baseline_of(r, bases)
        k = min(len(r["losses"]), len(base["losses"]))
        gap = max(abs(a - b) for a, b in zip(r["losses"][:k], base["losses"][:k]))
        steps = [b - a for a, b in zip(base["losses"][:k], base["losses"][1:k])]
        spread = max(abs(x) for x in steps) if steps else float("nan")
        lines.append(f"\n{r['name']}: largest |ours - baseline| over {k} steps {gap:.4f}; "
                     f"the baseline's own largest step-to-step change {spread:.4f}")
    check = loss_check(rows)
    if check:
        lines += ["", "Within noise? Each row against the plain stack's first run at its LoRA seed, beside the "
                  "plain stack's second run at that seed (same seed, data, order): the step-1 difference (the bias "
                  "test) and the RMS of the per-step difference over all steps and the later half, each strictly "
                  f"under the repeat's (at least {NOISE_FLOOR_NATS} nats)."]
        for c in check:
            lines.append(f"- {c['name']}: step 1 {c['step1']:+.4f} vs repeat {c['noise_step1']:.4f} "
                         f"({'ok' if c['bias_ok'] else 'BIAS'}); RMS {c['rms']:.4f} (later half {c['rms_late']:.4f}, "
                         f"mean there {c['mean_late']:+.4f}) vs repeat {c['noise_rms']:.4f} ({c['noise_rms_late']:.4f}) "
                         f"over {c['steps']} steps ({'ok' if c['curve_ok'] else 'CURVE'}): "
                         f"{'WITHIN noise' if c['within'] else 'NOT within noise'}")
    return "\n".join(lines)


def _baseline_of(r: dict, bases: list[dict]) -> dict:
    return next((b for b in bases if b.get("seed") == r.get("seed")), bases[0])


def _rms(xs: list[float]) -> float:
    return (sum(x * x for x in xs) / len(xs)) ** 0.5 if xs else float("nan")


# The least noise the loss check allows, in nats. The plain stack run twice can agree bit for bit (on
# the CPU always, on a GPU at step 1, whose forward is deterministic), and a zero noise would fail every
# variant that merely sums in another order (fp32: ~1e-6 nats; round 8's bf16 levers moved step 1 by
# 0.0008). 0.01 nats is a 1% change in the answers' likelihood (e^0.01), 9x under the smallest shift
# the check must catch (a constant 0.09 nats, what fp8 on the MLP did to step 1 in round 8).
NOISE_FLOOR_NATS = 0.01


def loss_check(rows: list[dict]) -> list[dict]:
    """The loss check, decided by a rule fixed before any row runs. The noise is the plain stack run
    twice with the same LoRA seed, data and order (`--baseline-seeds 42,42`): what its own kernels'
    nondeterminism does to the curve. A variant at seed s is compared with the plain stack's first run
    at seed s, and is within noise when, strictly,
      - bias at step 1 (LoRA B = 0: same weights, same batch, so only arithmetic can differ):
        |variant - plain| at step 1 < |second run - first run| at step 1;
      - the curve: RMS over steps of (variant - plain) < the repeat's RMS, over all compared steps and
        over their later half (where a slow drift shows);
    each noise raised to NOISE_FLOOR_NATS where the repeat differs by less. Rows whose seed has no
    repeated plain run are not judged; [] when no seed has one."""
    runs: dict[int, list[list[float]]] = {}
    for r in rows:
        if r["baseline"] and r["losses"]:
            runs.setdefault(r["seed"], []).append(r["losses"])
    out = []
    for r in rows:
        pair = runs.get(r["seed"], [])
        if r["baseline"] or not r["losses"] or len(pair) < 2:
            continue
        first, second = pair[0], pair[1]
        k = min(len(r["losses"]), len(first), len(second))
        if k < 2:
            continue
        gap = [a - b for a, b in zip(r["losses"][:k], first[:k])]
        rep = [b - a for a, b in zip(first[:k], second[:k])]
        h = k // 2
        c = {"name": r["name"], "seed": r["seed"], "steps": k,
             "step1": gap[0], "rms": _rms(gap), "rms_late": _rms(gap[h:]), "mean_late": sum(gap[h:]) / (k - h),
             "noise_step1": abs(rep[0]), "noise_rms": _rms(rep), "noise_rms_late": _rms(rep[h:])}
        c["bias_ok"] = abs(c["step1"]) < max(c["noise_step1"], NOISE_FLOOR_NATS)
        c["curve_ok"] = (c["rms"] < max(c["noise_rms"], NOISE_FLOOR_NATS)
                         and c["rms_late"] < max(c["noise_rms_late"], NOISE_FLOOR_NATS))
        c["within"] = c["bias_ok"] and c["curve_ok"]
        out.append(c)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--levers", action="store_true", help="add the levers one at a time (1-2 steps each)")
    mode.add_argument("--final", action="store_true", help="baseline vs ours only, more steps")
    ap.add_argument("--method", choices=("qlora", "lora"), default="qlora",
                    help="the frozen base: 4-bit NF4 (qlora) or bf16 (lora); the plain stack and every variant train on it")
    ap.add_argument("--tiny", action="store_true", help="tiny Qwen2 on the CPU: checks every code path, no timing meaning")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per variant (default: levers 1, final 20)")
    ap.add_argument("--baseline-steps", type=int, default=None, help="final mode: baseline steps (default --steps)")
    ap.add_argument("--ours", default="packing,answer,liger,mb=32",
                    help="final mode: ours as comma-separated levers (packing, answer, liger, flex, fused, offload, compile, fp8 (the MLP's projections), fp8attn (fp8 on attention's q/o too), fp8mlp (= fp8), exact (fp8's forward without fast accumulation), dxbf16 (fp8's dx in bf16), rows=N, mb=N, gc=K|all|none, seed=N (LoRA seed)); "
                         "several variants separated by ';'")
    ap.add_argument("--max-gib", type=float, default=36.0,
                    help="final mode: best.json names the fastest 'ours' row whose peak fits this many GiB")
    ap.add_argument("--global-batch", type=int, default=None,
                    help="sequences per optimizer step (default: the config's 256; smaller for a many-step loss comparison)")
    ap.add_argument("--lr", type=float, default=None, help="constant learning rate (default: the config's 1e-5)")
    ap.add_argument("--lora-dropout", type=float, default=None,
                    help="LoRA dropout (default: the config's 0.05). The loss check runs with 0: packed rows and "
                         "padded micro-batches draw their dropout masks over other layouts, a random difference "
                         "the repeat of the plain stack does not have")
    ap.add_argument("--targets", choices=TARGETS, default="random",
                    help="answers: random ids (nothing to learn) or drawn from 8 ids a model can learn (the loss check)")
    ap.add_argument("--baseline-seeds", default=None,
                    help="final mode: run the baseline once per LoRA seed listed (comma-separated); a seed listed "
                         "twice (42,42) runs it twice with the same seed, data and order: the loss check's noise")
    ap.add_argument("--baseline-mb", type=int, default=None, help="the baseline's micro-batch (default: the config's 8)")
    ap.add_argument("--only", default=None, help="levers mode: comma-separated row numbers to run (1-based)")
    ap.add_argument("--budget-s", type=float, default=420, help="stop starting new steps after this many seconds")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for train_throughput.json")
    args = ap.parse_args()
    # every --ours variant parsed before anything is built: a bad lever is refused at once, not after the model
    ours = [parse_ours(o, args.tiny) for o in args.ours.split(";") if o.strip()] if args.final else []
    t_start = time.perf_counter()
    deadline = t_start + args.budget_s

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (tiny; numbers mean nothing)"
    spec, lora = TrainSpec(), LoraSpec()  # the paper config's schedule and LoRA (configs/paper.yaml)
    if args.lr:
        spec = replace(spec, lr=args.lr)
    if args.lora_dropout is not None:
        lora = replace(lora, dropout=args.lora_dropout)
    gb = 16 if args.tiny else (args.global_batch or spec.global_batch)
    print(f"card: {card}  torch {torch.__version__}  {args.method}  lr {spec.lr:g} (constant)", flush=True)
    ceiling = matmul_ceiling(device, args.tiny)
    print(f"bf16 matmul ceiling: {ceiling / 1e12:.1f} TFLOP/s", flush=True)

    t = time.perf_counter()
    base = build_base(args.tiny, device, dtype, spec.seed, args.method)
    n_params = sum(p.numel() * (2 if type(p).__name__ == "Params4bit" else 1) for p in base.parameters())
    flops_per_token = FLOPS_PER_TOKEN_14B if not args.tiny else 4 * n_params
    build_s = time.perf_counter() - t
    mem = torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    print(f"built in {build_s:.0f}s, {mem:.1f} GiB on the card", flush=True)

    mb = 4 if args.tiny else (args.baseline_mb or spec.micro_batch)
    if args.final:
        seeds = [int(x) for x in args.baseline_seeds.split(",")] if args.baseline_seeds else None
        variants = final_pair(mb, ours, seeds)
        steps = args.steps or (3 if args.tiny else 20)
        base_steps = args.baseline_steps or steps
    else:
        variants = lever_sweep(mb)
        if args.tiny:  # tiny micro-batches so the packed rows still split a global batch of 16
            variants = [replace(v, micro_batch=max(2, v.micro_batch // 8)) for v in variants]
        if args.only:
            keep = {int(x) for x in args.only.split(",")}
            variants = [v for i, v in enumerate(variants, 1) if i in keep]
        steps = args.steps or 1
        base_steps = steps
    n_steps = max(steps, base_steps)
    vocab = base.config.vocab_size
    examples = make_examples(gb * n_steps, vocab, spec.seed, args.tiny, args.targets)

    rows: list[dict] = []
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for v in variants:
        k = base_steps if v.baseline else steps
        print(f"\n== {v.name}: micro_batch {v.micro_batch}, {k} steps of {gb}", flush=True)
        if time.perf_counter() > deadline:
            print("  skipped: time budget")
            continue
        r = run_variant(base, v, examples, k, gb, spec, lora, device, dtype, deadline)
        base = r.pop("_base")
        rows.append(r)
        print(f"  tokens/s {r['tokens_per_s'] or 0:,.0f}  peak {r['peak_gib']:.1f} GiB", flush=True)
        dump(out_dir, card, ceiling, flops_per_token, build_s, rows, args)
    text = table(rows, card, ceiling, flops_per_token)
    if args.final:
        text += (f"\n\nLoss per optimizer step (same data and order; {args.targets} answers):\n\n"
                 + loss_table(rows))
    print("\n" + text)
    if args.final:
        best = best_within(rows, args.max_gib)
        (out_dir / "best.json").write_text(json.dumps(best, indent=1) + "\n")
        print(f"\nbest within {args.max_gib:g} GiB: {best}")
    (out_dir / "train_throughput.md").write_text(text + "\n")
    print(f"\ntotal {time.perf_counter() - t_start:.0f}s")
    return 0


# --ours switches: each name sets these Levers fields.
SWITCHES = {"packing": {"packing": True}, "answer": {"answer_only_loss": True}, "liger": {"liger": True},
            "flex": {"attn_implementation": "flex_attention"}, "fused": {"fused_lora": True},
            "offload": {"offload_checkpoints": True}, "compile": {"compile": True},
            "fp8": {"fp8": True}, "exact": {"fp8_fast_accum": False}, "dxbf16": {"fp8_backward": "bf16"},
            # fp8mlp: the name round 8 measured the MLP-only recipe under, before it became fp8's default
            "fp8attn": {"fp8": True, "fp8_attention": True}, "fp8mlp": {"fp8": True, "fp8_attention": False}}


def parse_ours(spec: str, tiny: bool) -> Variant:
    lv = Levers(packing=False, answer_only_loss=False, liger=False)
    mb, gc_on, seed = 8, True, None
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        key, _, val = item.partition("=")
        if key in SWITCHES and not val:
            lv = replace(lv, **SWITCHES[key])
        elif key == "rows":
            lv = replace(lv, row_len=int(val))
        elif key == "mb":
            mb = int(val)
        elif key == "seed":
            seed = int(val)
        elif key == "gc":
            gc_on = val != "none"
            lv = replace(lv, checkpoint_layers=None if val in ("none", "all") else int(val))
        else:
            raise SystemExit(f"--ours: {item!r} is not accepted ({', '.join(SWITCHES)}, rows=N, mb=N, "
                             "gc=K|all|none, seed=N)")
    if tiny:
        mb = max(2, mb // 8)
    return Variant(f"ours ({spec})", micro_batch=mb, levers=lv, gc=gc_on, seed=seed)


def best_within(rows: list[dict], max_gib: float) -> dict | None:
    """The fastest non-baseline row (steady rate) whose peak memory fits `max_gib` and which the loss check
    did not judge outside the noise (a row it could not judge stays in), with the baseline's rate."""
    base = next((r for r in rows if r["baseline"] and rate(r)), None)
    outside = {c["name"] for c in loss_check(rows) if not c["within"]}
    fits = [r for r in rows if not r["baseline"] and rate(r) and not r["error"] and not r["peak_gib"] > max_gib
            and r["name"] not in outside]
    if not fits:
        return None
    b = max(fits, key=rate)
    return {"name": b["name"], "micro_batch": b["micro_batch"], "checkpoint_layers": b["levers"]["checkpoint_layers"],
            "steady_tokens_per_s": rate(b), "peak_gib": b["peak_gib"],
            "baseline_tokens_per_s": rate(base) if base else None,
            "ratio": rate(b) / rate(base) if base else None}


def dump(out_dir: Path, card, ceiling, fpt, build_s, rows, args) -> None:
    (out_dir / "train_throughput.json").write_text(json.dumps({
        "card": card, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "argv": sys.argv[1:], "method": args.method,
        "matmul_ceiling_flops": ceiling, "flops_per_token": fpt, "build_s": build_s,
        "lengths": json.loads(LENGTHS.read_text())["meta"], "targets": args.targets,
        "loss_check": loss_check(rows), "rows": rows}, indent=1, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
