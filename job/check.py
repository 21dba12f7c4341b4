"""`python -m job check`: the card, a real 4-bit self-test, disk, and whether the config fits.

A machine that can't run the config fails with one line (exit 3): no GPU (unless allow_cpu), no
bf16 for a bf16 config, a failing NF4 self-test, too little disk, too little GPU memory, or a speed
lever the config turns on that the machine can't provide (job/levers.py; `train.require_levers:
false` runs without it). It prints which levers are really on.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

from contracts.config import RunConfig, load_config
from contracts.errors import ContractError
from contracts.events import EventWriter
from contracts.sizing import (FIT_SHARE, FULL_BYTES_PER_PARAM, MIN_FREE_GIB, Shape, adapter_fit, base_download_gib,
                              full_disk, full_fit)
from job import dist, env
from job.errors import JobCannotRun

env.quiet_bnb_cpu_notice()

NF4_TOLERANCE = 0.2  # NF4 keeps ~3.5 bits: relative matmul error is ~0.1; garbage would be ~1.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="configs/paper.yaml", help="run config to check the machine against")
    p.add_argument("--data", default=None, help="a `job prepare` folder: its p90 row length sizes the activations")
    p.add_argument("--out", default=None, help="write check.json and events.jsonl here")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    events = EventWriter(Path(args.out) / "events.jsonl", echo=True) if args.out else None
    if events:
        events.emit("start", verb="check", config=cfg.name)
    try:
        report = check(cfg, Path(args.data) if args.data else None, Path(args.out or "."))
    except JobCannotRun as e:
        if events:
            events.emit("check", ok=False, reason=str(e))
        raise
    if events:
        events.emit("check", ok=True, **{k: report[k] for k in ("card", "nf4", "fit", "disk_free_gib", "mode", "levers")})
    if args.out:
        Path(args.out, "check.json").write_text(json.dumps(report, indent=2) + "\n")
    c, f = report["card"], report["fit"]
    print(f"card: {c['name']} x{c['gpus']}, {c['memory_gib']} GiB, capability {c['capability']}, "
          f"CUDA {c['cuda']}, driver {c['driver']}, bf16 {c['bf16']}")
    print(f"nf4 self-test: relative error {report['nf4']['rel_error']:.4f} (limit {NF4_TOLERANCE}) on {report['nf4']['device']}")
    print(f"disk free: {report['disk_free_gib']} GiB")
    if cfg.train.method == "full":
        print(f"fit: {cfg.model.id} ({f['params'] / 1e9:.2f}B params, full, sharded over {f['world']} GPU(s)) needs "
              f"~{f['total_gib']} GiB per GPU (weights+grads+AdamW {f['sharded_gib']}, gathered layers "
              f"{f['gathered_gib']}, activations {f['activations_gib']}) of {f['available_gib']} GiB: ok")
    else:
        print(f"fit: {cfg.model.id} ({f['params'] / 1e9:.2f}B params, {cfg.train.method}) needs ~{f['total_gib']} GiB "
              f"(base {f['base_gib']}, LoRA+optimizer {f['lora_gib']}, activations {f['activations_gib']}) "
              f"of {f['available_gib']} GiB: ok")
    m = report["mode"]
    print(f"memory mode: {m['mode']} ({m['why']}): micro_batch {m['micro_batch']}, checkpointed layers "
          f"{'all' if m['checkpoint_layers'] is None else m['checkpoint_layers']}, offloaded checkpoints "
          f"{'on' if m['offload_checkpoints'] else 'off'}")
    from job.levers import summary  # torch-heavy (check() loaded it already), never for --help

    print(f"speed levers: {summary(report['levers'])}")
    if f.get("host_gib"):
        print(f"host memory: offloaded checkpoints need ~{f['host_gib']} GiB of {f.get('host_available_gib')} GiB available: ok")
    return 0


def check(cfg: RunConfig, data_dir: Path | None = None, where: Path = Path(".")) -> dict:
    import torch

    card = env.card_info()
    on_gpu = card["gpus"] > 0
    if not on_gpu and not cfg.allow_cpu:
        raise JobCannotRun("no GPU visible (torch.cuda.is_available() is False) and the config does not set allow_cpu: true")
    if on_gpu and cfg.train.precision == "bf16" and not card["bf16"]:
        raise JobCannotRun(f"{card['name']} (capability {card['capability']}) has no bf16; this config trains in bf16 "
                           "(use an Ampere or newer card, or train.precision: fp16)")
    device = torch.device("cuda") if on_gpu else torch.device("cpu")
    nf4 = nf4_self_test(device)
    if not nf4["rel_error"] < NF4_TOLERANCE:
        raise JobCannotRun(f"bitsandbytes NF4 self-test failed on {card['name']}: relative error "
                           f"{nf4['rel_error']:.3f} >= {NF4_TOLERANCE}")
    free = env.disk_free_gib(where)
    # MIN_FREE_GIB: the same floor the launcher sizes the machine's disk with (contracts/sizing.py)
    need_disk = MIN_FREE_GIB + (_weights_gib(cfg) if cfg.model.init == "pretrained" else 0.0)
    if cfg.train.method == "full":
        full_disk = full_disk_gib(cfg)
        if free < full_disk["need_gib"]:
            raise JobCannotRun(
                f"{free} GiB disk free at {where.resolve()}; train.method full needs ~{full_disk['need_gib']:.0f} "
                f"GiB on this node: {full_disk['checkpoints']} sharded checkpoint(s) of {full_disk['checkpoint_gib']} GiB "
                f"(fp32 weights + AdamW, 12 B/param over {full_disk['nodes']} node(s)) and {full_disk['output_gib']} GiB of "
                f"output weights, {full_disk['base_gib']} GiB of base model (a larger disk, train.keep_checkpoints: 1, "
                "or train.checkpoint_every: 0)")
    if free < need_disk:
        raise JobCannotRun(f"{free} GiB disk free at {where.resolve()}; this config needs ~{need_disk:.0f} GiB "
                           "(model download + checkpoints)")
    world = planned_world(card["gpus"]) if cfg.train.method == "full" else dist.world_size()
    run_cfg, mode = plan_memory(cfg, card["memory_gib"] if on_gpu else None,
                                env.host_mem_available_gib() if on_gpu else None, data_dir, world)
    fit = mode.pop("fit")
    fit["available_gib"] = card["memory_gib"] if on_gpu else None
    from job import levers  # torch-heavy: imported once the card is checked, never for --help

    lv = levers.report(run_cfg, on_gpu, layers=levers.decoder_layers(run_cfg))
    if cfg.train.require_levers and (refusal := levers.refusal(lv)):
        raise JobCannotRun(refusal)
    return {"ok": True, "card": card, "nf4": nf4, "disk_free_gib": free, "fit": fit, "mode": mode,
            "packages": env.package_versions(), "levers": lv}


LEAN_MAX_MICRO_BATCH = 128  # lean mode's largest micro-batch (measured on the H200: 128 > 64 > 32 in tok/s)


def plan_memory(cfg: RunConfig, card_gib: float | None, host_gib: float | None, data_dir: Path | None = None,
                world: int = 1) -> tuple[RunConfig, dict]:
    """The config to train with on this card, and the memory mode it is in.

    fast: the config as written (train.memory_mode fast, or auto when the fit estimate fits the card
    and the host's RAM). lean: every decoder layer recomputed with its input offloaded to pinned host
    memory, at the largest micro-batch (<= 128, dividing the per-GPU global batch) whose GPU fit and
    host memory both fit; the global batch, and so what is learned, is unchanged. configs/paper.yaml
    is that shape at micro-batch 128 (bench/RESULTS.md round 9), so there lean only lowers the
    micro-batch. No card (CPU): the config as written.
    Raises JobCannotRun when neither fits, naming the smallest need."""
    t = cfg.train
    if t.method == "full":
        return _plan_full(cfg, card_gib, data_dir, world)
    fit = fit_estimate(cfg, data_dir)
    fits = card_gib is None or fit["total_gib"] <= FIT_SHARE * card_gib
    if fits and card_gib is not None and t.memory_mode == "auto":
        try:  # auto: host RAM too small for the offloaded inputs at this micro-batch lowers it, as the card's does
            host_fit(cfg, fit, host_gib)
        except JobCannotRun:
            fits = False
    if card_gib is None or t.memory_mode == "fast" or (t.memory_mode == "auto" and fits):
        if not fits:
            raise JobCannotRun(f"{cfg.model.id} with {t.method} at micro_batch {t.micro_batch} needs ~{fit['total_gib']} "
                               f"GiB; this card has {card_gib:.2f} GiB (lower train.micro_batch, set train.memory_mode: auto "
                               "or lean, or pick a larger card)")
        if card_gib is not None:
            host_fit(cfg, fit, host_gib)
        return cfg, {"mode": "fast", "micro_batch": t.micro_batch, "checkpoint_layers": t.checkpoint_layers,
                     "offload_checkpoints": t.offload_checkpoints, "fit": fit,
                     "why": "the config as written fits" if t.memory_mode == "auto" else "train.memory_mode: fast"}
    per_gpu = max(1, t.global_batch // max(1, world))
    tried = []
    for mb in range(min(LEAN_MAX_MICRO_BATCH, per_gpu), 0, -1):
        if per_gpu % mb:
            continue
        lean = cfg.with_overrides({"train.micro_batch": mb, "train.gradient_checkpointing": True,
                                   "train.checkpoint_layers": None, "train.offload_checkpoints": True},
                                  source="memory_mode lean")
        f = fit_estimate(lean, data_dir)
        tried.append((mb, f["total_gib"], f["host_gib"]))
        if f["total_gib"] > FIT_SHARE * card_gib:
            continue
        try:
            host_fit(lean, f, host_gib)
        except JobCannotRun:
            continue
        why = ("train.memory_mode: lean" if t.memory_mode == "lean" else
               f"the config as written needs ~{fit['total_gib']} GiB, over {FIT_SHARE:.0%} of {card_gib:.2f} GiB"
               if fit["total_gib"] > FIT_SHARE * card_gib else
               f"the config as written keeps ~{fit['host_gib']} GiB of checkpoints in host memory; "
               f"this machine has {host_gib} GiB")
        return lean, {"mode": "lean", "micro_batch": mb, "checkpoint_layers": None, "offload_checkpoints": True,
                      "fit": f, "why": why}
    mb, gib, host = tried[-1] if tried else (1, fit["total_gib"], 0.0)
    raise JobCannotRun(f"{cfg.model.id} with {t.method} does not fit this card even in the lean mode: micro_batch {mb} "
                       f"needs ~{gib} GiB of {card_gib:.2f} GiB GPU memory and ~{host} GiB of {host_gib} GiB host memory "
                       "(pick a larger card or a machine with more RAM)")


def planned_world(gpus: int) -> int:
    """The ranks `train` will run on: WORLD_SIZE under torchrun; otherwise (check runs once per node,
    before torchrun) nodes x ranks per node as sky/train.yaml starts them, else this node's GPUs."""
    if os.environ.get("WORLD_SIZE"):
        return dist.world_size()
    nodes = int(os.environ.get("SKYPILOT_NUM_NODES") or 1)
    per_node = int(os.environ.get("NPROC_PER_NODE") or os.environ.get("SKYPILOT_NUM_GPUS_PER_NODE") or max(gpus, 1))
    return max(1, nodes * per_node)


def full_fit_estimate(cfg: RunConfig, data_dir: Path | None, world: int) -> dict:
    """Per-GPU memory of `train.method: full` over `world` ranks (contracts/sizing.py full_fit), with the
    activations of one micro-batch at the same checkpointing."""
    base = fit_estimate(cfg, data_dir)
    fit = full_fit(_shape(cfg), world=world, precision=cfg.train.precision,
                   activations_gib=base["activations_gib"])
    return {**fit, "row_tokens": base["row_tokens"]}


def full_disk_gib(cfg: RunConfig) -> dict:
    """Disk a full fine-tune writes on one node: its share of each kept checkpoint (plus one being written)
    and, on node 0, the output weights in the training precision (contracts/sizing.py, which the launcher
    reads too for the machine's disk_size)."""
    n = _shape(cfg).params
    nodes = max(1, int(os.environ.get("SKYPILOT_NUM_NODES") or 1))
    t = cfg.train
    return full_disk(n, nodes=nodes, checkpoint_every=t.checkpoint_every, keep_checkpoints=t.keep_checkpoints,
                     precision=t.precision, pretrained=cfg.model.init == "pretrained")


def _plan_full(cfg: RunConfig, card_gib: float | None, data_dir: Path | None, world: int) -> tuple[RunConfig, dict]:
    """A full fine-tune has no lean mode: it fits the cards as written, or is refused with the numbers."""
    fit = full_fit_estimate(cfg, data_dir, world)
    if card_gib is not None and fit["total_gib"] > FIT_SHARE * card_gib:
        fixed = fit["total_gib"] - fit["sharded_gib"]
        room = FIT_SHARE * card_gib - fixed
        need = math.ceil(fit["sharded_gib"] * world / room) if room > 0 else None
        more = f"~{need} such GPUs" if need else "cards with more memory"
        raise JobCannotRun(
            f"train.method full: {cfg.model.id} ({fit['params'] / 1e9:.2f}B params) needs ~{fit['total_gib']} GiB per GPU "
            f"on {world} GPU(s) ({fit['params'] / 1e9:.2f}B x {FULL_BYTES_PER_PARAM} B weights+grads+AdamW / {world} = "
            f"{fit['sharded_gib']} GiB, gathered layers {fit['gathered_gib']} GiB, activations {fit['activations_gib']} "
            f"GiB at micro_batch {cfg.train.micro_batch}); this card has {card_gib:.2f} GiB, {FIT_SHARE:.0%} usable "
            f"(use {more}, or train.method: qlora)")
    return cfg, {"mode": "fast", "micro_batch": cfg.train.micro_batch, "checkpoint_layers": cfg.train.checkpoint_layers,
                 "offload_checkpoints": False, "fit": fit,
                 "why": f"full fine-tune sharded over {world} rank(s)"}


def host_fit(cfg: RunConfig, fit: dict, available_gib: float | None) -> None:
    """Offloaded checkpoints park ~fit['host_gib'] in pinned host memory: refuse a machine without it
    (pinning fails mid-run otherwise), with room to spare for the data loader and the process."""
    need = fit.get("host_gib") or 0.0
    fit["host_available_gib"] = available_gib
    if need and available_gib is not None and available_gib < 1.25 * need + 4:
        raise JobCannotRun(f"train.offload_checkpoints keeps ~{need} GiB of checkpoints in host memory at micro_batch "
                           f"{cfg.train.micro_batch}; this machine has {available_gib} GiB available (set "
                           "train.offload_checkpoints: false or pick a machine with more RAM)")


def nf4_self_test(device, n: int = 1024) -> dict:
    """Quantize a random matrix to NF4 (double quant) with bitsandbytes, matmul, compare to bf16/fp32."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    import torch

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    w = (torch.randn(n, n, generator=g) * 0.02).to(device=device, dtype=dtype)
    x = torch.randn(16, n, generator=g).to(device=device, dtype=dtype)
    packed, state = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    ref = (x.float() @ w.float().t())
    out = bnb.matmul_4bit(x, packed.t(), quant_state=state).float()
    rel = ((out - ref).norm() / ref.norm()).item()
    deq = F.dequantize_4bit(packed, state).float()
    return {"device": str(device), "n": n, "rel_error": rel, "bytes_per_param": packed.numel() / w.numel(),
            "weight_rel_error": ((deq - w.float()).norm() / w.float().norm()).item()}


def fit_estimate(cfg: RunConfig, data_dir: Path | None) -> dict:
    """adapter_fit for one micro-batch of this config. A row is the prepared data's p90 (else 512 tokens at most);
    packed micro-batches hold the SUM of their rows, ~micro_batch x the mean row (not the p90): the prepared
    data's mean, else SocSci210's (configs/socsci210_stats.json, full 16-field profiles)."""
    t = cfg.train
    stats = data_dir / "stats.json" if data_dir is not None else None
    tokens = json.loads(stats.read_text())["train"]["tokens"] if stats is not None and stats.is_file() else None
    row_tokens = (tokens["p90"] if tokens is not None else None) or min(t.max_length, 512)
    hub = Path(__file__).resolve().parents[1] / "configs" / "socsci210_stats.json"
    if t.packing and tokens is not None:
        row_tokens = int(tokens.get("mean") or row_tokens) + 1
    elif t.packing and cfg.data.source == "socratesft/SocSci210" and hub.is_file():
        row_tokens = int(json.loads(hub.read_text())["tokens_per_row"]["mean"]) + 1
    est = adapter_fit(_shape(cfg), method=t.method, lora_r=cfg.lora.r,
                      tokens=t.micro_batch * row_tokens, micro_batch=t.micro_batch,
                      gradient_checkpointing=t.gradient_checkpointing, checkpoint_layers=t.checkpoint_layers,
                      fused_lora=t.fused_lora, offload_checkpoints=t.offload_checkpoints)
    return {**est, "row_tokens": row_tokens}


def _shape(cfg: RunConfig) -> Shape:
    """The model's shape (contracts/sizing.py) from job/model.py's config of it (no weights)."""
    from job.model import model_config  # torch-heavy: only where a fit is planned, never for --help

    return Shape.of(model_config(cfg))


def _weights_gib(cfg: RunConfig) -> float:
    try:
        return base_download_gib(_shape(cfg).params)
    except ContractError:
        return 0.0
