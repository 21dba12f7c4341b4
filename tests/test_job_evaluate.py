"""`python -m job evaluate` end to end on CPU with the smoke model: both modes, metrics, report, plots;
and the distribution scorer checked exactly against one forward per answer."""
import json
from pathlib import Path

import numpy as np
import pytest

from contracts.config import load_config
from contracts.events import EventWriter, read_all
from job.__main__ import main as job_main
from conftest import REPO, random_adapter

SMOKE = REPO / "configs" / "smoke.yaml"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A prepared data folder (synthetic rows), a random-weight LoRA adapter on the smoke base,
    and a training events file with step events (the loss curve's input)."""
    from job.prepare import prepare

    root = tmp_path_factory.mktemp("eval")
    cfg = load_config(SMOKE)
    prepare("synthetic:240", root / "data", cfg=cfg)
    random_adapter(cfg, root / "run" / "adapter")
    events = EventWriter(root / "run" / "events.jsonl")
    for step in range(1, 11):
        events.emit("step", step=step, total_steps=10, epoch=step / 10, loss=3.0 / step, lr=1e-3,
                    tokens_per_s=100.0, gpu_mem_gib=0.0, eta_s=10 - step)
    return root


def _png_has_content(path: Path) -> float:
    import matplotlib.image as mpimg

    img = mpimg.imread(path)[..., :3]
    return float(img.reshape(-1, 3).std(axis=0).max())


@pytest.mark.slow
def test_evaluate_both_modes_writes_metrics_and_a_report_with_real_plots(prepared):
    out = prepared / "run" / "eval"
    data = str(prepared / "data")
    base = ["evaluate", "--config", str(SMOKE), "--data", data, "--out", str(out)]
    assert job_main(base + ["--adapter", str(prepared / "run" / "adapter"), "--mode", "distribution", "--rows", "24"]) == 0
    assert job_main(base + ["--base", "--mode", "distribution", "--rows", "24"]) == 0
    assert job_main(base + ["--base", "--mode", "sample", "--rows", "12"]) == 0

    metrics = json.loads((out / "metrics.json").read_text())
    res = metrics["results"]
    assert set(res) == {"fine-tuned/distribution", "base/distribution", "base/sample"}
    ft, bd, bs = res["fine-tuned/distribution"], res["base/distribution"], res["base/sample"]
    assert ft["rows"] == bd["rows"] == 24 and bs["rows"] == 12
    assert ft["cells_scored"] > 0 and 0 <= ft["wasserstein"] <= 1
    # The random adapter changes the model's distribution: not the base's numbers.
    assert ft["wasserstein"] != pytest.approx(bd["wasserstein"], abs=1e-9)
    # Same rows, same cells: the uniform guess is the same for both.
    assert ft["wasserstein_uniform"] == pytest.approx(bd["wasserstein_uniform"], abs=1e-12)
    # Sample mode counts every row's answer, valid or not (an untrained model rarely writes an integer).
    assert bs["invalid_answers"] == round(bs["invalid_rate"] * 12) and len(bs["examples"]) == 12
    assert metrics["paper_table2"]["SOCRATES-Qwen-14B"] == 0.151

    evs = [e for e in read_all(out / "events.jsonl") if e["event"] == "eval"]
    assert [e["key"] for e in evs] == ["fine-tuned/distribution", "base/distribution", "base/sample"]

    html = (out / "report.html").read_text()
    for png in ("loss.png", "per_study.png", "cells.png"):
        assert f"src='{png}'" in html
        assert _png_has_content(out / png) > 0.05, f"{png} looks blank"
    assert "distribution" in html and "sample" in html and "Demographic parity difference" in html
    assert "0.151" in html  # the paper's row, for reference


@pytest.mark.parametrize("argv,needle", [
    ([], "give --adapter DIR"),
    (["--adapter", "/nonexistent/adapter"], "no adapter_config.json"),
    (["--base", "--rows", "0"], "--rows: 0 is not accepted"),
])
def test_bad_input_is_one_line_and_exit_2(prepared, tmp_path, capsys, argv, needle):
    rc = job_main(["evaluate", "--config", str(SMOKE), "--data", str(prepared / "data"), "--out", str(tmp_path)] + argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err and len(err.splitlines()) == 1
    assert not (tmp_path / "metrics.json").exists()


def test_out_that_is_empty_or_a_file_is_exit_2(prepared, tmp_path, capsys):
    a_file = tmp_path / "results.txt"
    a_file.write_text("mine")
    for out, needle in (("", "--out: empty"), (str(a_file), "exists and is not a folder")):
        rc = job_main(["evaluate", "--config", str(SMOKE), "--data", str(prepared / "data"), "--base", "--out", out])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and needle in err and len(err.splitlines()) == 1, err
    assert a_file.read_text() == "mine"


def test_missing_data_folder_is_exit_2(tmp_path, capsys):
    rc = job_main(["evaluate", "--config", str(SMOKE), "--data", str(tmp_path / "nope"), "--base", "--out", str(tmp_path)])
    assert rc == 2 and "no test.jsonl" in capsys.readouterr().err


@pytest.mark.slow
def test_tree_scorer_equals_one_forward_per_answer(prepared):
    """Exact answer probabilities: the batched prefix-tree forward vs the naive reference."""
    import torch

    from bench.reference import score_one_by_one
    from job import load as JL
    from job import scoring as S
    from job.data import read_split

    cfg = load_config(SMOKE)
    tok, model = JL.load_model(cfg, str(prepared / "run" / "adapter"))
    # fp32 on both sides: in eval mode bnb's CPU path (on avx512-bf16 CPUs) repacks the 4-bit weights
    # and computes in bf16, ~1e-3 apart on a 0-100 row; dropout is 0, so train mode changes nothing else.
    model.train()
    rows = read_split(prepared / "data", "test")[:4]
    # A multi-token scale (0-100: "1" vs "10" vs "100") beside the rows' own.
    rows[0] = dict(rows[0], stimuli=rows[0]["stimuli"].rsplit("Only return", 1)[0]
                   + "Only return an integer from 0 to 100, nothing else.")
    scales = S.row_scales(rows)
    assert scales[0] == (0, 100)
    dists = S.score_distributions(model, tok, rows, scales, cfg.model.system_prompt, tokens_per_batch=600)
    ids = S.prompt_ids(tok, rows, cfg.model.system_prompt)
    peaks = []
    for d, p, s in zip(dists, ids, scales):
        ref = score_one_by_one(model, tok, p, *s)
        assert d.values == list(range(s[0], s[1] + 1))
        # fp32 reduction order differs between the two (batched vs single): agree to ~1e-7.
        assert np.max(np.abs(np.array(ref) - np.array(d.probs))) < 2e-6
        peaks.append(max(ref) * len(ref))
    assert max(peaks) > 1.5  # the adapter pulls some row far from uniform: the check has teeth


def test_select_rows_keeps_whole_cells():
    from contracts.errors import ContractError
    from job.evaluate import select_rows

    rows = [{"study_id": s, "condition_num": 1, "task_num": t, "response": i}
            for s in "abc" for t in (1, 2) for i in range(5)]
    kept = select_rows(rows, 10, seed=1)
    cells = {(r["study_id"], r["task_num"]) for r in kept}
    assert len(kept) == 10 and len(cells) == 2
    assert select_rows(rows, None, 1) == rows
    # The case: 7 over 5-row cells once kept 2 of a second cell's 5 rows; now it rounds down to 5.
    for cap, want in ((7, 5), (14, 10), (29, 25), (5, 5)):
        kept = select_rows(rows, cap, seed=1)
        sizes = {}
        for r in kept:
            sizes[(r["study_id"], r["task_num"])] = sizes.get((r["study_id"], r["task_num"]), 0) + 1
        assert len(kept) == want and set(sizes.values()) == {5}, cap
    with pytest.raises(ContractError, match=r"--rows/eval.rows 4: smaller than every cell .* smallest has 5 rows"):
        select_rows(rows, 4, seed=1)
    # A cell that does not fit is passed over, and a smaller one later in the order fills the rest.
    mixed = rows + [{"study_id": "d", "condition_num": 1, "task_num": 1, "response": 0}]
    assert len(select_rows(mixed, 6, seed=1)) == 6


def test_the_row_cap_is_said_in_a_log_line_and_in_metrics(tmp_path):
    from job import synthetic

    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in synthetic.generate(120, seed=4)))
    assert job_main(["prepare", "--data", str(src), "--split", "all-test", "--out", str(tmp_path / "data")]) == 0
    assert job_main(["evaluate", "--data", str(tmp_path / "data"), "--baseline", "uniform", "--rows", "50",
                     "--out", str(tmp_path / "eval")]) == 0
    res = json.loads((tmp_path / "eval" / "metrics.json").read_text())["results"]["uniform/distribution"]
    test = [json.loads(x) for x in (tmp_path / "data" / "test.jsonl").read_text().splitlines()]
    sizes = {}
    for r in test:
        key = (r["study_id"], r["condition_num"], r["task_num"])
        sizes[key] = sizes.get(key, 0) + 1
    scored = [c for c in res["cells"] + res["cells_skipped"]]
    # Every cell the result names is whole, and their rows are the rows kept: at most the cap.
    assert all(c["n"] == sizes[tuple(c["cell"])] for c in scored)
    assert res["rows"] == sum(c["n"] for c in scored) <= 50
    assert (res["rows_cap"], res["rows_test"], res["split"]) == (50, 120, "all-test")
    logs = [e["message"] for e in read_all(tmp_path / "eval" / "events.jsonl") if e["event"] == "log"]
    assert f"evaluate: --rows/eval.rows 50 kept {res['rows']} of 120 test rows ({len(scored)} of {len(sizes)} " \
           "cells, whole cells only)" in logs


