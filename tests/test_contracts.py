"""The three contracts: config schema, event stream, artifacts manifest."""
import json

import pytest

from contracts import events, manifest
from contracts.config import load_config
from contracts.errors import ContractError
from conftest import REPO


def test_paper_config_is_the_papers_schedule():
    cfg = load_config(REPO / "configs/paper.yaml")
    t = cfg.train
    assert (cfg.model.id, t.method, t.epochs, t.global_batch, t.lr) == (
        "Qwen/Qwen2.5-14B-Instruct", "qlora", 1.0, 256, 1e-5)
    assert (t.lr_scheduler, t.warmup_ratio, t.weight_decay) == ("cosine", 0.05, 0.1)
    assert t.grad_accum(1) * t.micro_batch == 256
    assert t.grad_accum(2) * t.micro_batch * 2 == 256  # 4+ GPUs: launcher/plan.py lowers the micro-batch


def test_accumulation_is_derived_and_must_divide():
    cfg = load_config(REPO / "configs/paper.yaml")
    with pytest.raises(ContractError, match="global_batch: 256 is not a multiple"):
        cfg.with_overrides({"train.micro_batch": 7})


@pytest.mark.parametrize("body,needle", [
    ("train: {lr: abc}", "train.lr: 'abc' is not accepted (a number)"),
    ("train: {micro_batch: 2.5}", "train.micro_batch: 2.5 is not accepted (a whole number)"),
    ("data: {subset: 0}", "data.subset: 0.0 is not accepted"),
    ("data: {subset: 1.5}", "data.subset: 1.5 is not accepted"),
    ("data: {split: bogus}", "data.split: 'bogus' is not accepted"),
    ("data: {participant_fraction: 1}", "data.participant_fraction: 1.0 is not accepted (a fraction in (0, 1)"),
    ("data: {participant_fraction: 0}", "data.participant_fraction: 0.0 is not accepted (a fraction in (0, 1)"),
    ("data: {participant_fraction: abc}", "data.participant_fraction: 'abc' is not accepted"),
    ("trian: {}", "unknown key 'trian'"),
    ("train: {lr_rate: 1}", "unknown key 'lr_rate'"),
    ("[1, 2]", "expected a mapping"),
    ("train: [", "not valid yaml"),
    # values that used to pass and fail later (or train garbage)
    ("train: {optim: bogus}", "train.optim: 'bogus' is not accepted (adamw_torch | "),
    ("train: {seed: -1}", "train.seed: -1 is not accepted (a whole number in 0..4294967295)"),
    ("train: {seed: 100000000000000000000000}", "train.seed: 100000000000000000000000 is not accepted"),
    ("train: {logging_steps: 0}", "train.logging_steps: 0 is not accepted (a whole number >= 1)"),
    ("train: {lr: .inf}", "train.lr: inf is not accepted (a finite number > 0)"),
    ("train: {weight_decay: .nan}", "train.weight_decay: nan is not accepted (a finite number >= 0)"),
    ("train: {weight_decay: .inf}", "train.weight_decay: inf is not accepted"),
    ("train: {epochs: .inf}", "train.epochs: inf is not accepted (a finite number > 0)"),
    ("train: {keep_checkpoints: -1}", "train.keep_checkpoints: -1 is not accepted (a whole number >= 0"),
    ("eval: {temperature: .inf}", "eval.temperature: inf is not accepted (a finite number >= 0)"),
    ("eval: {batch_size: 0}", "eval.batch_size: 0 is not accepted (a whole number >= 1)"),
    ("lora: {target_modules: ['']}", "lora.target_modules: [''] is not accepted (at least one module name"),
    # loader tracebacks
    (b"\xff\xfetrain: {}", "not UTF-8 text"),
    ("1: 2\nfoo: 3", "unknown key "),
    # a section that is present must be a mapping
    ("train: []", "train: [] is not accepted (a mapping of train settings)"),
    ("train: ''", "train: '' is not accepted (a mapping"),
    ("model: 0", "model: 0 is not accepted (a mapping"),
    ("model: false", "model: False is not accepted (a mapping"),
    # seed-style JSON (a dict body is written as c.json)
    ({"gradient_accumulation_steps": "abc", "per_device_train_batch_size": 8},
     "gradient_accumulation_steps: 'abc' is not accepted (a whole number >= 1)"),
    ({"gradient_accumulation_steps": [1], "per_device_train_batch_size": 8},
     "gradient_accumulation_steps: [1] is not accepted"),
    ({"gradient_accumulation_steps": 2, "per_device_train_batch_size": "x"},
     "per_device_train_batch_size: 'x' is not accepted (a whole number >= 1)"),
    ({"gradient_accumulation_steps": 2.5, "per_device_train_batch_size": 8},
     "gradient_accumulation_steps: 2.5 is not accepted (a whole number >= 1)"),
    ({"gradient_accumulation_steps": 3, "global_batch_size": 256},
     "gradient_accumulation_steps: 3 is not accepted (it must divide global_batch_size 256"),
    ({"learning_rate": 1e-5, "bf16": "no"}, "bf16: 'no' is not accepted (true or false)"),
    ({"learning_rate": 1e-5, "use_4bit": "yes"}, "use_4bit: 'yes' is not accepted (true or false)"),
    ({"learning_rate": 1e-5, "bnb_4bit_quant_type": "fp4"}, "bnb_4bit_quant_type: 'fp4' is not accepted ('nf4'"),
    ({"learning_rate": 1e-5, "bf16": True, "fp16": True}, "bf16: True and fp16: True is not accepted"),
    ({"learning_rate": 1e-5, "bf16": True, "bnb_4bit_compute_dtype": "float16"},
     "bnb_4bit_compute_dtype: 'float16' is not accepted"),
    ({"learning_rate": 1e-5, "use_nested_quant": False}, "use_nested_quant: False is not accepted (true;"),
    ({"learning_rate": 1e-5, "use_4bit": True, "load_in_4bit": False}, "use_4bit: True is not accepted"),
    ({"seed": -1}, "train.seed: -1 is not accepted"),
    ({"optim": "bogus"}, "train.optim: 'bogus' is not accepted"),
])
def test_bad_config_is_one_line_naming_the_value(tmp_path, body, needle):
    p = tmp_path / ("c.json" if isinstance(body, dict) else "c.yaml")
    if isinstance(body, dict):
        p.write_text(json.dumps(body))
    else:
        p.write_bytes(body) if isinstance(body, bytes) else p.write_text(body)
    with pytest.raises(ContractError) as e:
        load_config(p)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and str(p) in msg


