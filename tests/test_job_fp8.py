"""FP8 matmuls for the frozen base (job/fp8.py): the wrapper computes the layer's function to fp8
accuracy, forward and input gradient, on the 4-bit layer and a frozen bf16 one; it is switched on only
where it applies and switched off exactly. On CPU the fp8 product is emulated from the same e4m3 values;
the CUDA test (skipped without a GPU) checks torch._scaled_mm and the Triton quantizer against that."""
from __future__ import annotations

import functools
import types
from pathlib import Path

import pytest
import torch

from job import fp8
from job.batches import collate_padded
from job.levers import set_checkpointing, speed_up
from job.loss import answer_loss_sum
from job.model import causal_lm_of
from lora_helpers import ARCH, lora_examples

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def test_row_quantization_round_trips_within_e4m3_precision():
    torch.manual_seed(0)
    t = torch.randn(37, 96) * torch.logspace(-3, 3, 37).unsqueeze(1)  # rows six decades apart
    t[5] = 0.0  # an all-zero row must not divide by zero
    q, s = fp8.quant_rows_torch(t)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (37, 1) and s.dtype == torch.float32
    back = q.float() * s
    assert torch.isfinite(back).all() and (back[5] == 0).all()
    amax = t.abs().amax(dim=1, keepdim=True)
    # e4m3 keeps 3 mantissa bits: an element's error is at most 2^-4 of its own magnitude (normal
    # range) or of the row's amax / 448 * 2^-6 (subnormals); the row max maps to 448 exactly.
    err = (back - t).abs()
    assert (err <= t.abs() * 2 ** -4 + amax / 448 * 2 ** -6 + 1e-30).all()
    assert torch.allclose(back.abs().amax(dim=1, keepdim=True), amax, rtol=1e-6)


def _linear(k: int, n: int, bias: bool, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=bias)
    for p in lin.parameters():
        p.requires_grad_(False)
    return lin


@pytest.mark.parametrize("tokens", [48, 13])  # 13: padded to 16 inside, cut back after
def test_fp8_linear_matches_the_fp32_layer_forward_and_input_grad(tokens):
    lin = _linear(64, 96, bias=True)
    x = torch.randn(tokens, 64, requires_grad=True)
    g = torch.randn(tokens, 96)
    want_y = x.detach().double() @ lin.weight.double().t() + lin.bias.double()
    want_dx = g.double() @ lin.weight.double()
    assert fp8.enable_fp8 is not None
    lin.forward = fp8._fp8_forward.__get__(lin)
    y = lin(x)
    (dx,) = torch.autograd.grad(y, x, g)
    assert y.shape == (tokens, 96) and dx.shape == x.shape
    # e4m3 inputs: ~2-4% relative error in norm; exact (< 1e-6) would mean fp8 was not used at all.
    assert 1e-4 < rel(y, want_y) < 0.06
    assert 1e-4 < rel(dx, want_dx) < 0.06


def test_fp8_saves_nothing_for_backward():
    """The base is frozen: dx = dy @ W needs no activation, so the op keeps no tensor alive."""
    lin = _linear(64, 64, bias=False)
    lin.forward = fp8._fp8_forward.__get__(lin)
    x = torch.randn(32, 64, requires_grad=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.shape) or t, lambda t: t):
        y = lin(x)
    assert kept == []
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def _lora_model(base):
    for p in base.parameters():
        p.requires_grad_(False)
    torch.manual_seed(1)
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False,
                                                      target_modules=TARGETS))
    model.train()
    return model


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    s = answer_loss_sum(model, batch)
    s.backward()
    return float(s.detach()), torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("four_bit", [False, True])
def test_fp8_on_a_lora_model_close_to_the_plain_one_and_undone_exactly(four_bit):
    if four_bit:
        pytest.importorskip("bitsandbytes")
        from transformers import Qwen2Config

        from job.model import PRESETS, build_random

        base = build_random(Qwen2Config(**dict(PRESETS["qwen2-tiny"], vocab_size=ARCH["vocab_size"])),
                            torch.device("cpu"), torch.float32, quantize=True, seed=0)
    else:
        torch.manual_seed(0)
        base = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**ARCH, attn_implementation="sdpa")).float()
    model = _lora_model(base)
    set_checkpointing(model, True)
    batch = collate_padded(lora_examples(6, seed=3), pad_id=0)
    want_loss, want_g = _loss_and_grads(model, batch)
    n = fp8.enable_fp8(model, names=fp8.projections(attention=True))
    layers = causal_lm_of(model).model.layers
    assert n == 5 * len(layers)  # q/o/gate/up/down of every decoder layer (k/v stay bf16), nothing else
    switched = [m for m in model.modules() if "forward" in m.__dict__]
    assert len(switched) == n and all(not hasattr(m, "lora_A") for m in switched)
    if four_bit:
        assert {type(m).__name__ for m in switched} == {"Linear4bit"}
    got_loss, got_g = _loss_and_grads(model, batch)
    assert got_loss != want_loss  # fp8 really ran
    assert got_loss == pytest.approx(want_loss, rel=2e-3)
    cos = float(torch.nn.functional.cosine_similarity(got_g.double(), want_g.double(), dim=0))
    assert cos > 0.995 and rel(got_g, want_g) < 0.1
    assert fp8.enable_fp8(model, enabled=False) == n
    again_loss, again_g = _loss_and_grads(model, batch)
    assert again_loss == want_loss and torch.equal(again_g, want_g)


