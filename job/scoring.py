"""Answer scoring: the model's answer to each test row, the two ways `job evaluate` and `job predict` use.

- `sample_answers`: one sampled answer per row from its own prompt (the paper's protocol), batched
  by prompt length; the first integer of the text is the answer (job/metrics.py's parse_answer).
- `score_distributions`: the exact probability of every answer on the row's scale, from one batched
  forward per group of rows. Each candidate answer is its full token sequence plus the end token
  (<|im_end|>), so "1" and "10" are told apart exactly. The candidates of a row share a prefix tree
  laid after the prompt in the same sequence; a 4-D attention mask lets each tree node see the
  prompt and its own ancestors only ("tree attention"), and the LM head runs only on the positions
  whose next token is scored.

Which scale a row is scored on: the one its stimulus states (contracts/scale.py); a row that states
none is not scored (`row_scales`): its answers never decide its scale.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from contracts.config import RunConfig
from contracts.scale import Scale, as_scale, parse_scale
from job import data as D
from job import metrics as M
from job.load import DEFAULT_TOKENS_PER_BATCH, core, device_of

HEAD_CHUNK = 4096  # scored positions per LM-head call: the fp32 logits of all of them at once take GiBs


# --- Rows and scales -------------------------------------------------------------------------

def stated_scale(r: dict) -> Scale | None:
    """The answer scale a row's stimulus (else its prompt) states (contracts/scale.py), or None."""
    return parse_scale(r.get("stimuli") or r.get("prompt") or "")


def row_scales(rows: Sequence[dict]) -> list[Scale | None]:
    """Each row's answer scale: the one its stimulus states (a step grid's candidates are the grid's
    points); None where it states none or one of over 101 levels (unbounded): such a row is not
    scored, and its cell is skipped and counted by job/metrics.py."""
    return [s if s is not None and s.levels <= M.MAX_LEVELS else None for s in map(stated_scale, rows)]


def prompt_ids(tok, rows: Sequence[dict], system_prompt: str) -> list[list[int]]:
    """The chat-templated prompt of each row, as train saw it, up to the assistant turn."""
    texts = [tok.apply_chat_template(D.messages(r, system_prompt), tokenize=False, add_generation_prompt=True)
             for r in rows]
    return [list(x) for x in tok(texts, add_special_tokens=False)["input_ids"]]


# --- Sample mode -----------------------------------------------------------------------------

@dataclass
class Sampled:
    text: str
    value: int | None
    prompt_tokens: int


def sample_answers(model, tok, rows: Sequence[dict], cfg: RunConfig, seed: int | None = None,
                   shard: tuple[int, int] = (0, 1)) -> list[Sampled | None]:
    """One sampled answer per row (the paper's protocol), batched by similar prompt length.

    shard (rank, world): this rank samples batches rank, rank+world, ... of the one batch plan (None
    for the other rows); each batch draws from its own seed, so the answers do not depend on the split."""
    import torch

    e = cfg.eval
    seed = cfg.train.seed if seed is None else seed
    ids = prompt_ids(tok, rows, cfg.model.system_prompt)
    order = sorted(range(len(rows)), key=lambda i: len(ids[i]))
    dev = device_of(model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else D.answer_end_id(tok)
    out: list[Sampled | None] = [None] * len(rows)
    for k, start in enumerate(range(0, len(order), e.batch_size)):
        if k % shard[1] != shard[0]:
            continue
        torch.manual_seed(seed + 1_000_003 * k)  # batch 0: the seed itself, as before sharding
        batch = order[start:start + e.batch_size]
        width = max(len(ids[i]) for i in batch)
        # Left padding: every row's answer starts right after its own prompt.
        input_ids = torch.tensor([[pad] * (width - len(ids[i])) + ids[i] for i in batch], device=dev)
        mask = torch.tensor([[0] * (width - len(ids[i])) + [1] * len(ids[i]) for i in batch], device=dev)
        gen = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=e.temperature > 0,
                             temperature=e.temperature if e.temperature > 0 else None,
                             top_p=e.top_p, max_new_tokens=e.max_new_tokens, pad_token_id=pad,
                             eos_token_id=D.answer_end_id(tok))
        for j, i in enumerate(batch):
            text = tok.decode(gen[j, width:], skip_special_tokens=True)
            out[i] = Sampled(text, M.parse_answer(text), len(ids[i]))
    return out  # type: ignore[return-value]


