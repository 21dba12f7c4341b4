"""The speed switches in TrainSpec: validated like every other key, mapped onto job/levers.py's Levers."""
from __future__ import annotations

import pytest

from contracts.config import RunConfig
from contracts.errors import ContractError
from job.levers import levers_for


def test_defaults_pick_flex_on_cuda_sdpa_on_cpu():
    t = RunConfig().train
    assert (t.liger, t.attn_implementation, t.checkpoint_layers) == (True, "auto", None)
    assert levers_for(t, "cpu").attn_implementation == "sdpa"
    assert levers_for(t, "cuda").attn_implementation == "flex_attention"
    assert levers_for(t, "cuda").row_len == t.max_length


@pytest.mark.parametrize("key,value,needle", [
    ("train.attn_implementation", "flash_attention_2", "auto | sdpa | flex_attention | eager"),
    ("train.checkpoint_layers", -1, "null for all layers"),
    ("train.liger", "yes", "true or false"),
])
def test_bad_speed_switches_are_one_line_errors(key, value, needle):
    with pytest.raises(ContractError) as e:
        RunConfig().with_overrides({key: value})
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and repr(value) in msg


def test_switches_reach_the_levers():
    cfg = RunConfig().with_overrides({"train.attn_implementation": "sdpa", "train.checkpoint_layers": 12,
                                      "train.liger": False, "train.max_length": 1024})
    lv = levers_for(cfg.train, "cuda")
    assert (lv.attn_implementation, lv.checkpoint_layers, lv.liger, lv.row_len) == ("sdpa", 12, False, 1024)