def test_only_frozen_projections_with_widths_divisible_by_16():
    torch.manual_seed(0)
    base = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**ARCH, attn_implementation="sdpa"))
    for p in base.parameters():
        p.requires_grad_(False)
    base.model.layers[0].mlp.down_proj.weight.requires_grad_(True)  # trained: its weight grad is needed
    assert fp8.enable_fp8(base) == 3 * ARCH["num_hidden_layers"] - 1  # the MLP's, by default
    assert "forward" not in base.model.layers[0].mlp.down_proj.__dict__
    assert "forward" not in base.lm_head.__dict__
    attn = base.model.layers[1].self_attn
    assert not any("forward" in m.__dict__ for m in attn.modules())
    fp8.enable_fp8(base, enabled=False)
    assert fp8.enable_fp8(base, names=fp8.projections(attention=True)) == 5 * ARCH["num_hidden_layers"] - 1
    assert "forward" in attn.q_proj.__dict__ and "forward" in attn.o_proj.__dict__
    assert "forward" not in attn.k_proj.__dict__ and "forward" not in attn.v_proj.__dict__  # never k/v


def test_names_pick_the_projections_and_switching_off_undoes_whichever_were_on():
    torch.manual_seed(0)
    base = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**ARCH, attn_implementation="sdpa"))
    for p in base.parameters():
        p.requires_grad_(False)
    layers = ARCH["num_hidden_layers"]
    assert fp8.enable_fp8(base, names=fp8.MLP) == 3 * layers
    on = {n.rsplit(".", 1)[-1] for n, m in base.named_modules() if "forward" in m.__dict__}
    assert on == {"gate_proj", "up_proj", "down_proj"}
    assert fp8.enable_fp8(base, enabled=False) == 3 * layers  # only the switched ones
    assert not [n for n, m in base.named_modules() if "forward" in m.__dict__]
    model = _lora_model(base)  # peft wraps each projection: the frozen one is its base_layer
    assert fp8.enable_fp8(model, names=("k_proj",)) == layers
    assert all(n.endswith("k_proj.base_layer") for n, m in model.named_modules() if "forward" in m.__dict__
               and not hasattr(m, "lora_A"))


def test_available_says_why_not_off_hopper():
    ok, why = fp8.available("cpu")
    assert not ok and "CUDA" in why


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a CUDA GPU with fp8 tensor cores (8.9+)")
def test_cuda_scaled_mm_and_triton_quantizer_agree_with_the_emulation():
    torch.manual_seed(0)
    x = torch.randn(4096, 5120, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1024, 5120, device="cuda", dtype=torch.bfloat16) * 0.02
    xq, xs = fp8.quant_rows(x)
    tq, ts = fp8.quant_rows_torch(x)
    assert torch.equal(xs, ts)
    assert float((xq.float() == tq.float()).float().mean()) > 0.999
    wq, ws = fp8.quant_rows(w)
    y = fp8.scaled_mm(xq, wq.t(), xs, ws.t(), torch.bfloat16, fast_accum=False)
    emul = fp8.scaled_mm(xq.cpu(), wq.t().cpu(), xs.cpu(), ws.t().cpu(), torch.float32, fast_accum=False)
    assert rel(y.float().cpu(), emul) < 1e-2
    assert rel(y.float(), x.float() @ w.float().t()) < 0.06


# --- the job's switch: train.fp8 ----------------------------------------------------------------------

def _paper(**train):
    from contracts.config import load_config

    cfg = load_config(REPO / "configs" / "paper.yaml")
    return cfg.with_overrides({f"train.{k}": v for k, v in train.items()})


def test_train_fp8_is_off_by_default_and_must_be_a_boolean():
    from contracts.errors import ContractError

    assert _paper().train.fp8 is False
    assert _paper(fp8=True).train.fp8 is True
    with pytest.raises(ContractError, match="fp8"):
        _paper(fp8="fast")


