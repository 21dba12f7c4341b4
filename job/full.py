"""`train.method: full`: the paper's full fine-tune, every weight trained, sharded with FSDP2 over every rank
(docs/full-finetune.md says what it does, needs and writes). `job train` hands over here once the data,
tokenizer, run fingerprint and resume point are settled. The step, top to bottom in `train_full`:

- The root module is `AnswerLoss` (decoder, lm_head on the answer positions, summed cross-entropy), so
  the whole step runs inside FSDP's root forward and the 152k-wide logits are never built for the prompt.
- fp32 master weights, gradients and AdamW states; each layer computes in bf16 on a GPU (plain bf16
  AdamW loses updates of lr 1e-5). World 1 trains the plain model, no FSDP: the reference a sharded run equals.
- job/batches.py's RankBatches: a step trains the same rows on 1 or N ranks; the loss is divided by the
  step's answer tokens on all ranks (times the world size: FSDP averages the gradients).
- Checkpoints: `torch.distributed.checkpoint` shards (global tensors: they load on any world size), sealed
  and moved into place as the QLoRA path's (job/checkpoints.py). Output: out/model/, safetensors shards.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from contracts.errors import ContractError
from contracts.events import EventWriter
from job import callbacks, dist, levers
from job.batches import PackedCollator, RankBatches, WithBlank, collate_padded, count_targets, with_labels
from job.checkpoints import commit
from job.loss import summed_target_loss
from job.managed import checkpoint_every_s
from job.model import build, compute_dtype
from job.result import TrainResult, finish

MODEL_DIR = "model"
SHARD_BYTES = 5 * 10**9


class AnswerLoss(nn.Module):
    """The causal LM as FSDP's root: decoder, lm_head on the target positions, summed cross-entropy."""

    def __init__(self, lm: nn.Module, liger: bool = False):
        super().__init__()
        self.lm = lm
        self.liger = liger

    def forward(self, input_ids, labels, position_ids=None, attention_mask=None):
        kw = {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": attention_mask}
        hidden = self.lm.model(**{k: v for k, v in kw.items() if v is not None}, use_cache=False).last_hidden_state
        return summed_target_loss(hidden, labels, self.lm.lm_head, self.liger)


def train_full(cfg, written, out: Path, events: EventWriter, tok, dataset, n_rows: int, dropped: int, total_steps: int,
               reason_at_end: str, run_fp: dict, data_hash: str, resume_from: Path | None, done_at: int,
               device: torch.device, mode: dict | None):
    """Train every weight (FSDP2 over the ranks when there are several); save out/model and the manifest."""
    t = cfg.train
    world = dist.world_size()
    ga = t.grad_accum(world)
    out_dtype = compute_dtype(cfg, device)
    torch.manual_seed(t.seed)
    lm = build(cfg, tok, device)  # method full: no adapters, every weight trainable
    for p in lm.parameters():
        p.requires_grad_(True)
    lv = _levers(lm, t, device)
    model = AnswerLoss(lm, liger=lv.liger)
    if world > 1:
        _shard(model, device, out_dtype)
    else:
        model.float()  # world 1: fp32 master weights (a GPU computes under bf16 autocast)
    autocast = world == 1 and device.type == "cuda" and out_dtype != torch.float32
    optimizer = _optimizer(model, t, device)
    scheduler = _scheduler(optimizer, t, total_steps)
    if resume_from is not None:
        for _ in range(done_at):  # the schedule's position; the optimizer's own lr comes with its state
            scheduler.step()
        t_load = time.time()
        load_checkpoint(model, optimizer, resume_from)
        took = round(time.time() - t_load, 2)
        events.emit("log", message=f"resumed the full fine-tune from {resume_from.name} (step {done_at}, written by "
                                   f"{_written_world(resume_from)} rank(s), loaded on {world} in {took} s)", seconds=took)

    if world > int(os.environ.get("LOCAL_WORLD_SIZE") or world) and t.checkpoint_every:
        events.emit("log", message="checkpoints: each node writes its own ranks' shards to its own disk, so a checkpoint "
                                   "is whole only on a file system every node shares at OUT; resuming a multi-node "
                                   "full fine-tune from local disks is not supported yet")
    rows = WithBlank(dataset, tok.pad_token_id)
    sampler = RankBatches(len(dataset), t.micro_batch, t.seed, dist.rank(), world)
    if t.packing:
        collate = PackedCollator(tok.pad_token_id, lv.row_len, lv.attn_implementation == "flex_attention")
    else:
        def collate(feats):
            return collate_padded([with_labels(f) for f in feats], tok.pad_token_id)
    steps_per_epoch = math.ceil(len(sampler) / ga)
    deadline = callbacks.DeadlineCallback().deadline
    ckpt_root = out / "checkpoints"
    step, hit = done_at, False
    t0 = t_start = time.time()
    timer = callbacks.SaveClock(checkpoint_every_s(t))  # by time as well as by steps (a managed run: what a preemption can cost)
    epoch_cache: dict[int, list] = {}
    while step < total_steps:
        epoch, k = divmod(step, steps_per_epoch)
        if epoch not in epoch_cache:
            sampler.set_epoch(epoch)
            epoch_cache.clear()
            epoch_cache[epoch] = list(sampler)
        mine = epoch_cache[epoch][k * ga:(k + 1) * ga]
        feats = [[rows[i] for i in idx] for idx in mine]
        batches = [collate(f) for f in feats]
        real = [r for f, idx in zip(feats, mine) for r, i in zip(f, idx) if i < len(dataset)]  # not the blank filler
        local = torch.tensor([sum(count_targets(b) for b in batches), sum(len(r["input_ids"]) for r in real)],
                             dtype=torch.float64, device=device)
        total_targets, tokens = (float(x) for x in _all_sum(local))
        lr = optimizer.param_groups[0]["lr"]
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for b in batches:
            b = {key: v.to(device) for key, v in b.items()}
            with torch.autocast(device.type, dtype=out_dtype, enabled=autocast):
                s = model(**b)
            (s * world / max(total_targets, 1.0)).backward()
            loss_sum += s.detach().double()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss = float(_all_sum(loss_sum.reshape(1))[0]) / max(total_targets, 1.0)
        now = time.time()
        done = step - done_at
        eta = (now - t_start) / done * (total_steps - step)
        mem = round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else 0.0
        if step % t.logging_steps == 0 or step == total_steps:
            events.emit("step", step=step, total_steps=total_steps, epoch=round(step / steps_per_epoch, 4), loss=loss,
                        lr=float(lr), tokens_per_s=round(tokens / max(now - t0, 1e-9), 1), gpu_mem_gib=mem,
                        eta_s=round(eta, 1), grad_norm=grad_norm)
        t0 = now
        # rank 0's clocks decide for every rank (one broadcast): a rank that alone saw the deadline or a timed
        # save due would enter a save's collectives while the others are in the next step's all-reduce
        hit, timed = dist.broadcast_object((deadline is not None and time.time() >= deadline, timer.local_due()))
        if hit:
            break
        if (t.checkpoint_every and step % t.checkpoint_every == 0) or (timed and step < total_steps):
            save_checkpoint(model, optimizer, ckpt_root, step, world, run_fp, t.keep_checkpoints, events)
            timer.reset()
            t0 = time.time()  # the next step's tokens/s is its own, not the save's (the checkpoint event has that)

    reason = "deadline" if hit else reason_at_end
    res = TrainResult(out, step, total_steps, reason, str(resume_from) if resume_from else None)
    files = save_weights(model, lm, tok, out, out_dtype)
    if dist.is_main():
        finish(out, events, device, files, kind="full", written=written, mode=mode, data_hash=data_hash, step=step,
               total_steps=total_steps, reason=reason, resume_from=resume_from, n_rows=n_rows, dropped=dropped,
               seconds=time.time() - t_start, world=world,
               full={"weights": f"{MODEL_DIR}/", "dtype": str(out_dtype).removeprefix("torch."), "fsdp": world > 1,
                     "bytes": sum(f.stat().st_size for f in files if f.suffix == ".safetensors")})
    dist.barrier()
    return res


# --- model ------------------------------------------------------------------------------------------

def _levers(lm, t, device):
    """Attention, Liger (CUDA), checkpointing on the plain model, before it is sharded (job/levers.py)."""
    lv = levers.resolve(t, device)
    levers.set_attention(lm, lv.attn_implementation)
    if lv.liger and not levers.apply_liger(lm):
        lv = replace(lv, liger=False)
    levers.set_checkpointing(lm, t.gradient_checkpointing, lv.checkpoint_layers)
    return lv


def _shard(model: AnswerLoss, device: torch.device, compute: torch.dtype) -> None:
    """fully_shard every decoder layer, then the root (embedding, final norm, lm_head), over all ranks.
    Each layer is made fp32 (the master copy) just before it is sharded, so at most one fp32 layer is
    ever whole on a rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32) if compute != torch.float32 \
        else MixedPrecisionPolicy()
    for layer in model.lm.model.layers:
        layer.float()
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    for rest in (model.lm.model.embed_tokens, model.lm.model.norm, model.lm.lm_head):
        rest.float()
    fully_shard(model, mesh=mesh, mp_policy=mp)


def _optimizer(model: nn.Module, t, device: torch.device):
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, 0.999), eps=1e-8, fused=device.type == "cuda")


def _scheduler(optimizer, t, total_steps: int):
    from transformers import get_scheduler

    return get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=math.ceil(t.warmup_ratio * total_steps),
                         num_training_steps=total_steps)


def _all_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.world_size() > 1:
        import torch.distributed as td

        x = x.clone()
        td.all_reduce(x)
    return x


# --- checkpoints ------------------------------------------------------------------------------------

def _state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd}


def save_checkpoint(model, optimizer, root: Path, step: int, world: int, run_fp: dict, keep: int, events) -> None:
    """Every rank writes its shards (DCP) into .staging; rank 0 seals the folder (the COMPLETE marker lists every
    file and its size, written after they were fsynced) and moves it into place (job/checkpoints.py)."""
    import torch.distributed.checkpoint as dcp

    t_save = time.time()
    name = f"checkpoint-{step}"
    staging = root / ".staging" / name
    if dist.is_main():
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    with _one_process_ok():
        dcp.save(_state(model, optimizer), checkpoint_id=str(staging))
    dist.barrier()
    try:
        if dist.is_main():
            (staging / "trainer_state.json").write_text(json.dumps(
                {"global_step": step, "world_size": world, "method": "full", "format": "torch.distributed.checkpoint"}) + "\n")
            commit(staging, root, step, run_fp, keep)
            events.emit("checkpoint", step=step, path=f"checkpoints/{name}", seconds=round(time.time() - t_save, 2))
    finally:
        dist.barrier()


def load_checkpoint(model, optimizer, checkpoint: Path) -> None:
    """Load a DCP checkpoint of any world size into this run's (sharded or whole) model and optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    if not (checkpoint / ".metadata").is_file():
        raise ContractError(f"--resume: {checkpoint} holds no torch.distributed.checkpoint (.metadata missing): it was not "
                            "written by a train.method: full run (accepted: a checkpoint of this run)")
    state = _state(model, optimizer)
    with _one_process_ok():
        dcp.load(state, checkpoint_id=str(checkpoint))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


@contextlib.contextmanager
def _one_process_ok():
    """DCP warns that it assumes one process when there is no process group: that is world 1, as meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _written_world(checkpoint: Path):
    try:
        return json.loads((checkpoint / "trainer_state.json").read_text()).get("world_size", "?")
    except (OSError, ValueError):
        return "?"


# --- the weights ------------------------------------------------------------------------------------

def save_weights(model: AnswerLoss, lm, tok, out: Path, dtype: torch.dtype) -> list[Path]:
    """out/model/: safetensors shards in `dtype`, config.json, tokenizer. Every rank takes part in
    gathering each tensor (FSDP's shards), one at a time; rank 0 alone writes. Returns the files (rank 0)."""
    from safetensors.torch import save_file

    sd = model.state_dict()  # FQNs of the wrapper: "lm." + the model's own names; DTensors when sharded
    tied = getattr(lm.config, "tie_word_embeddings", False)
    names = [k for k in sd if k.startswith("lm.") and not (tied and k == "lm.lm_head.weight")]
    size = torch.empty((), dtype=dtype).element_size()
    plan: list[list[str]] = [[]]
    used = 0
    for k in names:
        n = sd[k].numel() * size
        if plan[-1] and used + n > SHARD_BYTES:
            plan.append([])
            used = 0
        plan[-1].append(k)
        used += n
    main = dist.is_main()
    tmp = out / f".{MODEL_DIR}.tmp"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    index: dict[str, str] = {}
    total = 0
    for i, keys in enumerate(plan, 1):
        fname = "model.safetensors" if len(plan) == 1 else f"model-{i:05d}-of-{len(plan):05d}.safetensors"
        shard = {}
        for k in keys:
            v = sd[k]
            full = v.full_tensor() if hasattr(v, "full_tensor") else v  # a collective: every rank calls it
            if main:
                shard[k.removeprefix("lm.")] = full.detach().to("cpu", dtype).contiguous()
                index[k.removeprefix("lm.")] = fname
                total += shard[k.removeprefix("lm.")].numel() * size
            del full
        if main:
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
        del shard
    if not main:
        return []
    if len(plan) > 1:
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(index.items()))}, indent=2) + "\n")
    lm.config.dtype = dtype
    lm.config.use_cache = True
    lm.config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    dst = out / MODEL_DIR
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    return sorted(dst.iterdir())