# --- Distribution mode -----------------------------------------------------------------------

@dataclass
class Distribution:
    values: list[int]
    probs: list[float]
    """Normalized over the scale's answers."""
    valid_mass: float
    """How much of the model's probability the scale's answers hold (the rest: anything else)."""
    prompt_tokens: int


@dataclass
class _Tree:
    """A scale's candidate answers as a prefix tree of tokens."""

    values: list[int]
    node_tokens: list[int]
    node_parent: list[int]  # -1: the prompt's last token
    node_depth: list[int]  # 1-based offset after the prompt
    paths: list[list[tuple[int, int]]]  # per value: (context node, or -1, scored token)
    _anc: dict = field(default_factory=dict)

    def ancestors(self, device):
        """[i, j]: node j is node i or one of its ancestors (what node i may attend to), cached per device."""
        key = str(device)
        if key not in self._anc:
            import torch

            n = len(self.node_tokens)
            anc = torch.zeros((n, n), dtype=torch.bool)
            for i in range(n):
                j = i
                while j >= 0:
                    anc[i, j] = True
                    j = self.node_parent[j]
            self._anc[key] = anc.to(device)
        return self._anc[key]


def answer_tree(tok, scale: Scale | tuple[int, int], end_id: int) -> _Tree:
    """The prefix tree of every answer on `scale` (a step grid: its points only), each + `end_id`."""
    values = as_scale(scale).values()
    encoded = tok([str(v) for v in values], add_special_tokens=False)["input_ids"]
    index: dict[tuple[int, ...], int] = {}
    tokens, parent, depth, paths = [], [], [], []
    for seq in encoded:
        seq = list(seq) + [end_id]
        path = []
        for j, t in enumerate(seq):
            path.append((index[tuple(seq[:j])] if j else -1, t))
            if j < len(seq) - 1:  # the end token is only scored, never fed
                key = tuple(seq[: j + 1])
                if key not in index:
                    index[key] = len(tokens)
                    tokens.append(seq[j])
                    parent.append(index[tuple(seq[:j])] if j else -1)
                    depth.append(j + 1)
        paths.append(path)
    return _Tree(values, tokens, parent, depth, paths)


def score_distributions(model, tok, rows: Sequence[dict], scales: Sequence[Scale | tuple[int, int] | None],
                        system_prompt: str, tokens_per_batch: int = DEFAULT_TOKENS_PER_BATCH,
                        ids: Sequence[list[int]] | None = None, shard: tuple[int, int] = (0, 1)) -> list[Distribution | None]:
    """Exact P(answer) for every answer of each row's scale; rows without a scale get none.

    shard (rank, world): this rank scores batches rank, rank+world, ... of the one batch plan (the
    same batches as one process, so the same numbers bit for bit); the other rows are None."""
    import torch

    ids = list(ids) if ids is not None else prompt_ids(tok, rows, system_prompt)
    end = D.answer_end_id(tok)
    scales = [as_scale(s) for s in scales]
    trees: dict[Scale, _Tree] = {s: answer_tree(tok, s, end) for s in set(scales) - {None}}
    out: list[Distribution | None] = [Distribution([], [], 0.0, len(ids[i])) if shard[0] == 0 else None
                                      for i in range(len(rows))]
    todo = [i for i in range(len(rows)) if scales[i] is not None]
    todo.sort(key=lambda i: len(ids[i]) + len(trees[scales[i]].node_tokens))
    decoder, head = core(model)
    dev = device_of(model)
    dtype = head.weight.dtype if head.weight.dtype.is_floating_point else torch.bfloat16
    batch: list[int] = []
    n_batch = 0
    for n, i in enumerate(todo):
        batch.append(i)
        nxt = todo[n + 1] if n + 1 < len(todo) else None
        width = len(ids[nxt]) + len(trees[scales[nxt]].node_tokens) if nxt is not None else 0
        if nxt is None or width * (len(batch) + 1) > tokens_per_batch:
            if n_batch % shard[1] == shard[0]:
                for k in batch:
                    out[k] = out[k] or Distribution([], [], 0.0, len(ids[k]))
                _score_batch(decoder, head, dev, dtype, [ids[k] for k in batch],
                             [trees[scales[k]] for k in batch], [out[k] for k in batch])
            else:
                for k in batch:
                    out[k] = None
            n_batch += 1
            batch = []
    return out