def test_missing_config_names_the_path(tmp_path):
    with pytest.raises(ContractError, match="no such file"):
        load_config(tmp_path / "nope.yaml")


def test_seed_style_json_loads(tmp_path):
    seed = {"model_name": "Qwen/Qwen2.5-14B-Instruct", "num_epochs": 1, "learning_rate": 1e-5,
            "per_device_train_batch_size": 4, "gradient_accumulation_steps": 64,
            "global_batch_size": 256, "lr_scheduler_type": "cosine", "warmup_ratio": 0.05,
            "weight_decay": 0.1, "bf16": True, "data_dir": "data/socsci210_1pct"}
    p = tmp_path / "config_paper.json"
    p.write_text(json.dumps(seed))
    cfg = load_config(p)
    assert (cfg.train.micro_batch, cfg.train.global_batch, cfg.train.grad_accum(1)) == (4, 256, 64)
    assert cfg.data.source == "data/socsci210_1pct" and cfg.train.lr == 1e-5


@pytest.mark.parametrize("seed,want", [
    ({"gradient_accumulation_steps": 4, "global_batch_size": 256}, {"micro_batch": 64, "global_batch": 256}),
    ({"gradient_accumulation_steps": 4}, {"micro_batch": 8, "global_batch": 32}),
    ({"bf16": False}, {"precision": "fp32"}),
    ({"bf16": False, "fp16": True, "bnb_4bit_compute_dtype": "float16"}, {"precision": "fp16"}),
    ({"use_4bit": False, "load_in_4bit": False}, {"method": "lora"}),
])
def test_seed_style_derived_keys_are_honoured(tmp_path, seed, want):
    p = tmp_path / "c.json"
    p.write_text(json.dumps(seed))
    t = load_config(p).train
    assert {k: getattr(t, k) for k in want} == want


