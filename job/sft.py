"""The trainer of the QLoRA / LoRA path: TRL's SFTTrainer as the run config sets it up, and our subclass.

The rows come tokenized by job/data.py (the very tokens evaluation scores), over-long rows left out
rather than cut, so TRL's dataset preparation and truncation are off (`skip_prepare_dataset`,
`max_length=None`). TRL's `packing` packs the dataset into fixed-length rows, which would change what a
global batch of 256 rows is; instead job/batches.py's PackedCollator packs each micro-batch (rows
concatenated, position ids restarting per sequence), passed as the trainer's `data_collator`. The step
events, atomic checkpoints and the deadline are TrainerCallbacks (job/callbacks.py).

`Trainer` overrides three methods, each where TRL's own does other arithmetic than the measured path:
- compute_loss: job/loss.py's answer-only loss, summed and divided by the optimizer step's answer tokens
  over all ranks. TRL's fused LM head projects every position off Triton devices (the CPU path) and
  gathers entropy and accuracy across ranks at every micro-batch.
- get_train_dataloader: RankBatches (job/batches.py): accelerate's sharding pads a short last batch with
  rows from the epoch's start, which changes what a step trains on.
- _load_optimizer_and_scheduler: gloo ranks (the CPU path over several processes) name their device
  'cpu:<rank>', where torch.load cannot restore the optimizer to: loaded onto the CPU.
"""
from __future__ import annotations

import importlib
import math
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME
from transformers.trainer_callback import PrinterCallback
from trl import SFTConfig, SFTTrainer

from contracts.config import TENSORBOARD_DIR, RunConfig
from contracts.errors import ContractError
from job import dist, levers
from job.batches import PackedCollator, RankBatches, WithBlank, count_targets
from job.callbacks import CheckpointCallback, DeadlineCallback, EventsCallback, TimedCheckpointCallback
from job.loss import answer_loss_sum
from job.managed import checkpoint_every_s


class Trainer(SFTTrainer):
    """SFTTrainer with the answer-only loss and each rank's micro-batches of one global order."""

    def __init__(self, *args, liger: bool = False, micro_batch: int = 1, seed: int = 0, pad_id: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.liger, self.micro_batch, self.seed, self.pad_id = liger, micro_batch, seed, pad_id

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        n = num_items_in_batch if num_items_in_batch is not None else count_targets(inputs)
        loss = answer_loss_sum(model, inputs, self.liger) / n
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # As Trainer.compute_loss: the count is global, DDP averages gradients over ranks.
            loss = loss * (self.accelerator.num_processes if self.args.n_gpu <= 1 else self.args.n_gpu)
        return (loss, None) if return_outputs else loss

    def get_train_dataloader(self) -> DataLoader:
        sampler = RankBatches(len(self.train_dataset), self.micro_batch, self.seed, dist.rank(), dist.world_size())
        return _EpochLoader(WithBlank(self.train_dataset, self.pad_id), batch_sampler=sampler,
                            collate_fn=self.data_collator, num_workers=0)

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is None or self.args.device.type == "cuda" or dist.world_size() <= 1:
            return super()._load_optimizer_and_scheduler(checkpoint)
        for state, name in ((self.optimizer, OPTIMIZER_NAME), (self.lr_scheduler, SCHEDULER_NAME)):
            state.load_state_dict(torch.load(Path(checkpoint) / name, map_location="cpu", weights_only=True))


class _EpochLoader(DataLoader):
    """The Trainer calls set_epoch on its loader each epoch: RankBatches reshuffles by (seed, epoch)."""

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)


