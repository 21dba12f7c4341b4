"""job train on CPU (real NF4 base, real LoRA, TRL's SFTTrainer): SIGKILL + --resume auto against a straight
run, torn checkpoints, the deadline hook, exit 3. (The smoke acceptance, configs/smoke.yaml's 40 steps on real
rows: the installed demo's run in tests/test_package.py.)"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from contracts import manifest
from contracts.config import load_config
from contracts.errors import ContractError
from contracts.events import read_all
from job.checkpoints import FINGERPRINT, check_resumable, fingerprint, write_fingerprint
from job.prepare import prepare
from job.checkpoints import COMPLETE, complete_checkpoints
from job.checkpoints import resume_point as _resume_point
from conftest import REPO, tiny_config

TINY = tiny_config("tiny-resume", data={"source": "synthetic:48"})


def _job(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "job", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300, **kw)


def _steps(out: Path) -> list[dict]:
    return [e for e in read_all(out / "events.jsonl") if e["event"] == "step"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    prepare("synthetic:48", root / "data", split="random", seed=1, cfg=load_config(cfg))
    return cfg, root / "data"


@pytest.fixture(scope="module")
def straight(tiny, tmp_path_factory) -> Path:
    """The tiny run trained once, uninterrupted, to max_steps: the reference the resume tests compare with."""
    cfg, data = tiny
    out = tmp_path_factory.mktemp("straight") / "run"
    r = _job("train", "--config", str(cfg), "--data", str(data), "--out", str(out), "--resume", "never")
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.mark.slow
def test_sigkill_then_resume_auto_matches_a_straight_run(tiny, straight, tmp_path):
    cfg, data = tiny
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "job", "train", "--config", str(cfg), "--data", str(data),
                             "--out", str(killed)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        if (killed / "events.jsonl").is_file() and any(e["event"] == "checkpoint" for e in read_all(killed / "events.jsonl")):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "manifest.json").exists()
    good = complete_checkpoints(killed / "checkpoints")
    assert good, "no complete checkpoint before the kill"
    last_good = int(good[-1].name.split("-")[1])
    # A torn copy (no COMPLETE marker) with a later step, and a half-written save in .staging: both ignored.
    torn = killed / "checkpoints" / f"checkpoint-{last_good + 1}"
    torn.mkdir()
    (torn / "trainer_state.json").write_text('{"global_step": ')
    (killed / "checkpoints" / ".staging" / f"checkpoint-{last_good + 2}").mkdir(parents=True, exist_ok=True)

    assert (good[-1] / FINGERPRINT).is_file()
    # Another lr is another run: refused with one line, before the model is built; nothing deleted.
    other = tmp_path / "other-lr.yaml"
    other.write_text(yaml.safe_dump({**TINY, "train": {**TINY["train"], "lr": 5e-3}}))
    r = _job("train", "--config", str(other), "--data", str(data), "--out", str(killed), "--resume", "auto")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert "comes from a different run: train.lr 0.01 there, 0.005 here" in r.stderr
    assert complete_checkpoints(killed / "checkpoints") == good

    # Half the micro-batch (same global batch: how a step runs, not what it computes) resumes the same run.
    smaller = tmp_path / "smaller-card.yaml"
    smaller.write_text(yaml.safe_dump({**TINY, "train": {**TINY["train"], "micro_batch": 2}}))
    r = _job("train", "--config", str(smaller), "--data", str(data), "--out", str(killed), "--resume", "auto")
    assert r.returncode == 0, r.stderr[-2000:]
    events = read_all(killed / "events.jsonl")
    second_start = max(i for i, e in enumerate(events) if e["event"] == "start")
    resumed = [e for e in events[second_start:] if e["event"] == "step"]
    ref = {e["step"]: e for e in _steps(straight)}
    assert [e["step"] for e in resumed] == list(range(last_good + 1, 13))
    for e in resumed:
        assert e["lr"] == pytest.approx(ref[e["step"]]["lr"], rel=1e-9, abs=1e-15)
        assert e["loss"] == pytest.approx(ref[e["step"]]["loss"], abs=1e-4)  # same data order and RNG
        # the epoch counter goes on from the checkpoint; its fraction is len(dataloader) // accumulation,
        # which the micro-batch rounds differently (19 // 4 vs 10 // 2 batches), the rows of a step are the same
        assert e["epoch"] == pytest.approx(ref[e["step"]]["epoch"], abs=0.05)
    m = manifest.load(killed)
    assert m["resumed_from"] == f"checkpoint-{last_good}" and m["steps"] == 12 and manifest.verify(killed) == []


@pytest.mark.slow
def test_resume_auto_after_max_steps_trains_nothing_and_saves_the_same_adapter(tiny, straight, tmp_path):
    """The launcher always passes --resume auto: re-running a finished job must not train a step past
    max_steps (the Trainer checks it only after a step); it saves the last checkpoint's adapter again."""
    import shutil

    from safetensors.torch import load_file

    cfg, data = tiny
    out = tmp_path / "run"
    shutil.copytree(straight, out)  # the finished run (the module's straight one)
    cmd = ("train", "--config", str(cfg), "--data", str(data), "--out", str(out), "--resume", "auto")
    first = load_file(out / "adapter" / "adapter_model.safetensors")
    assert complete_checkpoints(out / "checkpoints")[-1].name == "checkpoint-12"

    r = _job(*cmd)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "trained 12/12 steps (max_steps)" in r.stdout
    events = read_all(out / "events.jsonl")
    second_start = max(i for i, e in enumerate(events) if e["event"] == "start")
    again = events[second_start:]
    assert [e for e in again if e["event"] in ("step", "checkpoint")] == []
    assert again[-1]["event"] == "done" and again[-1]["steps"] == 12 and again[-1]["reason"] == "max_steps"
    assert complete_checkpoints(out / "checkpoints")[-1].name == "checkpoint-12"
    assert not (out / "checkpoints" / "checkpoint-13").exists()
    m = manifest.load(out)
    assert manifest.verify(out) == [] and m["steps"] == 12 and m["resumed_from"] == "checkpoint-12"
    second = load_file(out / "adapter" / "adapter_model.safetensors")
    ckpt = load_file(out / "checkpoints" / "checkpoint-12" / "adapter_model.safetensors")
    assert first.keys() == second.keys() == ckpt.keys() and first
    for k in first:
        assert _same_tensor(first[k], second[k]) and _same_tensor(ckpt[k], second[k]), k


