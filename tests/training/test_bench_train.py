"""`malora bench train`'s measurement on a tiny model: every method timed, the parameter counts the formulas',
and the --json shape of the headline configuration (seconds per call, per layer and per step)."""

from __future__ import annotations

from malora_runtime.training.efficiency import SETTINGS, bench, fixed_batch, headline_json, markdown

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_every_setting_is_timed_and_the_headline_has_its_four_forms(tiny_llama):
    batch = fixed_batch(tiny_llama.config.vocab_size, 2, 16, 8, "cpu")
    rows = bench(tiny_llama, TARGETS, SETTINGS, batch, rounds=1, warmup=0, layer_tokens=32)
    assert [r.setting for r in rows] == list(SETTINGS)
    for r in rows:
        assert r.parameters == r.formula_parameters and r.step_median > 0 and r.layer_median > 0
    data = headline_json(rows)
    assert set(data) == {"layer", "step"}
    for part in data.values():
        assert set(part) == {"lora", "molora_dispatch", "molora_fused", "malora"} and min(part.values()) > 0
    table = markdown(rows, "malora bench train", "test", 10**6)
    assert table.count("\n| ") == len(SETTINGS) + 2  # the header, its rule and one row per setting
