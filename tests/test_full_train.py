"""train.method full on CPU: the FSDP2 full fine-tune (job/full.py) with 2 gloo ranks under torchrun against
the single-process full fine-tune (the plain model, no FSDP) at the same global batch; SIGKILL after a sharded
checkpoint, resume (same or another world size), same weights as an uninterrupted run; the saved model/
loads with transformers and passes the manifest's tree check; job check's fit refusal; the config rule."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from contracts import manifest
from contracts.config import load_config
from contracts.errors import ContractError
from contracts.events import read_all
from job.checkpoints import complete_checkpoints
from job.prepare import prepare
from ranks import job_env, kill_after_first_checkpoint, max_diff, run_train, step_losses
from conftest import REPO, tiny_config

# micro-batch 4 on 35 training rows: 9 micro-batches an epoch, so the 2-rank run's last step of each epoch
# has one rank on the blank filler batch (RankBatches) and 1 rank accumulates 2 micro-batches a step.
# Gradient checkpointing on: the recompute re-gathers FSDP's shards.
CFG = tiny_config("tiny-full", lora=None, train={"method": "full", "lr": 1.0e-3, "gradient_checkpointing": True})
STEPS = 12


def _weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The single-process full fine-tune and the uninterrupted 2-rank FSDP2 one, on the same data."""
    root = tmp_path_factory.mktemp("full")
    cfg = root / "tiny-full.yaml"
    cfg.write_text(yaml.safe_dump(CFG))
    prepare("synthetic:44", root / "data", split="random", seed=1, cfg=load_config(cfg))
    n = sum(1 for _ in open(root / "data" / "train.jsonl"))
    assert n == 35 and -(-n // 4) % 2 == 1, n  # the odd micro-batch count the comment above relies on
    outs = {}
    for ranks in (1, 2):
        out = root / f"world{ranks}"
        r = run_train(ranks, cfg, root / "data", out)
        assert r.returncode == 0, r.stderr[-3000:]
        outs[ranks] = (out, r)
    return cfg, root / "data", outs


@pytest.mark.slow
def test_fsdp2_on_two_gloo_ranks_trains_what_one_process_trains(runs):
    _, _, outs = runs
    (one, _), (two, r) = outs[1], outs[2]
    a, b = step_losses(one), step_losses(two)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    loss_gap = max(abs(a[s] - b[s]) for s in a)
    assert loss_gap < 1e-4, (a, b)
    assert len(set(round(v, 3) for v in a.values())) > 8 and a[STEPS] < a[1] - 1.0  # it learns: not constants
    # every weight trained, and the sharded run's gathered weights are the single process's
    w1, w2 = _weights(one), _weights(two)
    weight_gap = max_diff(w1, w2)
    assert weight_gap < 5e-5
    print(f"\nfull, 2 FSDP2 ranks vs 1 process: max loss gap {loss_gap:.2e}, max weight gap {weight_gap:.2e}, "
          f"loss {a[1]:.3f} -> {a[STEPS]:.3f}")
    assert "lm_head.weight" not in w2  # tied to the embedding (qwen2-tiny), saved once as transformers does
    # Rank 0 alone wrote: one start, one event per step, one per checkpoint, one done; rank 1 echoes nothing.
    events = read_all(two / "events.jsonl")
    kinds = [e["event"] for e in events]
    assert kinds.count("start") == 1 and kinds.count("done") == 1 and kinds.count("step") == STEPS
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [4, 8, 12]
    assert r.stdout.count('"event":"done"') == 1
    # sharded checkpoints: torch.distributed.checkpoint files of both ranks, marked complete and fingerprinted
    assert [p.name for p in complete_checkpoints(two / "checkpoints")] == ["checkpoint-4", "checkpoint-8", "checkpoint-12"]
    files = {p.name for p in (two / "checkpoints" / "checkpoint-12").iterdir()}
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "COMPLETE", "trainer_state.json", "socrates_run.json"} <= files
    assert json.loads((two / "checkpoints" / "checkpoint-12" / "trainer_state.json").read_text())["world_size"] == 2
    # the output: model/ listed in the manifest, the whole tree verified as the launcher verifies a download
    m = manifest.load(two)
    assert m["kind"] == "full" and m["world_size"] == 2 and m["steps"] == STEPS and m["full"]["fsdp"] is True
    assert {"model/config.json", "model/model.safetensors", "model/tokenizer.json"} <= {f["path"] for f in m["files"]}
    assert manifest.verify_tree(two) == []
    assert manifest.load(one)["world_size"] == 1 and manifest.load(one)["full"]["fsdp"] is False