def _same_tensor(a, b) -> bool:
    import torch

    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_resume_point_skips_torn_and_staging_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    for step, complete in ((2, True), (4, True), (6, False)):
        d = root / f"checkpoint-{step}"
        d.mkdir(parents=True)
        (d / "trainer_state.json").write_text("{}")
        if complete:
            (d / COMPLETE).write_text(str(step))
    (root / ".staging" / "checkpoint-8").mkdir(parents=True)
    (root / "checkpoint-10").mkdir()  # marker but no state: a copy that lost files
    (root / "checkpoint-10" / COMPLETE).write_text("10")
    assert [p.name for p in complete_checkpoints(root)] == ["checkpoint-2", "checkpoint-4"]
    assert _resume_point("auto", root).name == "checkpoint-4"
    assert _resume_point("auto", tmp_path / "none") is None


@pytest.mark.slow
def test_deadline_stops_at_a_step_boundary_and_still_saves(tiny, tmp_path):
    cfg, data = tiny
    out = tmp_path / "run"
    r = _job("train", "--config", str(cfg), "--data", str(data), "--out", str(out),
             env={"SOCRATES_DEADLINE": str(time.time() - 1)})
    assert r.returncode == 0, r.stderr[-2000:]
    done = [e for e in read_all(out / "events.jsonl") if e["event"] == "done"]
    assert done[-1]["reason"] == "deadline" and done[-1]["steps"] == 1
    assert [e["step"] for e in _steps(out)] == [1]
    assert manifest.verify(out) == [] and manifest.load(out)["reason"] == "deadline"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_no_gpu_without_allow_cpu_exits_3_with_one_line(tmp_path):
    cfg = tmp_path / "gpu-only.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "allow_cpu": False}))
    r = _job("train", "--config", str(cfg), "--out", str(tmp_path / "run"))
    assert r.returncode == 3
    assert r.stderr.strip().splitlines()[-1].startswith("job train: cannot run: no GPU")
    assert len([line for line in r.stderr.splitlines() if "kernels" not in line]) == 1
    errors = [e for e in read_all(tmp_path / "run" / "events.jsonl") if e["event"] == "error"]
    assert errors and "no GPU" in errors[0]["message"]