@pytest.mark.slow
def test_merged_dense_model_gives_the_same_distribution_as_4bit_plus_adapter(prepared):
    """--eval-precision bf16: the NF4 base dequantized and the LoRA merged in, then scored densely,
    must give the unmerged model's probabilities (fp32 on CPU: to 1e-4), with no 4-bit or LoRA layer left."""
    import torch
    from peft.tuners.lora import LoraLayer

    from job import load as JL
    from job import scoring as S
    from job.data import read_split

    cfg = load_config(SMOKE)
    adapter = str(prepared / "run" / "adapter")
    tok, unmerged = JL.load_model(cfg, adapter, "nf4")
    _, base = JL.load_model(cfg, None, "nf4")
    # Reference in fp32: in eval mode bnb's CPU path (on avx512-bf16 CPUs) computes in bf16; dropout is 0.
    unmerged.train()
    _, merged = JL.load_model(cfg, adapter, "bf16")
    assert not any(JL.is_4bit(m) or isinstance(m, LoraLayer) for m in merged.modules())
    assert any(JL.is_4bit(m) for m in unmerged.modules())  # the fallback keeps the model as trained
    rows = read_split(prepared / "data", "test")[:12]
    rows[0] = dict(rows[0], stimuli=rows[0]["stimuli"].rsplit("Only return", 1)[0]
                   + "Only return an integer from 0 to 100, nothing else.")
    scales = S.row_scales(rows)
    sp = cfg.model.system_prompt
    ref = S.score_distributions(unmerged, tok, rows, scales, sp, tokens_per_batch=2000)
    got = S.score_distributions(merged, tok, rows, scales, sp, tokens_per_batch=2000)
    plain = S.score_distributions(base, tok, rows, scales, sp, tokens_per_batch=2000)
    diff = max(abs(a - b) for r, g in zip(ref, got) for a, b in zip(r.probs, g.probs))
    assert diff < 1e-4
    assert max(abs(r.valid_mass - g.valid_mass) for r, g in zip(ref, got)) < 1e-4
    # The merge carried the adapter: without it the probabilities are far off.
    assert max(abs(a - b) for r, p in zip(ref, plain) for a, b in zip(r.probs, p.probs)) > 1e-2
    assert merged.lm_head.weight.dtype == torch.float32  # CPU: "bf16" means dense in the compute dtype