def test_the_levers_report_says_whether_fp8_runs_here_and_never_refuses_it(monkeypatch):
    from contracts import events
    from job import levers

    assert levers.report(_paper(), on_gpu=True, layers=48, probe_flex=False)["fp8"] == {"on": False, "why": "train.fp8: false"}
    cpu = levers.report(_paper(fp8=True), on_gpu=False, layers=48, probe_flex=False)
    assert cpu["fp8"]["on"] is False and "CUDA only" in cpu["fp8"]["why"] and levers.refusal(cpu) is None
    full = levers.report(_paper(fp8=True, method="full"), on_gpu=True, layers=48, probe_flex=False)
    assert full["fp8"]["on"] is False and "train.method: full" in full["fp8"]["why"]
    # An A100 (8.0) has no fp8 tensor cores, an H200 (9.0) has: the real capability check, the card faked.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for cap, on in (((8, 0), False), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, cap=cap: cap)
        lv = levers.report(_paper(fp8=True, liger=False), on_gpu=True, layers=48, probe_flex=False)
        assert lv["fp8"]["on"] is on and levers.refusal(lv) is None, lv["fp8"]
        if not on:
            assert "8.0" in lv["fp8"]["why"] and "8.9" in lv["fp8"]["why"]
        assert events.make("start", verb="train", levers=lv)["levers"]["fp8"] == lv["fp8"]
        assert f"fp8 {'on' if on else 'off'}" in levers.summary(lv)


def test_a_start_event_from_an_older_job_without_fp8_still_reads():
    from contracts import events
    from contracts.errors import ContractError
    from job import levers

    lv = levers.report(_paper(), on_gpu=False, layers=48, probe_flex=False)
    lv.pop("fp8")
    assert "fp8" not in events.make("start", verb="train", levers=lv)["levers"]
    lv.pop("offload")  # an old lever missing is still an error
    with pytest.raises(ContractError, match="levers"):
        events.make("start", verb="train", levers=lv)


def test_speed_up_switches_fp8_on_only_where_the_card_has_it():
    torch.manual_seed(0)
    base = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**ARCH, attn_implementation="sdpa"))
    model = _lora_model(base)
    lv = speed_up(model, _paper(fp8=True, liger=False).train, "cpu")
    assert lv.fp8 is False  # CPU: no fp8 tensor cores, the config's switch is not enough
    assert not any("forward" in m.__dict__ and not hasattr(m, "lora_A") for m in model.modules())


def test_the_estimate_uses_the_fp8_rate_only_on_fp8_cards_in_the_fast_mode():
    import yaml

    from launcher.cost.estimate import estimate_run

    table = yaml.safe_load((REPO / "configs" / "throughput.yaml").read_text())
    fp8_tps = float(table["fp8"]["qlora"][14]["tokens_per_s"])
    bf16_tps = float(table["measured"]["qlora"][14]["tokens_per_s"])
    assert fp8_tps > bf16_tps

    def plan(card, **train):
        est = estimate_run(_paper(**train), gpu=f"{card}:1", infra="local")
        return est.plans[0], " ".join(est.notes)

    on, notes = plan("H200", fp8=True)
    assert on.tokens_per_s == pytest.approx(fp8_tps) and "fp8 fast mode" in on.throughput_how
    assert "no fp8 tensor cores" not in notes
    off, _ = plan("H200")
    assert off.tokens_per_s == pytest.approx(bf16_tps) and "fp8" not in off.throughput_how
    # An A100 has no fp8 tensor cores: the bf16 rate, and a note that says why.
    a100_fp8, notes = plan("A100-80GB", fp8=True)
    a100, _ = plan("A100-80GB")
    assert a100_fp8.tokens_per_s == pytest.approx(a100.tokens_per_s)
    assert "train.fp8: A100-80GB has no fp8 tensor cores" in notes
    # The lean memory mode keeps its own (bf16) measured row even with fp8 asked for.
    lean_fp8, _ = plan("L4", fp8=True)
    lean, _ = plan("L4")
    assert lean_fp8.memory_mode == "lean" and lean_fp8.tokens_per_s == pytest.approx(lean.tokens_per_s)


# --- the recipe switches: train.fp8_fast_accum, train.fp8_backward (round 7) -------------------------

def test_dx_in_bf16_is_the_dequantized_weights_product_while_the_forward_stays_fp8():
    lin = _linear(64, 96, bias=True)
    x = torch.randn(40, 64, requires_grad=True)
    g = torch.randn(40, 96)
    want_y = x.detach().double() @ lin.weight.double().t() + lin.bias.double()
    want_dx = g.double() @ lin.weight.double()
    lin.forward = types.MethodType(functools.partial(fp8._fp8_forward, backward="bf16"), lin)
    y = lin(x)
    (dx,) = torch.autograd.grad(y, x, g)
    assert 1e-4 < rel(y, want_y) < 0.06  # the forward is still e4m3
    assert rel(dx, want_dx) < 1e-6  # dx: the plain product in the grad's dtype (fp32 here), no e4m3 rounding