@pytest.mark.slow
def test_the_saved_model_loads_with_transformers_as_trained(runs):
    import torch
    from transformers import AutoModelForCausalLM

    _, _, outs = runs
    two = outs[2][0]
    model, info = AutoModelForCausalLM.from_pretrained(two / "model", output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    saved = _weights(two)
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in saved.items())
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.slow
# Two ranks killed, resumed on two (the sharded checkpoint as written) and on one (resharded on load: DCP reads
# any world size's shards, so growing takes the same path as shrinking and is not run again here).
@pytest.mark.parametrize("first,then", [(2, 2), (2, 1)])
def test_sigkill_then_resume_ends_with_the_uninterrupted_weights(runs, tmp_path, first, then):
    cfg, data, outs = runs
    out = tmp_path / "run"
    kill_after_first_checkpoint(first, cfg, data, out)
    assert not (out / "model").exists()  # the weights are written only at the end
    at = int(complete_checkpoints(out / "checkpoints")[-1].name.split("-")[1])
    assert at < STEPS
    r = run_train(then, cfg, data, out)
    assert r.returncode == 0, r.stderr[-3000:]
    m = manifest.load(out)
    assert m["resumed_from"] == f"checkpoint-{at}" and m["steps"] == STEPS and m["world_size"] == then
    ref_out = outs[then][0]  # the uninterrupted run on the world size that finished
    ref, got = step_losses(ref_out), step_losses(out)
    loss_gap = max(abs(ref[s] - got[s]) for s in range(at + 1, STEPS + 1))
    weight_gap = max_diff(_weights(ref_out), _weights(out))
    print(f"\nfull, killed on {first} rank(s) after checkpoint-{at}, resumed on {then}: max loss gap {loss_gap:.2e}, "
          f"max weight gap {weight_gap:.2e} vs the uninterrupted {then}-rank run")
    assert loss_gap < 1e-4
    # Same world size: the same sums in the same order, so the same weights (1e-5; measured 0.0). Across world
    # sizes the reduction order differs (FSDP's reduce-scatter vs one process), as between the two
    # uninterrupted runs (7.8e-6 measured there): the same bound as that comparison.
    assert weight_gap < (1e-5 if first == then else 5e-5)
    assert manifest.verify_tree(out) == []


# --- no training: the fit refusal, the config rule, the manifest rule -------------------------------------

def test_check_refuses_a_full_fine_tune_that_cannot_fit_its_cards_with_the_numbers():
    from job.check import plan_memory
    from job.errors import JobCannotRun

    cfg = load_config(REPO / "configs" / "paper.yaml").with_overrides({"train.method": "full", "train.micro_batch": 32})
    # 14.77B params x 16 B (fp32 weights, grads, AdamW m and v) = 220 GiB: one 80 GB card cannot hold it
    with pytest.raises(JobCannotRun) as e:
        plan_memory(cfg, 79.15, 500.0, None, 1)
    msg = str(e.value)
    assert "\n" not in msg and "14.77B params" in msg and "220.09 GiB" in msg and "79.15 GiB" in msg, msg
    assert "train.method: qlora" in msg
    # sharded over 8 such cards: 27.5 GiB of it per card, and the plan fits
    run_cfg, mode = plan_memory(cfg, 79.15, 500.0, None, 8)
    assert run_cfg == cfg and mode["fit"]["world"] == 8
    assert mode["fit"]["sharded_gib"] == pytest.approx(14_770_033_664 * 16 / 8 / 2**30, abs=0.01)
    assert mode["fit"]["total_gib"] < 0.95 * 79.15