def test_seed_style_json_with_inconsistent_accumulation_is_refused(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"per_device_train_batch_size": 4, "gradient_accumulation_steps": 8,
                             "global_batch_size": 256}))
    with pytest.raises(ContractError, match="!= global_batch_size 256"):
        load_config(p)


def test_config_round_trips_through_dict():
    cfg = load_config(REPO / "configs/smoke.yaml")
    from contracts.config import from_dict
    assert from_dict(cfg.to_dict()) == cfg
    assert json.loads(json.dumps(cfg.to_dict())) == cfg.to_dict()


def test_events_writer_and_incremental_reader_never_lose_or_double(tmp_path):
    path = tmp_path / events.EVENTS_FILE
    w = events.EventWriter(path)
    reader = events.EventReader(path)
    w.emit("start", verb="train")
    assert [e["event"] for e in reader.read_new()] == ["start"]
    # A torn line (writer mid-append) is held back until it is complete.
    with open(path, "a") as f:
        f.write('{"v":1,"event":"log","ts":1,"mess')
    assert reader.read_new() == []
    with open(path, "a") as f:
        f.write('age":"hi"}\n')
    assert [e["message"] for e in reader.read_new()] == ["hi"]
    w.emit("done", reason="completed")
    assert [e["event"] for e in reader.read_new()] == ["done"]
    assert [e["event"] for e in events.read_all(path)] == ["start", "log", "done"]


def test_step_event_requires_progress_fields():
    with pytest.raises(ContractError, match="missing field"):
        events.make("step", step=1)
    ev = events.make("step", step=1, total_steps=10, epoch=0.1, loss=float("nan"), lr=1e-5,
                     tokens_per_s=100.0, gpu_mem_gib=1.0, eta_s=9.0)
    assert json.loads(events.dumps(ev))["loss"] is None  # strict JSON, no NaN


def test_events_are_found_in_a_mixed_log_stream():
    line = events.LINE_PREFIX + events.dumps(events.make("log", message="x"))
    got = list(events.iter_lines(["(task, pid=1) " + line, "noise", "{not json"]))
    assert [e["message"] for e in got] == ["x"]


def test_manifest_verifies_and_catches_tampering(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter/adapter_model.safetensors").write_bytes(b"\x00" * 100)
    (tmp_path / "events.jsonl").write_text("{}\n")
    m = manifest.write(tmp_path, {"config": {"name": "x"}})
    assert [f["path"] for f in m["files"]] == ["adapter/adapter_model.safetensors"]
    assert manifest.verify(tmp_path) == []
    (tmp_path / "adapter/adapter_model.safetensors").write_bytes(b"\x01" * 100)
    assert manifest.verify(tmp_path) == ["adapter/adapter_model.safetensors: sha256 mismatch"]
    (tmp_path / "adapter/adapter_model.safetensors").unlink()
    with pytest.raises(manifest.ManifestError, match="missing"):
        manifest.verify_or_raise(tmp_path)


def test_manifest_refuses_secrets(tmp_path):
    with pytest.raises(manifest.ManifestError, match="secret"):
        manifest.build(tmp_path, {"env": {"HF_TOKEN": "hf_abc"}})
    with pytest.raises(manifest.ManifestError, match="credential"):
        manifest.build(tmp_path, {"note": "hf_" + "a" * 34})
    manifest.build(tmp_path, {"model": {"tokenizer": "qwen2.5-offline"}, "tokens_per_s": 1.0})