def test_the_forward_accumulation_switch_reaches_scaled_mm_and_dx_stays_exact(monkeypatch):
    seen = []
    real = fp8.scaled_mm

    def spy(a, b, sa, sb, out_dtype, fast_accum):  # records the flag, then the real product
        seen.append(fast_accum)
        return real(a, b, sa, sb, out_dtype, fast_accum)

    monkeypatch.setattr(fp8, "scaled_mm", spy)
    for fast_accum in (True, False):
        torch.manual_seed(0)
        base = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**ARCH, attn_implementation="sdpa"))
        model = _lora_model(base)
        n = fp8.enable_fp8(model, fast_accum=fast_accum, names=fp8.projections(attention=True))
        seen.clear()
        _loss_and_grads(model, collate_padded(lora_examples(2, seed=3), pad_id=0))
        # n forwards with the switch, then the input grads, always exact (layer 0's q_proj gets none:
        # its input comes from the frozen embedding; k/v are not switched)
        assert seen[:n] == [fast_accum] * n and seen[n:] == [False] * (n - 1)


def test_enable_fp8_refuses_an_unknown_backward():
    lin = _linear(64, 64, bias=False)
    with pytest.raises(ValueError, match=r"'fp16' is not accepted \(fp8 \| bf16\)"):
        fp8.enable_fp8(lin, backward="fp16")


def test_the_recipe_switches_default_to_round_6_and_are_checked():
    from contracts.errors import ContractError

    t = _paper().train
    assert (t.fp8_fast_accum, t.fp8_backward, t.fp8_attention) == (True, "fp8", False)
    assert _paper(fp8=True, fp8_attention=True).train.fp8_attention is True
    with pytest.raises(ContractError, match="fp8_attention"):
        _paper(fp8_attention="q_proj")
    t = _paper(fp8=True, fp8_fast_accum=False, fp8_backward="bf16").train
    assert (t.fp8_fast_accum, t.fp8_backward) == (False, "bf16")
    with pytest.raises(ContractError, match=r"train.fp8_backward: 'fp16' is not accepted \(fp8 \| bf16\)"):
        _paper(fp8_backward="fp16")
    with pytest.raises(ContractError, match="fp8_fast_accum"):
        _paper(fp8_fast_accum="sometimes")


def test_speed_up_applies_the_configs_recipe_where_fp8_runs(monkeypatch):
    monkeypatch.setattr(fp8, "available", lambda device: (True, "faked"))  # the card faked; the emulated product runs
    torch.manual_seed(0)
    model = _lora_model(transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**ARCH, attn_implementation="sdpa")))
    lv = speed_up(model, _paper(fp8=True, liger=False, fp8_fast_accum=False, fp8_backward="bf16").train, "cpu")
    assert lv.fp8 and (lv.fp8_fast_accum, lv.fp8_backward) == (False, "bf16")
    switched = [m for m in model.modules() if "forward" in m.__dict__ and not hasattr(m, "lora_A")]
    assert len(switched) == 3 * ARCH["num_hidden_layers"]  # the MLP's gate/up/down
    for m in switched:
        assert isinstance(m.forward, types.MethodType)
        assert m.forward.__func__.keywords == {"fast_accum": False, "backward": "bf16"}
    fp8.enable_fp8(model, enabled=False)
    lv = speed_up(model, _paper(fp8=True, liger=False, fp8_attention=True).train, "cpu")
    assert lv.fp8_attention
    on = [n for n, m in model.named_modules() if "forward" in m.__dict__ and not hasattr(m, "lora_A")]
    assert len(on) == 5 * ARCH["num_hidden_layers"] and sum(".q_proj." in n or ".o_proj." in n for n in on) == 2 * ARCH["num_hidden_layers"]


def test_the_bench_levers_name_the_recipe(monkeypatch):
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("bench_train_throughput", REPO / "bench" / "train_throughput.py")
    tt = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, tt)  # its dataclasses look their module up there
    spec.loader.exec_module(tt)
    v = tt.parse_ours("packing,fp8,mb=32", tiny=False)
    assert (v.levers.fp8, v.levers.fp8_fast_accum, v.levers.fp8_backward) == (True, True, "fp8")
    v = tt.parse_ours("packing,fp8,exact,mb=32", tiny=False)
    assert (v.levers.fp8, v.levers.fp8_fast_accum, v.levers.fp8_backward) == (True, False, "fp8")
    v = tt.parse_ours("packing,fp8,dxbf16,mb=32", tiny=False)
    assert (v.levers.fp8, v.levers.fp8_fast_accum, v.levers.fp8_backward) == (True, True, "bf16")
    assert not v.levers.fp8_attention
    assert tt.parse_ours("fp8attn", tiny=False).levers.fp8_attention is True
    v = tt.parse_ours("fp8mlp", tiny=False)
    assert v.levers.fp8 and not v.levers.fp8_attention
