"""Micro-batches of the train path: which rows each rank draws, and how a micro-batch becomes tensors.

- Rows: RankBatches deals one global order's micro-batches to the ranks (the same step on 1 or N ranks).
- Packing: a micro-batch's sequences are packed first-fit-decreasing into rows of `row_len` tokens; each
  sequence restarts `position_ids` at 0 and there is no attention mask, so transformers builds a
  per-sequence (block-diagonal causal) mask from the position ids: no pad token is computed.
- Labels: -100 (IGNORE_INDEX) everywhere but the answer tokens; a sequence's first token is never a target.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

IGNORE_INDEX = -100


def pack_rows(lengths: Sequence[int], row_len: int) -> list[list[int]]:
    """Indices of `lengths` packed first-fit-decreasing into rows of at most `row_len` tokens."""
    cap = max(row_len, max(lengths, default=0))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, left in enumerate(room):
            if lengths[i] <= left:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(cap - lengths[i])
    return rows


@dataclass
class PackedCollator:
    """A Trainer data collator: one micro-batch's sequences packed into rows, no padding inside.

    Features carry `input_ids` and either `labels` or TRL's `completion_mask` (1 = answer token).
    """
    pad_id: int
    row_len: int = 2048
    fixed_width: bool = False

    def __call__(self, features: Sequence[dict]) -> dict:
        examples = [with_labels(f) for f in features]
        rows = pack_rows([len(e["input_ids"]) for e in examples], self.row_len)
        return collate_packed(examples, rows, self.pad_id, self.row_len if self.fixed_width else None)


def with_labels(f: dict) -> dict:
    """`input_ids` and `labels` of a feature that carries labels, TRL's completion_mask, or neither (every token)."""
    ids = list(f["input_ids"])
    if "labels" in f:
        return {"input_ids": ids, "labels": list(f["labels"])}
    mask = f.get("completion_mask") or f.get("assistant_masks")
    if mask is None:
        return {"input_ids": ids, "labels": ids}
    return {"input_ids": ids, "labels": [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]}


def collate_packed(examples: Sequence[dict], rows: Sequence[Sequence[int]], pad_id: int,
                   width: int | None = None) -> dict:
    """Rows of concatenated sequences: input_ids, position_ids (restart per sequence), labels.

    `width` fixes the row length (flex_attention compiles once per shape); default: the fullest row.
    """
    width = max([sum(len(examples[i]["input_ids"]) for i in row) for row in rows] + [width or 0])
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    lab = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            x, y = examples[i]["input_ids"], examples[i]["labels"]
            n = len(x)
            ids[r, at:at + n] = torch.as_tensor(x)
            pos[r, at:at + n] = torch.arange(n)
            lab[r, at:at + n] = torch.as_tensor(y)
            lab[r, at] = IGNORE_INDEX  # a sequence's first token is never a target across the seam
            at += n
        # The tail is its own segment (positions from 0), attended only by itself, never a target.
        pos[r, at:] = torch.arange(width - at)
    return {"input_ids": ids, "position_ids": pos, "labels": lab}


def collate_padded(examples: Sequence[dict], pad_id: int) -> dict:
    """The plain (unpacked) batch: right-padded to the longest sequence, with an attention mask."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(examples), width), dtype=torch.long)
    lab = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for r, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[r, :n] = torch.as_tensor(e["input_ids"])
        att[r, :n] = 1
        lab[r, :n] = torch.as_tensor(e["labels"])
        lab[r, 0] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": att, "labels": lab}


def count_targets(batch: dict) -> int:
    """Positions that carry a loss (labels shifted by one, as the causal LM predicts)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


class RankBatches:
    """Batch sampler: the rank's micro-batches of one global order, the same on any world size.

    Each epoch the rows are permuted by (seed, epoch) alone and cut into micro-batches; rank r takes
    micro-batches r, r+world, ... So the micro-batches of one optimizer step (accumulation x world of
    them) are the same rows, packed the same way, whether 1 process accumulates them or N ranks split
    them: with the loss divided by the step's global target count (the Trainer all-reduces it) the
    gradient is the same. When the epoch's micro-batch count is not a multiple of the world size, the
    short ranks get a `blank` micro-batch (one pad token, no target): it adds nothing to the loss or
    the gradient but keeps every rank at the same number of forward/backward passes.
    """

    def __init__(self, n_rows: int, micro_batch: int, seed: int, rank: int = 0, world: int = 1, blank: int | None = None):
        self.n, self.micro, self.seed, self.rank, self.world = n_rows, micro_batch, seed, rank, world
        self.blank = n_rows if blank is None else blank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def global_batches(self) -> list[list[int]]:
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        return [perm[i:i + self.micro] for i in range(0, self.n, self.micro)]

    def __iter__(self):
        batches = self.global_batches()
        batches += [[self.blank]] * (-len(batches) % self.world)
        return iter(batches[self.rank::self.world])

    def __len__(self) -> int:
        return -(-(-(-self.n // self.micro)) // self.world)


class WithBlank:
    """A dataset plus one last row that carries no target (RankBatches' filler)."""

    def __init__(self, rows, pad_id: int):
        self.rows, self.pad_id = rows, pad_id

    def __len__(self) -> int:
        return len(self.rows) + 1

    def __getitem__(self, i: int) -> dict:
        if i == len(self.rows):
            return {"input_ids": [self.pad_id], "labels": [IGNORE_INDEX]}
        return self.rows[i]
