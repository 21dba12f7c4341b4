"""Evaluation throughput: prompt tokens/s of `distribution` mode (one forward per group of rows,
answers scored as a prefix tree) with the model merged dense (ours: `--eval-precision bf16`, the
NF4 base dequantized once and the adapter merged in) beside baselines on the same rows:
  - previous: the same tree scorer on the model as trained (4-bit NF4 base + separate LoRA),
  - naive: one forward per candidate answer on the 4-bit + LoRA model (the prompt recomputed per answer),
  - sample: the paper's protocol (generate a few tokens per row, temperature 0.6), on the merged model.
It also prints the largest probability difference between merged and 4-bit + adapter.

The model is Qwen2.5-14B's architecture with random weights, 4-bit NF4 (job/model.py's builder),
with a random-weight LoRA adapter (r=16 on all seven projections, B non-zero). Rows are
SocSci210-shaped: synthetic stimuli sized to the real prompts' mean length (~320 tokens with the
chat template) and answer scales drawn with the frequencies of the real sample (1-7, 0-100, ...).

    python bench/eval_throughput.py                       # 14B on the GPU
    python bench/eval_throughput.py --preset qwen2-tiny --rows 24 --naive-rows 2 --sample-rows 4   # CPU check

Prints a table (card, mode, rows, prompt tokens, seconds, prompt tokens/s, ratio to ours) and
writes it as JSON to --json.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from contracts.config import RunConfig, from_dict  # noqa: E402
from contracts.scale import parse_scale  # noqa: E402
from bench.reference import score_one_by_one  # noqa: E402
from job import load as JL  # noqa: E402
from job import scoring as S  # noqa: E402
from job import model as JM  # noqa: E402
from job import synthetic  # noqa: E402
from job.tokenizer import load_tokenizer, padded_vocab  # noqa: E402

# Answer scales of ../shared/fixtures/socsci210_real_sample.jsonl (rows per scale; >101 levels left out).
REAL_SCALES = {(1, 7): 896, (0, 100): 625, (1, 5): 526, (1, 4): 238, (1, 2): 155, (0, 10): 137,
               (1, 6): 65, (1, 3): 37, (0, 6): 9}


def main(preset: str = "qwen2.5-14b", rows: int = 512, naive_rows: int = 4, sample_rows: int = 64,
         tokens_per_batch: tuple[int, ...] = (32768, 65536), previous_tokens_per_batch: int = 32768,
         check_rows: int = 32, stimulus_words: int = 190, json_out: str | None = None) -> list[dict]:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    card = torch.cuda.get_device_name(0) if cuda else "cpu"
    cfg = from_dict({"model": {"id": f"random-{preset}", "init": "random", "arch": {"preset": preset},
                               "tokenizer": "qwen2.5-offline"},
                     "train": {"method": "qlora", "precision": "bf16", "gradient_checkpointing": False},
                     "eval": {"batch_size": 32}, "allow_cpu": True})
    tok = load_tokenizer(cfg.model.tokenizer)
    t0 = time.perf_counter()
    model = random_adapter_model(cfg, tok, device)
    print(f"built {preset} (4-bit, random LoRA) on {card} in {time.perf_counter() - t0:.0f}s", flush=True)

    data = bench_rows(rows, stimulus_words)
    scales = [parse_scale(r["stimuli"]) for r in data]
    ids = S.prompt_ids(tok, data, cfg.model.system_prompt)
    table = []

    def tree(label: str, tpb: int) -> None:
        _reset_peak(cuda)
        try:
            sec = _timed(lambda: S.score_distributions(model, tok, data, scales, "", tpb, ids=ids), cuda)
        except torch.OutOfMemoryError as e:
            print(f"{label}, {tpb} tok/batch: out of memory ({e})", flush=True)
            return
        table.append(_row(card, f"{label} (tree, {tpb} tok/batch)", ids, sec))
        if cuda:
            table[-1]["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        print(table[-1], flush=True)

    # The previous path: the model as train built it, 4-bit base + separate adapter.
    S.score_distributions(model, tok, data[:8], scales[:8], "", ids=ids[:8])  # warm-up: kernels, allocator
    tree("previous: 4-bit NF4 + LoRA", previous_tokens_per_batch)
    ref = S.score_distributions(model, tok, data[:check_rows], scales[:check_rows], "", ids=ids[:check_rows])
    if naive_rows:
        try:  # a baseline failing must not lose the figures around it
            sub = list(range(naive_rows))
            naive: list = []
            sec = _timed(lambda: naive.extend(score_one_by_one(model, tok, ids[i], *scales[i]) for i in sub), cuda)
            table.append(_row(card, "naive: 4-bit + LoRA, one forward per answer", [ids[i] for i in sub], sec))
            table[-1]["max_prob_diff_vs_tree"] = max(abs(a - b) for r, d in zip(naive, ref) for a, b in zip(r, d.probs))
            print(table[-1], flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"naive baseline failed: {type(e).__name__}: {e}", flush=True)

    # Ours: dequantize once, merge the adapter, dense GEMMs.
    dtype = JM.compute_dtype(cfg, device)
    free = torch.cuda.mem_get_info(0)[0] if cuda else None
    need = JL.extra_dense_bytes(model, dtype) + JL.activation_bytes(max(tokens_per_batch), model.config.hidden_size)
    print(f"auto would choose {JL.choose_precision('auto', free, need)}: free {(free or 0) / 2**30:.1f} GiB, "
          f"needs {need / 2**30:.1f} GiB", flush=True)
    box: list = []
    merge_s = _timed(lambda: box.append(JL.merge_dense(model, dtype)), cuda)
    model = box.pop()
    weights_gib = torch.cuda.memory_allocated() / 2**30 if cuda else float("nan")
    print(f"merged to dense {dtype} in {merge_s:.1f}s; weights {weights_gib:.1f} GiB", flush=True)
    S.score_distributions(model, tok, data[:8], scales[:8], "", ids=ids[:8])
    for tpb in tokens_per_batch:
        tree(f"ours: merged dense {str(dtype).removeprefix('torch.')}", tpb)
    got = S.score_distributions(model, tok, data[:check_rows], scales[:check_rows], "", ids=ids[:check_rows])
    prob_diff = max(abs(a - b) for r, g in zip(ref, got) for a, b in zip(r.probs, g.probs))
    print(f"merged vs 4-bit + adapter, {check_rows} rows: max |p diff| {prob_diff:.2e}", flush=True)
    for r in table:
        if r["mode"].startswith("ours"):
            r["max_prob_diff_vs_previous"] = prob_diff
            r["merge_seconds"] = merge_s
    if sample_rows:
        try:
            sub = data[:sample_rows]
            sec = _timed(lambda: S.sample_answers(model, tok, sub, cfg), cuda)
            table.append(_row(card, f"sample: merged, generate {cfg.eval.max_new_tokens} tokens, batch 32",
                              ids[:sample_rows], sec))
            print(table[-1], flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"sample baseline failed: {type(e).__name__}: {e}", flush=True)
    best = max(r["prompt_tokens_per_s"] for r in table if r["mode"].startswith("ours"))
    for r in table:
        r["ours_vs_this"] = best / r["prompt_tokens_per_s"]
    _print(table, preset)
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps({"preset": preset, "card": card, "rows": table}, indent=2))
    return table


def _reset_peak(cuda: bool) -> None:
    if cuda:
        torch.cuda.reset_peak_memory_stats()


def random_adapter_model(cfg: RunConfig, tok, device: torch.device):
    """4-bit random base + LoRA whose B matrices are random too (peft starts B at zero)."""
    dtype = JM.compute_dtype(cfg, device)
    base = JM.build_random(JM.qwen2_config(cfg, padded_vocab(tok)), device, dtype, True, cfg.train.seed)
    model = JM.add_lora(base, cfg)
    gen = torch.Generator(device="cpu").manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.02)
    model.eval()
    torch.set_grad_enabled(False)
    return model


def bench_rows(n: int, stimulus_words: int) -> list[dict]:
    """Synthetic rows of real prompt length, each given a scale drawn as often as in the real sample."""
    rng = random.Random(0)
    scales, weights = list(REAL_SCALES), list(REAL_SCALES.values())
    rows = synthetic.generate(n, seed=0, stimulus_words=stimulus_words)
    for r in rows:
        lo, hi = rng.choices(scales, weights)[0]
        r["stimuli"] = re.sub(r"from -?\d+ to -?\d+", f"from {lo} to {hi}", r["stimuli"])
    return rows


def _timed(fn, cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t


def _row(card: str, mode: str, ids, seconds: float) -> dict:
    tokens = sum(len(i) for i in ids)
    return {"card": card, "mode": mode, "rows": len(ids), "prompt_tokens": tokens,
            "mean_prompt_tokens": tokens / len(ids), "seconds": seconds, "prompt_tokens_per_s": tokens / seconds}


def _print(table: list[dict], preset: str) -> None:
    print(f"\neval throughput, {preset} random weights + random LoRA (prompt tokens/s)")
    print(f"{'card':<28} {'mode':<58} {'rows':>5} {'mean len':>8} {'seconds':>8} {'tok/s':>9} {'ours/this':>9}")
    for r in table:
        print(f"{r['card']:<28} {r['mode']:<58} {r['rows']:>5} {r['mean_prompt_tokens']:>8.0f} "
              f"{r['seconds']:>8.2f} {r['prompt_tokens_per_s']:>9.0f} {r['ours_vs_this']:>9.2f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="qwen2.5-14b")
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--naive-rows", type=int, default=4)
    ap.add_argument("--sample-rows", type=int, default=64)
    ap.add_argument("--tokens-per-batch", type=int, nargs="+", default=[32768, 65536], help="ours (merged)")
    ap.add_argument("--previous-tokens-per-batch", type=int, default=32768, help="the 4-bit + adapter path")
    ap.add_argument("--check-rows", type=int, default=32, help="rows whose probabilities merged vs 4-bit are compared")
    ap.add_argument("--stimulus-words", type=int, default=190)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    main(a.preset, a.rows, a.naive_rows, a.sample_rows, tuple(a.tokens_per_batch), a.previous_tokens_per_batch,
         a.check_rows, a.stimulus_words, a.json)
