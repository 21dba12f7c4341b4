"""`python -m job train`: QLoRA SFT with TRL's SFTTrainer, resumable atomic checkpoints, events,
the adapter and a manifest (`train.method: full`: the FSDP2 full fine-tune of job/full.py instead).

    python -m job train --config configs/smoke.yaml --data runs/data --out runs/smoke [--resume auto]

Checkpoints (job/checkpoints.py) are sealed with a COMPLETE marker once whole, so a half-written one is
never resumed from, and carry the run's fingerprint: a resume with another config or data is refused.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import time
from pathlib import Path

from contracts.config import RunConfig, load_config
from contracts.errors import ContractError
from contracts.events import EventWriter
from job import data as D
from job import dist, env
from job.check import plan_memory
from job.checkpoints import COMPLETE, check_resumable, fingerprint, global_step, is_complete, resume_point
from job.env import quiet_bnb_cpu_notice
from job.errors import JobCannotRun
from job.managed import last_logged_step, launch_number
from job.prepare import check_out, prepare
from job.result import TrainResult, finish
from job.tokenizer import load_tokenizer

quiet_bnb_cpu_notice()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="run config (.yaml, or seed-style .json)")
    p.add_argument("--data", default=None, help="folder from `job prepare` (default: prepare the config's data.source into OUT/data)")
    p.add_argument("--out", required=True, help="output folder: adapter/ (train.method full: model/, the whole model's "
                   "safetensors shards), manifest.json, events.jsonl, checkpoints/")
    p.add_argument("--resume", default="auto", help="auto (newest complete checkpoint in OUT, if any) | never (deletes OUT/checkpoints) | PATH; a "
                   "checkpoint trained with another config or data is refused")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    out = check_out(args.out)
    if args.resume not in ("auto", "never") and not is_complete(Path(args.resume)):
        raise ContractError(f"--resume {args.resume}: not a complete checkpoint folder (accepted: auto | never | "
                            f"a checkpoints/checkpoint-N folder with a {COMPLETE} marker)")
    if args.data:
        D.split_file(args.data, "train")  # a folder `prepare` did not write: refused before torch loads
    from job.levers import for_this_machine  # torch-heavy: never for --help

    dist.init()
    # Rank 0 alone writes events (and everything else the run leaves); other ranks stay quiet.
    events = EventWriter(out / "events.jsonl", echo=True) if dist.is_main() else dist.QuietEvents()
    events.emit("start", verb="train", config=cfg.name, levers=for_this_machine(cfg),  # what this run really gets
                **({"world_size": dist.world_size()} if dist.world_size() > 1 else {}))

    try:
        res = train(cfg, out, events, data_dir=Path(args.data) if args.data else None, resume=args.resume)
    except Exception as e:
        known = isinstance(e, (ContractError, JobCannotRun))
        events.emit("error", message=str(e) if known else f"{type(e).__name__}: {str(e)[:500]}")
        raise
    if dist.is_main():
        what = "model" if cfg.train.method == "full" else "adapter"
        print(f"trained {res.steps}/{res.total_steps} steps ({res.reason}) -> {res.out / what}")
    dist.destroy()
    return 0


def train(cfg: RunConfig, out: Path, events: EventWriter, data_dir: Path | None = None,
          resume: str = "auto") -> TrainResult:
    """Prepare data if needed, build the model, train it (job/sft.py; job/full.py), save adapter + manifest."""
    import torch  # torch-heavy: never for --help

    device = torch.device("cuda", dist.local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif not cfg.allow_cpu:
        raise JobCannotRun("no GPU on this machine and the config does not set allow_cpu: true")
    else:  # the CPU path runs tiny models whose ops are smaller than a second thread's wake-up cost
        torch.set_num_threads(int(os.environ.get("SOCRATES_CPU_THREADS", "1")))
    if data_dir is None:
        d = cfg.data
        data_dir = out / "data"
        if dist.is_main():
            prepare(d.source, data_dir, split=d.split, subset=d.subset, eval_subset=d.eval_subset, seed=d.seed, cfg=cfg)
        dist.barrier()
    written = cfg
    mode = None
    if device.type == "cuda":
        # The card it landed on decides the memory mode (job/check.py plan_memory): the config as
        # written when it fits, else the lean mode. Only how a step is computed changes (the global
        # batch and so the fingerprint stay), so a resume on another card is still accepted.
        env.apply_memory_cap(device)
        cfg, mode = plan_memory(cfg, env.card_info()["memory_gib"], env.host_mem_available_gib(), data_dir,
                                dist.world_size())
        fit = mode.pop("fit")
        mode["fit_gib"] = fit["total_gib"]
        events.emit("log", message=f"memory mode {mode['mode']} ({mode['why']}): micro_batch {mode['micro_batch']}, "
                                   f"checkpointed layers {'all' if mode['checkpoint_layers'] is None else mode['checkpoint_layers']}, "
                                   f"offloaded checkpoints {'on' if mode['offload_checkpoints'] else 'off'}, "
                                   f"fit ~{fit['total_gib']} GiB")
    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.id, revision=cfg.model.revision)
    dataset, n_rows, dropped = _dataset(cfg, tok, data_dir)
    if dropped:
        events.emit("log", message=f"{dropped} training rows longer than train.max_length={cfg.train.max_length} "
                                   "tokens were left out (truncating would cut the answer)")
    world = dist.world_size()
    total_steps = cfg.train.total_steps(n_rows)
    reason_at_end = "max_steps" if cfg.train.max_steps and total_steps == cfg.train.max_steps and \
        total_steps < math.ceil(n_rows * cfg.train.epochs / cfg.train.global_batch) else "completed"

    ckpt_root = out / "checkpoints"
    data_hash = D.content_hash(data_dir)
    run_fp = fingerprint(written.to_dict(), data_hash)
    # Rank 0 decides where to resume from (and deletes on `never`); every rank loads that checkpoint.
    chosen = resume_point(resume, ckpt_root) if dist.is_main() else None
    chosen = dist.broadcast_object(str(chosen) if chosen else None)
    resume_from = Path(chosen) if chosen else None
    if resume_from and not is_complete(resume_from):
        raise JobCannotRun(f"rank {dist.rank()}: {resume_from} is not on this node's disk (resuming over several nodes "
                           "needs the checkpoints on every node; resume on one node)")
    if resume_from and not check_resumable(resume_from, run_fp, resume):
        events.emit("log", message=f"{resume_from.name} carries no run fingerprint (written by an older version): "
                                   "resuming without checking that config and data match")
    done_at = global_step(resume_from) if resume_from else 0
    launch = launch_number()
    if (resume_from or (launch or 1) > 1) and dist.is_main():  # a relaunch with no checkpoint yet: step 0
        # Where training takes up again, and how many logged steps since that checkpoint are trained again
        # (a managed run's relaunch after a preemption: at most one checkpoint interval).
        last = last_logged_step(out / "events.jsonl")
        last = done_at if last is None else last
        events.emit("resume", step=done_at, steps_lost=max(0, last - done_at), last_logged_step=last,
                    **({"launch": launch} if launch is not None else {}))
    if dist.is_main():
        shutil.rmtree(ckpt_root / ".staging", ignore_errors=True)  # leftovers of a killed save
    dist.barrier()
    if cfg.train.method == "full":  # every weight, FSDP2 over the ranks: job/full.py
        from job.full import train_full  # FSDP2: only a full fine-tune needs it

        return train_full(cfg, written, out, events, tok, dataset, n_rows, dropped, total_steps, reason_at_end, run_fp,
                          data_hash, resume_from, done_at, device, mode)
    from job import sft  # trl and the model: only a LoRA run needs them
    from job.model import build  # torch-heavy: never for --help

    torch.manual_seed(cfg.train.seed)
    model = build(cfg, tok, device)
    trainer, deadline = sft.build(cfg, model, tok, dataset, ckpt_root, total_steps, world, device, events, run_fp)
    t0 = time.time()
    if done_at >= total_steps:
        # The Trainer checks max_steps only after an optimizer step, so resuming a finished run would
        # train one step past it (whenever max_steps is not a whole number of epochs). Nothing is left:
        # load that checkpoint's weights the way a resume does and save them as the adapter.
        events.emit("log", message=f"{resume_from.name} is at step {done_at} of {total_steps}: nothing left to train, "
                                   "saving its adapter")
        trainer._load_from_checkpoint(str(resume_from))
        step = done_at
    else:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        step = trainer.state.global_step
    reason = "deadline" if deadline.hit else reason_at_end
    res = TrainResult(out, step, total_steps, reason, str(resume_from) if resume_from else None)
    if dist.is_main():  # rank 0 saves the adapter and the manifest (the node that is pulled back)
        adapter = _save_adapter(trainer, tok, out)
        finish(out, events, device, sorted(adapter.iterdir()), kind="adapter", written=written, mode=mode,
               data_hash=data_hash, step=step, total_steps=total_steps, reason=reason, resume_from=resume_from,
               n_rows=n_rows, dropped=dropped, seconds=time.time() - t0, world=world)
    elif dist.local_rank() == 0:  # another node's first rank: its evaluation needs the adapter on its disk
        _save_adapter(trainer, tok, out)
    dist.barrier()
    return res


def _save_adapter(trainer, tok, out: Path) -> Path:
    adapter = out / "adapter"
    tmp = out / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(adapter, ignore_errors=True)
    os.replace(tmp, adapter)
    return adapter


def _dataset(cfg: RunConfig, tok, data_dir: Path):
    """Pre-tokenized (input_ids, labels) rows; rows over max_length are left out, counted."""
    from datasets import Dataset  # pyarrow-heavy: never for --help

    rows = D.read_split(data_dir, "train")
    pairs = D.encode(tok, rows, cfg.model.system_prompt)
    kept = [(i, l) for i, l in pairs if len(i) <= cfg.train.max_length]
    if not kept:
        raise ContractError(f"{data_dir}/train.jsonl: every row is longer than train.max_length="
                            f"{cfg.train.max_length} tokens; raise it")
    ds = Dataset.from_dict({"input_ids": [i for i, _ in kept], "labels": [l for _, l in kept]})
    return ds, len(kept), len(pairs) - len(kept)