def build(cfg: RunConfig, model, tok, dataset, ckpt_root: Path, total_steps: int, world: int, device, events,
          run_fp: dict) -> tuple[Trainer, DeadlineCallback]:
    """The trainer of a LoRA model, its levers switched on; and its deadline callback (was the deadline hit)."""
    t = cfg.train
    on_gpu = device.type == "cuda"
    sft = SFTConfig(
        output_dir=str(ckpt_root / ".staging"),
        per_device_train_batch_size=t.micro_batch,
        gradient_accumulation_steps=t.grad_accum(world),
        max_steps=total_steps,
        learning_rate=t.lr,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=math.ceil(t.warmup_ratio * total_steps),
        weight_decay=t.weight_decay,
        optim=t.optim if on_gpu else cpu_optimizer(t.optim),
        bf16=on_gpu and t.precision == "bf16",
        fp16=on_gpu and t.precision == "fp16",
        logging_steps=t.logging_steps,
        save_strategy="steps" if t.checkpoint_every else "no",
        save_steps=t.checkpoint_every or 1,
        save_total_limit=None,  # rotation happens in checkpoints/, after the atomic rename
        seed=t.seed,
        data_seed=t.seed,
        report_to=_report_to(t.report_to, ckpt_root.parent),
        disable_tqdm=True,
        use_cpu=not on_gpu,
        gradient_checkpointing=False,  # per decoder layer, by levers.set_checkpointing
        max_length=None,  # enforced in train._dataset: over-long rows are left out, never cut
        packing=False,  # one row = one sequence, so global_batch stays the paper's 256 rows
        padding_free=False,  # PackedCollator is the padding-free collator (TRL takes no custom one with this flag)
        dataset_kwargs={"skip_prepare_dataset": True},  # tokenized by job/data.py
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        save_only_model=False,
        ddp_find_unused_parameters=False,  # every LoRA weight takes part in every step
        ddp_backend=("nccl" if on_gpu else "gloo") if world > 1 else None,
    )
    lv = levers.resolve(t, device)
    deadline = DeadlineCallback()
    callbacks = [EventsCallback(events, total_steps), CheckpointCallback(ckpt_root, t.keep_checkpoints, events, run_fp),
                 deadline]
    every_s = checkpoint_every_s(t)
    if every_s:  # by time as well as by steps (a managed run: what a preemption can cost)
        callbacks.append(TimedCheckpointCallback(every_s))
    collator = PackedCollator(tok.pad_token_id, lv.row_len, lv.attn_implementation == "flex_attention") \
        if lv.packing else None
    trainer = Trainer(model=model, args=sft, train_dataset=dataset, processing_class=tok, data_collator=collator,
                      callbacks=callbacks, liger=lv.liger, micro_batch=t.micro_batch, seed=t.seed,
                      pad_id=tok.pad_token_id)
    trainer.remove_callback(PrinterCallback)  # the step events already say it, as JSON
    levers.speed_up(model, t, device, lv)
    trainable_to_fp32(model)
    return trainer, deadline


def trainable_to_fp32(model: torch.nn.Module) -> int:
    """Keep the LoRA weights fp32 (autocast still computes in bf16): TRL casts them to bf16 on a 4-bit
    model, where AdamW updates at lr 1e-5 fall below bf16's resolution and are lost."""
    n = 0
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
            n += p.numel()
    return n


def cpu_optimizer(optim: str) -> str:
    """bitsandbytes' optimizers (8-bit, paged, lion_*bit) need CUDA: on the CPU path they become AdamW."""
    return "adamw_torch" if "bit" in optim or optim.startswith("paged_") else optim


def _report_to(choice: str, out: Path) -> list[str]:
    """train.report_to -> the trainer's integrations. TensorBoard writes under out/tensorboard/ (not the
    checkpoint staging folder), so its event files are in the manifest and come back with the run."""
    if choice == "none":
        return []
    try:
        importlib.import_module(choice)  # tensorboard | wandb: the package of that name
    except ImportError:
        raise ContractError(f"train.report_to: {choice!r} needs the {choice} package, which is not installed "
                            f"here (pip install {choice}, or train.report_to: none)") from None
    if choice == "tensorboard":
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / TENSORBOARD_DIR)  # read by transformers' callback
    return [choice]
