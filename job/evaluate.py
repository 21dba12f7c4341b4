"""`python -m job evaluate`: the paper's metrics on the test split, and a report.

Two modes (say in every output which one produced a number):
- `sample`: the paper's protocol. One sampled answer per test row from the row's own prompt
  (temperature/top_p/max_new_tokens from the config's eval section), first integer parsed;
  unparseable answers are counted and reported, never silently dropped.
- `distribution`: the model's exact probability for every answer of the row's scale, from one
  batched forward per group of rows. Each candidate answer is its full token sequence plus the
  end token (<|im_end|>), so "1" and "10" are told apart exactly. The candidates of a row share a
  prefix tree laid after the prompt in the same sequence; a 4-D attention mask lets each tree
  node see the prompt and its own ancestors only ("tree attention"), and the LM head runs only on
  the positions whose next token is scored.

A model-free baseline (`--baseline uniform`: equal mass on every answer of each cell's scale) loads
no model and writes the same outputs in seconds, under "uniform/distribution".

Each row's answer scale is the one its stimulus states (contracts/scale.py); only a row that states
none falls back to its cell's human min..max.

Results accumulate in OUT/metrics.json under "<base|fine-tuned>/<mode>", so a base run and a
fine-tuned run into the same OUT sit side by side in OUT/report.html. OUT/cells.jsonl is rewritten
from them: one line per cell (study, condition, task, scale used and its source, human n, W under
each result and the uniform guess), so two runs compare cell by cell.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from contracts._io import atomic_write_json
from contracts.config import EVAL_MODES, RunConfig, load_config
from contracts.errors import ContractError
from contracts.events import EventWriter
from contracts.scale import Scale, as_scale
from job import data as D
from job import dist  # stdlib until torchrun is in use
from job import metrics as M

METRICS_FILE = "metrics.json"
CELLS_FILE = "cells.jsonl"
BASELINES = ("uniform",)
DEFAULT_TOKENS_PER_BATCH = 32768  # H200, merged bf16: 17.2k tok/s at 32768 = 65536 (17.1k), peak 33.5 GiB
EVAL_PRECISIONS = ("auto", "bf16", "nf4")
HEAD_CHUNK = 4096  # scored positions per LM-head call: the fp32 logits of all of them at once take GiBs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="run config (model, tokenizer, eval settings); "
                   "required unless --baseline")
    p.add_argument("--data", required=True, help="folder written by `python -m job prepare` (test.jsonl)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--adapter", default=None, help="LoRA adapter folder (the fine-tuned model)")
    which.add_argument("--base", action="store_true", help="evaluate the base model without an adapter")
    which.add_argument("--baseline", choices=BASELINES, default=None,
                       help="score a model-free baseline instead of a model (uniform: equal mass on every "
                       "answer of each cell's scale); loads no model, takes seconds")
    p.add_argument("--mode", choices=EVAL_MODES, default=None, help="sample (the paper's) | distribution "
                   "(exact answer probabilities); default: the config's eval.mode")
    p.add_argument("--rows", type=int, default=None, help="cap on test rows, kept cell by cell (default: eval.rows)")
    p.add_argument("--out", required=True, help="folder for metrics.json, report.html and the plots")
    p.add_argument("--events", default=None, help="events file to append to (default: OUT/events.jsonl)")
    p.add_argument("--train-events", default=None, help="training events.jsonl for the loss curve "
                   "(default: the first of OUT/events.jsonl, OUT/../events.jsonl with step events)")
    p.add_argument("--compare", nargs="*", default=None, help="other evaluate OUT folders whose results the "
                   "report shows beside these (default: sibling folders of OUT holding a metrics.json)")
    p.add_argument("--tokens-per-batch", type=int, default=DEFAULT_TOKENS_PER_BATCH,
                   help="distribution mode: tokens per forward (prompt + answer tree, padded)")
    p.add_argument("--eval-precision", choices=EVAL_PRECISIONS, default="auto",
                   help="bf16: dequantize the 4-bit base once and merge the adapter into it (dense GEMMs; "
                   "fp32 on CPU); nf4: the model as train built it (4-bit base + separate adapter); "
                   "auto: bf16 when the GPU's free memory holds the dense model, else nf4 (always nf4 on CPU)")


def run(args: argparse.Namespace) -> int:
    if getattr(args, "baseline", None):
        return run_baseline(args)
    if not args.config:
        raise ContractError("evaluate: give --config FILE (the run config) to score a model, or --baseline uniform")
    cfg = load_config(args.config)
    mode = args.mode or cfg.eval.mode
    rows_cap = args.rows if args.rows is not None else cfg.eval.rows
    if rows_cap is not None and rows_cap < 1:
        raise ContractError(f"--rows: {rows_cap} is not accepted (a whole number >= 1)")
    if not args.base and not args.adapter:
        raise ContractError("evaluate: give --adapter DIR (the fine-tuned model), --base, or --baseline uniform")
    if args.adapter and not (Path(args.adapter) / "adapter_config.json").is_file():
        raise ContractError(f"--adapter {args.adapter}: no adapter_config.json there (give the folder train wrote)")
    from job.prepare import check_out

    out = check_out(args.out)  # not "" (the current folder), not an existing file
    rows = select_rows(D.read_split(args.data, "test"), rows_cap, cfg.data.seed)
    # Under torchrun every rank scores its share of the batches; rank 0 gathers, scores and writes.
    dist.init()
    shard = (dist.rank(), dist.world_size())
    events = EventWriter(Path(args.events) if args.events else out / "events.jsonl", echo=True) \
        if dist.is_main() else dist.QuietEvents()
    which = "fine-tuned" if args.adapter else "base"
    events.emit("start", verb="evaluate", mode=mode, model=which, rows=len(rows))

    tok, model = load_model(cfg, args.adapter, args.eval_precision, args.tokens_per_batch)
    precision = "bf16" if getattr(model, "_eval_dense", False) else "nf4"
    events.emit("log", message=f"evaluate: weights {precision} ({'merged dense' if precision == 'bf16' else 'as trained'})")
    t0 = time.perf_counter()
    if mode == "sample":
        preds = dist.merge(sample_answers(model, tok, rows, cfg, shard=shard))
        if preds is None:  # not rank 0: its share went to rank 0
            dist.destroy()
            return 0
        records = [_record(r, sample=p.value) for r, p in zip(rows, preds)]
        prompt_tokens = sum(p.prompt_tokens for p in preds)
        extra: dict[str, Any] = {"examples": [{"answer": p.text, "human": r["response"]}
                                              for r, p in list(zip(rows, preds))[:20]]}
    else:
        scales = row_scales(rows)
        dists = dist.merge(score_distributions(model, tok, rows, scales, cfg.model.system_prompt, args.tokens_per_batch,
                                               shard=shard))
        if dists is None:
            dist.destroy()
            return 0
        records = [_record(r, values=d.values, probs=d.probs) for r, d in zip(rows, dists)]
        prompt_tokens = sum(d.prompt_tokens for d in dists)
        scored = [d for d in dists if d.values]
        extra = {"valid_mass": sum(d.valid_mass for d in scored) / len(scored) if scored else None,
                 "rows_unscored_unbounded": len(dists) - len(scored)}
    seconds = time.perf_counter() - t0
    result = M.evaluate(records, mode)
    result.update(extra, model=which, adapter=args.adapter, base_model=cfg.model.id, seconds=seconds,
                  eval_precision=precision,
                  prompt_tokens=prompt_tokens, prompt_tokens_per_s=prompt_tokens / seconds if seconds else None)

    return _write_outputs(out, f"{which}/{mode}", result, events, args)


def run_baseline(args: argparse.Namespace) -> int:
    """A model-free baseline on the test split: metrics.json, cells.jsonl and the report, as a model run
    writes them, under the key "<baseline>/distribution" (the baseline is a distribution over each scale)."""
    if args.mode == "sample":
        raise ContractError(f"--mode sample with --baseline {args.baseline}: not accepted (a baseline is a "
                            "distribution over each scale; leave --mode out or give distribution)")
    cfg = load_config(args.config) if args.config else None
    rows_cap = args.rows if args.rows is not None else (cfg.eval.rows if cfg else None)
    if rows_cap is not None and rows_cap < 1:
        raise ContractError(f"--rows: {rows_cap} is not accepted (a whole number >= 1)")
    from job.prepare import check_out

    out = check_out(args.out)
    rows = select_rows(D.read_split(args.data, "test"), rows_cap, cfg.data.seed if cfg else 42)
    events = EventWriter(Path(args.events) if args.events else out / "events.jsonl", echo=True)
    events.emit("start", verb="evaluate", mode="distribution", model=args.baseline, rows=len(rows))
    t0 = time.perf_counter()
    records = baseline_records(rows, args.baseline)
    result = M.evaluate(records, "distribution")
    seconds = time.perf_counter() - t0
    scored = sum(1 for r in records if r.values)
    result.update(model=args.baseline, baseline=args.baseline, adapter=None,
                  base_model=None, seconds=seconds, eval_precision=None, prompt_tokens=0,
                  prompt_tokens_per_s=None, valid_mass=1.0 if scored else None,
                  rows_unscored_unbounded=len(records) - scored)
    return _write_outputs(out, f"{args.baseline}/distribution", result, events, args)


def baseline_records(rows: Sequence[dict], baseline: str = "uniform") -> list[M.Record]:
    """Each row's prediction under a model-free baseline. uniform: equal probability on every answer
    of the row's scale (its stated scale, step grid included; else its cell's human min..max)."""
    if baseline not in BASELINES:
        raise ContractError(f"--baseline {baseline!r}: not accepted ({' | '.join(BASELINES)})")
    out = []
    for r, s in zip(rows, row_scales(rows)):
        values = s.values() if s is not None else None
        out.append(_record(r, values=values, probs=[1.0] * len(values) if values else None))
    return out


def _write_outputs(out: Path, key: str, result: dict, events: EventWriter, args: argparse.Namespace) -> int:
    all_metrics = _load_metrics(out)
    all_metrics.setdefault("results", {})[key] = result
    all_metrics.update(paper_table2=M.PAPER_TABLE2, dpd_definition=M.DPD_DEFINITION)
    atomic_write_json(out / METRICS_FILE, all_metrics)
    cells = write_cells(out, all_metrics["results"])
    from job import report

    shown = {"results": {**_compared(out, args.compare), **all_metrics["results"]},
             **{k: v for k, v in all_metrics.items() if k != "results"}}
    html = report.write_report(out, shown, report.find_train_events(out, args.train_events))
    summary = summarize(result)
    events.emit("eval", metrics=summary, key=key, report=str(html))
    print(f"{key}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in summary.items()))
    print(f"cells: {cells}")
    print(f"report: {html}")
    dist.destroy()
    return 0


def cell_lines(results: dict[str, dict]) -> list[dict]:
    """One line per cell over every result in OUT/metrics.json: study, condition, task, the scale
    used and its source, human n, and W under each result key and the uniform guess (w["uniform"]);
    a cell a result did not score names why under `skipped` (too_few, constant, unbounded,
    scale_conflict, no_valid_prediction)."""
    lines: dict[tuple, dict] = {}
    for key, res in sorted(results.items()):
        for c in res.get("cells") or []:
            line = _cell_line(lines, c)
            line["w"][key] = c.get("w")
            line["w"]["uniform"] = c.get("w_uniform")
        for c in res.get("cells_skipped") or []:
            line = _cell_line(lines, c)
            line["skipped"][key] = c.get("skipped")
            if c.get("scales"):
                line["scales"] = c["scales"]
    return [lines[k] for k in sorted(lines)]


def _cell_line(lines: dict, c: dict) -> dict:
    study, cond, task = c["cell"]
    k = (str(study), int(cond), int(task))
    if k not in lines:
        lines[k] = {"study_id": k[0], "condition_num": k[1], "task_num": k[2], "scale": c.get("scale"),
                    "scale_source": c.get("scale_source"), "human_n": c.get("n"), "w": {}, "skipped": {}}
    return lines[k]


def write_cells(out: Path, results: dict[str, dict]) -> Path:
    """OUT/cells.jsonl, rewritten whole (atomically) from every result OUT/metrics.json holds."""
    path = out / CELLS_FILE
    tmp = path.with_name(f".{CELLS_FILE}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for line in cell_lines(results):
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


# --- Rows and scales -------------------------------------------------------------------------

def select_rows(rows: list[dict], cap: int | None, seed: int) -> list[dict]:
    """At most `cap` rows, taken whole cell by cell in a seeded order (a cell's W needs its rows)."""
    if cap is None or cap >= len(rows):
        return rows
    by_cell: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        by_cell[(r["study_id"], r["condition_num"], r["task_num"])].append(r)
    cells = sorted(by_cell)
    random.Random(seed).shuffle(cells)
    kept: list[dict] = []
    for c in cells:
        kept.extend(by_cell[c][: cap - len(kept)])
        if len(kept) >= cap:
            break
    return kept


def stated_scale(r: dict) -> Scale | None:
    """The answer scale a row's stimulus (else its prompt) states (contracts/scale.py), or None."""
    return M.parse_scale(r.get("stimuli") or r.get("prompt") or "")


def row_scales(rows: Sequence[dict]) -> list[Scale | None]:
    """Each row's answer scale: the one its stimulus states (a step grid's candidates are the grid's
    points), else its cell's human min..max; None for scales over 101 levels (unbounded: excluded
    from the metric, so not scored)."""
    human: dict[tuple, list[int]] = defaultdict(list)
    for r in rows:
        human[(r["study_id"], r["condition_num"], r["task_num"])].append(int(r["response"]))
    out = []
    for r in rows:
        s = stated_scale(r)
        if s is None:
            h = human[(r["study_id"], r["condition_num"], r["task_num"])]
            s = Scale(min(h), max(h)) if max(h) > min(h) else None
        out.append(s if s is not None and s.levels <= M.MAX_LEVELS else None)
    return out


def _record(r: dict, **pred: Any) -> M.Record:
    return M.Record(r["study_id"], r["condition_num"], r["task_num"], r["response"], stated_scale(r),
                    r.get("demographic") or {}, **pred)


# --- The model -------------------------------------------------------------------------------

def load_model(cfg: RunConfig, adapter: str | None, precision: str = "nf4",
               tokens_per_batch: int = DEFAULT_TOKENS_PER_BATCH):
    """(tokenizer, model in eval mode) for this config, with the adapter applied when given;
    dense and merged when `precision` (auto|bf16|nf4) asks for it and, for auto, the GPU holds it."""
    import torch

    from job.tokenizer import load_tokenizer

    if precision not in EVAL_PRECISIONS:
        raise ContractError(f"--eval-precision: {precision!r} is not accepted ({' | '.join(EVAL_PRECISIONS)})")
    tok = load_tokenizer(cfg.model.tokenizer, cfg.model.id, cfg.model.revision)
    model = _load_base(cfg, tok)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    model.requires_grad_(False)  # no autograd graph, without flipping the process-wide grad mode
    dev = _device(model)
    free = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else None
    dtype = _core(model)[1].weight.dtype
    hidden = _core(model)[0].config.hidden_size
    need = extra_dense_bytes(model, dtype) + activation_bytes(tokens_per_batch, hidden)
    if choose_precision(precision, free, need) == "bf16":
        model = merge_dense(model, dtype).requires_grad_(False)
    return tok, model


def choose_precision(requested: str, free_bytes: int | None, needed_bytes: int) -> str:
    """bf16 or nf4. auto: bf16 only on a GPU (free_bytes given) whose free memory covers the growth
    from 4-bit to dense plus one forward's activations; CPU evaluation is for checks, kept as built."""
    if requested != "auto":
        return requested
    return "bf16" if free_bytes is not None and free_bytes >= needed_bytes else "nf4"


def activation_bytes(tokens_per_batch: int, hidden: int) -> int:
    """Peak activations of one scoring forward, with slack (bench-14b, H200: ~9 GiB at 32768 tokens)."""
    return tokens_per_batch * hidden * 64 + 2 * 2**30


def _is_4bit(m) -> bool:
    return type(m).__name__ == "Linear4bit" and type(m).__module__.startswith("bitsandbytes")


def extra_dense_bytes(model, dtype) -> int:
    """How much more memory the model takes once every 4-bit weight is dense in `dtype`."""
    import torch

    size = torch.empty((), dtype=dtype).element_size()
    extra = 0
    for m in model.modules():
        if _is_4bit(m):
            extra += m.in_features * m.out_features * size - m.weight.data.numel() * m.weight.data.element_size()
    return extra


def merge_dense(model, dtype):
    """The plain causal LM with every 4-bit weight dequantized to `dtype` and the active LoRA adapters
    merged in (W + B@A*scaling, summed in fp32), one layer at a time: evaluation runs dense GEMMs only."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    _densify_(base, dtype)
    base._eval_dense = True
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the freed 4-bit blocks
    return base


def _densify_(module, dtype) -> None:
    from peft.tuners.lora import LoraLayer

    for name, child in list(module.named_children()):
        if isinstance(child, LoraLayer):
            dense = _dense_linear(child.get_base_layer(), dtype)
            w = dense.weight.data.float()
            for a in child.active_adapters:
                if a in child.lora_A:
                    if child.use_dora.get(a):
                        raise ContractError(f"--eval-precision bf16: adapter {a!r} uses DoRA (merge not supported; use nf4)")
                    w += child.get_delta_weight(a).float()
            dense.weight.data = w.to(dtype)
            setattr(module, name, dense)
        elif _is_4bit(child):
            setattr(module, name, _dense_linear(child, dtype))
        else:
            _densify_(child, dtype)


def _dense_linear(layer, dtype):
    """An nn.Linear in `dtype` with the weights of `layer` (bnb 4-bit dequantized, or a plain Linear)."""
    import torch
    from torch import nn

    if _is_4bit(layer):
        import bitsandbytes.functional as F

        data, state = layer.weight.data, layer.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # bnb repacks for its CPU bf16 kernel on an eval forward
            data, state = F._convert_weight_packed_for_cpu_inverse(data, state)
        w = F.dequantize_4bit(data, state).to(dtype)
    else:
        w = layer.weight.data.to(dtype)
    lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    lin.weight = nn.Parameter(w, requires_grad=False)
    if layer.bias is not None:
        lin.bias = nn.Parameter(layer.bias.data.to(dtype), requires_grad=False)
    return lin


def _load_base(cfg: RunConfig, tok):
    """The base exactly as train built it (job/model.py: same seed, same 4-bit NF4), so an adapter fits."""
    import torch

    from job import model as JM
    from job.tokenizer import padded_vocab

    from job.dist import local_rank

    device = torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    dtype = JM.compute_dtype(cfg, device)
    quantize = cfg.train.method == "qlora"
    if cfg.model.init == "random":
        return JM.build_random(JM.qwen2_config(cfg, padded_vocab(tok)), device, dtype, quantize, cfg.train.seed)
    return JM.load_pretrained(cfg, device, dtype, quantize)


def _device(model):
    return next(model.parameters()).device


def _core(model):
    """(decoder, lm_head) of a causal LM, through a PeftModel wrapper if there is one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model, base.lm_head


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
    dev = _device(model)
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
    trees: dict[Scale, _Tree] = {}
    for s in scales:
        if s is not None and s not in trees:
            trees[s] = answer_tree(tok, s, end)
    out: list[Distribution | None] = [Distribution([], [], 0.0, len(ids[i])) if shard[0] == 0 else None
                                      for i in range(len(rows))]
    todo = [i for i in range(len(rows)) if scales[i] is not None]
    todo.sort(key=lambda i: len(ids[i]) + len(trees[scales[i]].node_tokens))
    decoder, head = _core(model)
    dev = _device(model)
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


def score_one_by_one(model, tok, prompt: list[int], lo: int, hi: int, values: Sequence[int] | None = None
                     ) -> list[float]:
    """The naive reference: one full forward per candidate answer, standard causal attention.
    Slow (the prompt is recomputed per answer); the tests and the bench compare against it."""
    import torch

    end = D.answer_end_id(tok)
    dev = _device(model)
    scores = []
    for v in (range(lo, hi + 1) if values is None else values):
        ans = list(tok(str(v), add_special_tokens=False)["input_ids"]) + [end]
        ids = torch.tensor([prompt + ans[:-1]], device=dev)
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
        scores.append(sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(ans)))
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    return [w / sum(weights) for w in weights]


# --- Outputs ---------------------------------------------------------------------------------

SUMMARY_KEYS = ("mode", "model", "rows", "cells_scored", "studies_scored", "wasserstein", "wasserstein_uniform",
                "individual_accuracy", "invalid_rate", "cells_unbounded", "cells_scale_conflict", "cells_human_range",
                "prompt_tokens_per_s")


def summarize(result: dict) -> dict:
    s = {k: result.get(k) for k in SUMMARY_KEYS}
    s["demographic_parity_difference"] = (result.get("demographic_parity_difference") or {}).get("value")
    return s


def _compared(out: Path, folders: list[str] | None) -> dict:
    """Results of other evaluations (e.g. out/eval-base beside out/eval), for the report only."""
    if folders is None:
        folders = [str(p.parent) for p in sorted(out.resolve().parent.glob(f"*/{METRICS_FILE}"))
                   if p.parent != out.resolve()]
    merged: dict = {}
    for f in folders:
        merged.update(_load_metrics(Path(f)).get("results", {}))
    return merged


def _load_metrics(out: Path) -> dict:
    f = out / METRICS_FILE
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except ValueError:
        return {}  # a damaged earlier file is replaced, not trusted


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)