@pytest.mark.slow
def test_eval_precision_cli_records_the_path_used(prepared, tmp_path):
    data, adapter = str(prepared / "data"), str(prepared / "run" / "adapter")
    res = {}
    for prec in ("bf16", "auto"):
        out = tmp_path / prec
        assert job_main(["evaluate", "--config", str(SMOKE), "--data", data, "--out", str(out), "--adapter", adapter,
                         "--mode", "distribution", "--rows", "24", "--eval-precision", prec]) == 0
        res[prec] = json.loads((out / "metrics.json").read_text())["results"]["fine-tuned/distribution"]
    assert res["bf16"]["eval_precision"] == "bf16"
    assert res["auto"]["eval_precision"] == "nf4"  # auto never merges on CPU
    # Same model, same rows; the nf4 run went through bnb's bf16 CPU kernel (exact match: the test above).
    assert res["bf16"]["wasserstein"] == pytest.approx(res["auto"]["wasserstein"], abs=0.02)


def test_choose_precision_merges_only_when_the_gpu_has_room():
    from job.load import activation_bytes, choose_precision

    need = 20 * 2**30 + activation_bytes(32768, 5120)
    assert choose_precision("auto", 100 * 2**30, need) == "bf16"
    assert choose_precision("auto", 25 * 2**30, need) == "nf4"
    assert choose_precision("auto", None, 0) == "nf4"  # CPU
    assert choose_precision("bf16", None, need) == "bf16" and choose_precision("nf4", 10**15, 0) == "nf4"
    # A bigger forward needs more room.
    assert activation_bytes(65536, 5120) > activation_bytes(32768, 5120)