def _score_batch(decoder, head, dev, dtype, prompts: list[list[int]], trees: list[_Tree],
                 outs: list[Distribution]) -> None:
    import torch

    lens = [len(p) + len(t.node_tokens) for p, t in zip(prompts, trees)]
    width = max(lens)
    b = len(prompts)
    input_ids = torch.zeros((b, width), dtype=torch.long)
    pos = torch.zeros((b, width), dtype=torch.long)
    # The mask is built on the device with a few slice writes per row (no per-node Python loop).
    allowed = torch.zeros((b, width, width), dtype=torch.bool, device=dev)
    causal = torch.ones((width, width), dtype=torch.bool, device=dev).tril()
    gather_rows, gather_cols = [], []
    for r, (p, t) in enumerate(zip(prompts, trees)):
        L, n = len(p), len(t.node_tokens)
        input_ids[r, :L] = torch.tensor(p)
        input_ids[r, L:lens[r]] = torch.tensor(t.node_tokens, dtype=torch.long)
        pos[r, :L] = torch.arange(L)
        pos[r, L:lens[r]] = L - 1 + torch.tensor(t.node_depth, dtype=torch.long)
        allowed[r, :L, :L] = causal[:L, :L]
        allowed[r, L:L + n, :L] = True  # every answer node sees the whole prompt
        allowed[r, L:L + n, L:L + n] = t.ancestors(dev)  # and its own ancestors in the tree
        allowed[r].diagonal()[lens[r]:] = True  # padding sees itself: no all-masked softmax row
        gather_rows += [r] * (n + 1)
        gather_cols += [L - 1] + [L + k for k in range(n)]
    mask = torch.zeros((b, 1, width, width), dtype=dtype, device=dev)
    mask.masked_fill_(~allowed.unsqueeze(1), torch.finfo(dtype).min)
    del allowed
    hidden = decoder(input_ids=input_ids.to(dev), attention_mask=mask, position_ids=pos.to(dev),
                     use_cache=False).last_hidden_state
    sel = hidden[torch.tensor(gather_rows, device=dev), torch.tensor(gather_cols, device=dev)]
    # Only the (context, token) pairs on some answer's path leave the GPU.
    ctx_idx, tok_idx, bounds, at = [], [], [], 0
    for t in trees:
        for path in t.paths:
            ctx_idx += [at + ctx + 1 for ctx, _ in path]  # row `at`: after the prompt; at+1+k: after node k
            tok_idx += [tokid for _, tokid in path]
            bounds.append(len(path))
        at += len(t.node_tokens) + 1
    picked = _head_logprobs(head, sel, torch.tensor(ctx_idx, device=dev), torch.tensor(tok_idx, device=dev))
    k = 0
    paths = iter(bounds)
    for t, o in zip(trees, outs):
        scores = []
        for _ in t.paths:
            n = next(paths)
            scores.append(sum(picked[k:k + n]))
            k += n
        top = max(scores)
        weights = [math.exp(s - top) for s in scores]
        total = sum(weights)
        o.values = list(t.values)
        o.probs = [w / total for w in weights]
        o.valid_mass = math.exp(top) * total


def _head_logprobs(head, sel, ctx, tok) -> list[float]:
    """log P(tok | position ctx) for each pair, the LM head run chunk by chunk over `sel`'s positions."""
    import torch

    picked = torch.empty(len(ctx), dtype=torch.float64, device=sel.device)
    for s in range(0, sel.shape[0], HEAD_CHUNK):
        logits = head(sel[s:s + HEAD_CHUNK]).float()
        lse = torch.logsumexp(logits, dim=-1)
        m = (ctx >= s) & (ctx < s + HEAD_CHUNK)
        c = ctx[m] - s
        picked[m] = (logits[c, tok[m]] - lse[c]).double()
    return picked.cpu().tolist()