def test_the_one_gpu_bench_config_fits_an_h200_with_room():
    """configs/bench-full-8l.yaml (bench/calls/gpu_call6.sh) is planned to fit one H200 (139 GiB) with room, and the
    plan's 16 B/param is of the params transformers builds for it (counted on the meta device)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from job.check import plan_memory
    from job.model import PRESETS

    cfg = load_config(REPO / "configs" / "bench-full-8l.yaml")
    assert cfg.train.method == "full" and cfg.train.gradient_checkpointing and cfg.model.init == "random"
    with torch.device("meta"):
        n = sum(p.numel() for p in Qwen2ForCausalLM(Qwen2Config(**{**PRESETS["qwen2.5-14b"], "num_hidden_layers": 8})).parameters())
    run_cfg, mode = plan_memory(cfg, 139.0, 100.0, None, 1)
    assert mode["fit"]["params"] == n
    assert mode["fit"]["sharded_gib"] == pytest.approx(n * 16 / 2**30, abs=0.01)
    assert mode["fit"]["total_gib"] < 0.6 * 139.0  # room: the measured peak was 62.89 GiB (bench/RESULTS.md)


@pytest.mark.slow
def test_check_on_cpu_reports_the_full_fit_over_the_planned_ranks(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(CFG))
    r = subprocess.run([sys.executable, "-m", "job", "check", "--config", str(cfg)], cwd=REPO, capture_output=True,
                       text=True, timeout=120, env=job_env(NPROC_PER_NODE="2", SKYPILOT_NUM_NODES="3"))
    assert r.returncode == 0, r.stderr
    assert "full, sharded over 6 GPU(s)" in r.stdout and "weights+grads+AdamW" in r.stdout


def test_full_fine_tune_takes_only_an_adamw(tmp_path):
    raw = json.loads(json.dumps(CFG))
    raw["train"]["optim"] = "sgd"
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(raw))
    with pytest.raises(ContractError, match=r"train.optim: 'sgd' is not accepted with train.method full"):
        load_config(f)
    raw["train"]["optim"] = "paged_adamw_8bit"
    f.write_text(yaml.safe_dump(raw))
    assert load_config(f).train.optim == "paged_adamw_8bit"


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    manifest.write(root, {"kind": "full"})
    return root


def test_manifest_accepts_full_weights_where_an_adapter_is_required(tmp_path):
    one = _tree(tmp_path / "one", {"model/config.json": b"{}", "model/model.safetensors": b"w"})
    assert manifest.verify_tree(one) == []
    index = json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})
    sharded = _tree(tmp_path / "sharded", {"model/config.json": b"{}", "model/model-00001-of-00002.safetensors": b"1",
                                           "model/model-00002-of-00002.safetensors": b"2",
                                           "model/model.safetensors.index.json": index.encode()})
    assert manifest.verify_tree(sharded) == []
    # a shard the index names is not in the manifest (a partial copy): refused
    short = _tree(tmp_path / "short", {"model/config.json": b"{}", "model/model-00001-of-00002.safetensors": b"1",
                                       "model/model.safetensors.index.json": index.encode()})
    assert any("model-00002-of-00002.safetensors" in p for p in manifest.verify_tree(short))
    # weights without the config, or neither model nor adapter: refused as before
    bare = _tree(tmp_path / "bare", {"model/model.safetensors": b"w"})
    assert any(p.startswith("no adapter in the manifest") for p in manifest.verify_tree(bare))


def test_check_counts_the_disk_a_full_fine_tune_writes(monkeypatch):
    from job.check import full_disk_gib

    cfg = load_config(REPO / "configs" / "paper.yaml").with_overrides({"train.method": "full", "train.micro_batch": 32})
    d = full_disk_gib(cfg)  # keep 2 checkpoints + 1 being written, each 12 B/param (fp32 weights + AdamW m, v)
    assert d["checkpoints"] == 3 and d["checkpoint_gib"] == pytest.approx(14_770_033_664 * 12 / 2**30, abs=0.1)
    assert d["output_gib"] == pytest.approx(14_770_033_664 * 2 / 2**30, abs=0.1)  # bf16 weights
    monkeypatch.setenv("SKYPILOT_NUM_NODES", "2")  # each node holds only its ranks' shards
    assert full_disk_gib(cfg)["checkpoint_gib"] == pytest.approx(d["checkpoint_gib"] / 2, abs=0.1)
    assert full_disk_gib(cfg.with_overrides({"train.checkpoint_every": 0}))["checkpoints"] == 0


# --- the launcher: a full run through `up` on the local backend, and the estimate ---------------------

@pytest.mark.slow
def test_up_local_brings_back_verified_full_weights_and_skips_evaluate(tmp_path):
    # One rank: the launcher's side of a full fine-tune (model/ pulled and verified, the run block's evaluate
    # skipped); 2 FSDP2 ranks write model/ in the `runs` fixture above, the run block's torchrun is
    # tests/test_launcher_scale.py's.
    sys.path.insert(0, str(Path(__file__).parent))
    from launcher_helpers import cli, launcher_env, only_run

    raw = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    raw["train"].update(method="full", lr=1.0e-3, max_steps=4, checkpoint_every=2)
    cfg = tmp_path / "smoke-full.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    runs = tmp_path / "runs"
    env = launcher_env(runs)
    r = cli(["up", "--infra", "local", "--config", str(cfg), "--yes", "--name", "full-one"], env, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    rec = only_run(runs)
    run_dir = next(p for p in runs.iterdir() if p.is_dir() and p.name.startswith("full-one"))
    assert rec["state"] == "done" and rec["verified"] and rec["adapter"] == str((run_dir / "model").resolve())
    m = manifest.load(run_dir)
    assert m["kind"] == "full" and m["world_size"] == 1 and m["steps"] == 4 and m["full"]["fsdp"] is False
    assert manifest.verify(run_dir) == [] and (run_dir / "model" / "model.safetensors").is_file()
    assert "evaluate: skipped: train.method full" in out + "".join(p.read_text(errors="replace") for p in run_dir.rglob("*.log"))


def test_the_estimate_shows_the_full_output_and_its_download(tmp_path):
    from launcher.cost.hours import full_output_note, plan_card
    from launcher.cost.rates import load_throughput, model_params_b
    from launcher.cost.tokens import count_tokens

    cfg = load_config(REPO / "configs" / "paper.yaml").with_overrides({"train.method": "full", "train.micro_batch": 32})
    table = load_throughput()
    tokens = count_tokens(cfg)
    params_b = model_params_b(cfg)
    plan = plan_card(cfg, table, "A100-80GB", 8, params_b, tokens, local=False)
    back = {t.name: t for t in plan.terms}["model download (back)"]
    gb = 2 * params_b  # bf16: 2 bytes a parameter
    assert (back.low_s, back.expected_s, back.high_s) == pytest.approx((gb * 1000 / 50, gb * 1000 / 20, gb * 1000 / 5))
    assert "adapter download" not in {t.name for t in plan.terms}
    assert plan.memory_mode == "fast"  # sharded over 8 x 80 GB it fits; on 2 it does not
    assert plan_card(cfg, table, "A100-80GB", 2, params_b, tokens, local=False).memory_mode is None
    note = full_output_note(params_b)
    assert f"~{gb:.1f} GB" in note and "pulled back to this machine by default" in note and "20 MB/s" in note


def test_a_full_checkpoint_is_sealed_and_lands_whole_on_a_mount_that_renames_no_folders(tmp_path, monkeypatch):
    """The full path's save goes through checkpoints.seal/move_checkpoint: the marker lists every file with its
    size, and on a bucket mount (no folder rename) the files move one by one with the marker last."""
    import torch

    from contracts.events import EventWriter
    from job import full
    from job.checkpoints import COMPLETE, is_complete

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    real, moved = os.replace, []

    def no_folder_rename(a, b):  # what an object-store mount answers to a folder rename
        if Path(a).is_dir():
            raise OSError(38, "Function not implemented")
        moved.append(Path(a).name)
        return real(a, b)

    monkeypatch.setattr(os, "replace", no_folder_rename)
    root = tmp_path / "checkpoints"
    events = EventWriter(tmp_path / "events.jsonl")
    full.save_checkpoint(model, optimizer, root, 3, 1, {"config": {}, "data_hash": "x"}, 2, events)
    dst = root / "checkpoint-3"
    assert moved and moved[-1] == COMPLETE, moved  # marker last
    sealed = json.loads((dst / COMPLETE).read_text())
    on_disk = {p.relative_to(dst).as_posix(): p.stat().st_size for p in dst.rglob("*") if p.is_file() and p.name != COMPLETE}
    assert sealed["step"] == 3 and sealed["files"] == on_disk and ".metadata" in on_disk and "trainer_state.json" in on_disk
    assert is_complete(dst) and complete_checkpoints(root) == [dst]
    assert not (root / ".staging" / "checkpoint-3").exists()
    (dst / ".metadata").write_bytes(b"")  # a copy that stopped part-way no longer reads as complete
    assert not is_complete(dst)
    assert [e["step"] for e in read_all(tmp_path / "events.jsonl") if e["event"] == "checkpoint"] == [3]


@pytest.mark.slow
def test_the_full_fine_tune_also_checkpoints_by_time(tmp_path, monkeypatch):
    """train.checkpoint_every_s on the full path: a save once that many seconds passed since the last one (a
    clock reading 25 s later at each look, every 60 s: after steps 3 and 6 of 8), each sealed and complete."""
    from job import callbacks
    from job.__main__ import main
    from job.checkpoints import is_complete

    cfg = {**CFG, "train": {**CFG["train"], "checkpoint_every": 0, "checkpoint_every_s": 60, "max_steps": 8,
                            "keep_checkpoints": 0}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    prepare("synthetic:44", tmp_path / "data", split="random", seed=1, cfg=load_config(tmp_path / "c.yaml"))
    ticks = iter(range(0, 10_000, 25))
    real = callbacks.SaveClock
    monkeypatch.setattr(callbacks, "SaveClock", lambda every_s: real(every_s, clock=lambda: float(next(ticks))))
    monkeypatch.setenv("SOCRATES_CPU_THREADS", "1")
    out = tmp_path / "out"
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--data", str(tmp_path / "data"), "--out", str(out)]) == 0
    saved = [e["step"] for e in read_all(out / "events.jsonl") if e["event"] == "checkpoint"]
    assert saved == [3, 6], saved
    assert [p.name for p in complete_checkpoints(out / "checkpoints")] == ["checkpoint-3", "checkpoint-6"]
    assert all(is_complete(p) for p in complete_checkpoints(out / "checkpoints"))