def test_bad_resume_path_exits_2(tiny, tmp_path):
    cfg, data = tiny
    r = _job("train", "--config", str(cfg), "--data", str(data), "--out", str(tmp_path / "o"), "--resume", str(tmp_path))
    assert r.returncode == 2 and "--resume" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_padding_free_batch_gives_the_padded_loss():
    """train.packing: rows concatenated with per-row position_ids (TRL's padding-free collator) must
    not attend across rows under sdpa: same loss as a padded batch; without position_ids it differs."""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from job import data as D
    from job import model as M
    from job import synthetic
    from job.tokenizer import qwen25_offline

    cfg = load_config(REPO / "configs" / "smoke.yaml")
    tok = qwen25_offline()
    model = M.build(cfg, tok, torch.device("cpu")).eval()
    rows = synthetic.generate(4, seed=0)
    examples = [{"input_ids": i, "labels": l} for i, l in D.encode(tok, rows, cfg.model.system_prompt)]
    packed = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)(examples)
    padded = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)(examples)

    def loss(batch):
        with torch.no_grad():
            logits = model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}).logits
        lg, lab = logits[:, :-1].float(), batch["labels"][:, 1:]
        return torch.nn.functional.cross_entropy(lg.reshape(-1, lg.size(-1)), lab.reshape(-1), ignore_index=-100).item()

    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == 1
    assert abs(loss(packed) - loss(padded)) < 1e-4
    assert abs(loss({"input_ids": packed["input_ids"], "labels": packed["labels"]}) - loss(padded)) > 1e-2


def test_train_without_prepared_data_exits_2(tiny, tmp_path):  # refused before torch loads: well under a second
    cfg, _ = tiny
    r = _job("train", "--config", str(cfg), "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"job train: error: --data {tmp_path / 'nothing'}: no train.jsonl "
        f"(run `python -m job prepare --out {tmp_path / 'nothing'}` first)")
    assert len(r.stderr.strip().splitlines()) == 1


def test_fingerprint_refuses_another_run_and_allows_how_a_step_runs(tmp_path):
    """A checkpoint records what it learned from (config that decides the math + data hash): resuming
    with another lr or other data is refused with one line; a smaller micro-batch or other kernels are not."""
    base = load_config(REPO / "configs" / "smoke.yaml").to_dict()
    ckpt = tmp_path / "checkpoints" / "checkpoint-8"
    ckpt.mkdir(parents=True)
    assert check_resumable(ckpt, fingerprint(base, "a" * 64), "auto") is False  # an older checkpoint: no record
    write_fingerprint(ckpt, fingerprint(base, "a" * 64))
    assert check_resumable(ckpt, fingerprint(base, "a" * 64), "auto") is True

    how = {**base, "train": {**base["train"], "micro_batch": 1, "liger": False, "checkpoint_every": 3,
                             "gradient_checkpointing": False, "fused_lora": False, "offload_checkpoints": True}}
    assert check_resumable(ckpt, fingerprint(how, "a" * 64), "auto") is True

    other_lr = {**base, "train": {**base["train"], "lr": base["train"]["lr"] * 2}}
    with pytest.raises(ContractError, match=r"checkpoints/checkpoint-8 comes from a different run: train\.lr "):
        check_resumable(ckpt, fingerprint(other_lr, "a" * 64), "auto")
    with pytest.raises(ContractError, match=r"data hash aaaaaaaaaaaa there, bbbbbbbbbbbb here"):
        check_resumable(ckpt, fingerprint(base, "b" * 64), "auto")
    other_lora = {**base, "lora": {**base["lora"], "r": 64, "alpha": 1, "dropout": 0.5, "target_modules": ["q_proj"]}}
    with pytest.raises(ContractError, match=r"\(and 1 more\)") as e:
        check_resumable(ckpt, fingerprint(other_lora, "a" * 64), "auto")
    assert "\n" not in str(e.value) and "--resume never" in str(e.value)
    (ckpt / FINGERPRINT).write_text("{torn")
    with pytest.raises(ContractError, match="unreadable"):
        check_resumable(ckpt, fingerprint(base, "a" * 64), "auto")


def test_cpu_runs_swap_cuda_only_optimizers_for_adamw():
    """The config may name any accepted optimizer; on the CPU path the CUDA-only ones (bitsandbytes'
    8-bit, paged, lion_*bit) become AdamW instead of failing at the first step."""
    from contracts.config import OPTIMIZERS
    from job.sft import cpu_optimizer

    swapped = {o for o in OPTIMIZERS if cpu_optimizer(o) == "adamw_torch"} - {"adamw_torch"}
    assert swapped == {o for o in OPTIMIZERS if "bit" in o or o.startswith("paged_")}
    assert {"paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit", "lion_32bit"} <= swapped
    assert cpu_optimizer("adafactor") == "adafactor" and cpu_optimizer("sgd") == "sgd"
