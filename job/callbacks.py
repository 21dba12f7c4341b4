"""TrainerCallbacks of `job train`: step events, atomic checkpoint moves, the deadline hook."""
from __future__ import annotations

import os
import time
from pathlib import Path

from transformers import TrainerCallback

from contracts.errors import ContractError
from contracts.events import EventWriter
from job import dist
from job.checkpoints import commit


class EventsCallback(TrainerCallback):
    """One `step` event per logged optimizer step: loss, lr, tokens/s, GPU memory, ETA."""

    def __init__(self, events: EventWriter, total_steps: int):
        self.events, self.total = events, total_steps
        self.t_start = self.t_last = None
        self.tokens_last = self.step_start = 0

    def on_train_begin(self, args, state, control, **kw):
        self.t_start = self.t_last = time.time()
        self.step_start = state.global_step
        self.tokens_last = state.num_input_tokens_seen or 0

    def on_log(self, args, state, control, logs=None, **kw):
        if not logs or "loss" not in logs:
            return
        import torch

        now = time.time()
        tokens = state.num_input_tokens_seen or 0
        tps = (tokens - self.tokens_last) / max(now - self.t_last, 1e-9)
        self.t_last, self.tokens_last = now, tokens
        done = state.global_step - self.step_start
        eta = (now - self.t_start) / done * (self.total - state.global_step) if done else None
        mem = round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else 0.0
        self.events.emit("step", step=state.global_step, total_steps=self.total, epoch=round(state.epoch or 0, 4),
                         loss=float(logs["loss"]), lr=float(logs.get("learning_rate", 0.0)),
                         tokens_per_s=round(tps, 1), gpu_mem_gib=mem, eta_s=round(eta, 1) if eta is not None else None,
                         grad_norm=logs.get("grad_norm"))


class CheckpointCallback(TrainerCallback):
    """After the Trainer saved into .staging: rank 0 commits it into checkpoints/ (job/checkpoints.commit)."""

    def __init__(self, root: Path, keep: int, events: EventWriter, run_fp: dict):
        self.root, self.keep, self.events, self.run_fp = root, keep, events, run_fp

    def on_save(self, args, state, control, **kw):
        dist.barrier()  # every rank has written its part (rng_state_<rank>.pth) into .staging
        try:
            src = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and src.is_dir():
                commit(src, self.root, state.global_step, self.run_fp, self.keep)
                self.events.emit("checkpoint", step=state.global_step, path=f"checkpoints/{src.name}")
        finally:
            dist.barrier()  # nobody runs ahead to the next save while rank 0 renames


class SaveClock:
    """Is a save due: `every_s` seconds (of `clock`) since the last one? Decided on rank 0 and broadcast
    (job/dist.agreed), so every rank saves at the same step. `due()` is a collective at world > 1: every
    rank calls it at every step boundary (the same count on each, as every_s comes from the config)."""

    def __init__(self, every_s: float, clock=None):
        self.every_s, self.clock = every_s, clock or (lambda: time.monotonic())
        self.last = self.clock()

    def reset(self) -> None:
        self.last = self.clock()

    def local_due(self) -> bool:
        return self.every_s > 0 and self.clock() - self.last >= self.every_s

    def due(self) -> bool:
        return self.every_s > 0 and dist.agreed(self.local_due())


class TimedCheckpointCallback(TrainerCallback):
    """Also save once `every_s` seconds of training passed since the last save (a managed run on spot:
    a preemption then loses at most that much), at the same step on every rank (SaveClock). Saving reads
    the RNG states, never advances them, so the math is the same with or without these extra saves."""

    def __init__(self, every_s: float, clock=None):
        self.timer = SaveClock(every_s, clock)

    def on_train_begin(self, args, state, control, **kw):
        self.timer.reset()

    def on_step_end(self, args, state, control, **kw):
        # should_training_stop is the same on every rank (max_steps, the broadcast deadline): ask only then
        if not control.should_training_stop and self.timer.due():
            control.should_save = True
        return control

    def on_save(self, args, state, control, **kw):
        self.timer.reset()


class DeadlineCallback(TrainerCallback):
    """SOCRATES_DEADLINE (unix seconds): stop at the next step boundary once it has passed (rank 0's clock
    decides, for every rank: job/dist.agreed)."""

    def __init__(self, clock=None):
        raw = os.environ.get("SOCRATES_DEADLINE")
        try:
            self.deadline = float(raw) if raw else None
        except ValueError:
            raise ContractError(f"SOCRATES_DEADLINE: {raw!r} is not unix seconds") from None
        self.clock = clock or (lambda: time.time())
        self.hit = False

    def passed(self) -> bool:
        """Collective at world > 1 when a deadline is set (torchrun gives every rank the same environment)."""
        return self.deadline is not None and dist.agreed(self.clock() >= self.deadline)

    def on_step_end(self, args, state, control, **kw):
        if self.passed():
            self.hit = True
            control.should_training_stop = True
            control.should_save = False
        return control
