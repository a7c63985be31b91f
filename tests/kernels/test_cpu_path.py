"""The CPU paths (torch and native) and the dispatch facade against the float64 reference of whole
heterogeneous batches."""

from __future__ import annotations

import random

import pytest
import torch

from malora_runtime.adapters.format import ModuleSpec
from malora_runtime.kernels import dispatch
from malora_runtime.kernels.cpu import LONG_SEGMENT, malora_delta_cpu, plan_groups
from malora_runtime.kernels.native import add_malora_delta_native
from malora_runtime.kernels.token_slots import NO_SLOT, TokenSlots
from tests.conftest import requires_native
from tests.kernels.conftest import (
    MIXED_SPECS,
    SIGNED_ALPHA_SPECS,
    make_bank,
    make_mixed_dtype_case,
    make_ties,
    make_weights,
    out_of_place,
    random_case,
    random_slots,
    reference_batch,
    release,
)

pytestmark = pytest.mark.isa  # run again at every lower instruction-set level (tests/isa_levels.py)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(params=[pytest.param(malora_delta_cpu, id="torch"),
                        pytest.param(out_of_place(add_malora_delta_native), id="native", marks=requires_native)])
def delta(request):
    """Each CPU implementation: f(x, bank, token_slots, out=None, expert_counts=None) -> out."""
    return request.param


def run_cpu(delta, case):
    out, counts = case.poisoned(), case.new_counts()
    result = delta(case.x, case.bank, case.token_slots, out=out, expert_counts=counts)
    assert result is out
    return out, counts


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 33, 257])
def test_mixed_batch(make_case, dtype, num_tokens, delta):
    case = make_case([*MIXED_SPECS, None], num_tokens, dtype=dtype)
    out, counts = run_cpu(delta, case)
    case.check(out, "cpu mixed", counts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_router_ties_pick_the_lower_index(make_case, dtype, top_k, delta):
    specs = [ModuleSpec(d=6, r=3, num_experts=6, top_k=top_k, alpha=2.0),
             ModuleSpec(d=4, r=2, num_experts=4, top_k=min(top_k, 4), alpha=1.0, router_bias=True,
                        router_norm="softmax_topk", router_temperature=0.5)]
    case = make_case(specs, 64, dtype=dtype, transform=make_ties)
    out, counts = run_cpu(delta, case)
    case.check(out, f"cpu ties k={top_k}", counts)


@pytest.mark.parametrize("spec", [
    ModuleSpec(d=9, r=9, num_experts=1, top_k=1, alpha=9.0),
    ModuleSpec(d=6, r=2, num_experts=5, top_k=5, alpha=1.0),
    ModuleSpec(d=6, r=2, num_experts=5, top_k=5, alpha=1.0, router_norm="softmax_topk", router_bias=True),
    ModuleSpec(d=3, r=4, num_experts=7, top_k=2, alpha=3.0, router_temperature=0.25, router_bias=True),
], ids=["lora", "k=N", "k=N-softmax_topk-bias", "temperature-bias"])
def test_single_adapter_kinds(make_case, spec, delta):
    case = make_case([spec], 57, none_fraction=0.0)
    out, counts = run_cpu(delta, case)
    case.check(out, "cpu single", counts)


def test_decode_every_token_its_own_adapter(make_case, delta):
    specs = [MIXED_SPECS[i % len(MIXED_SPECS)] for i in range(32)]
    case = make_case(specs, slots=list(range(31, -1, -1)), d_in=64, d_out=40)
    out, counts = run_cpu(delta, case)
    case.check(out, "cpu decode", counts)


def test_skewed_segments_split_into_groups(make_case, delta):
    slots = [0] * 150 + list(range(1, 9)) + [NO_SLOT] * 3 + [3] * 20
    case = make_case([MIXED_SPECS[i % len(MIXED_SPECS)] for i in range(9)], slots=slots)
    assert len(plan_groups(case.token_slots.segments, case.bank)) > 1
    out, counts = run_cpu(delta, case)
    case.check(out, "cpu skewed", counts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_segments_run_on_their_own_rows(make_case, dtype):
    """Prefill-length segments are groups of their own (2-D products): consecutive ones slice x and y (no
    gather), an interleaved one is gathered; decode tokens and base tokens share the batch."""
    interleaved = [val for pair in zip([2] * LONG_SEGMENT, [4] * LONG_SEGMENT) for val in pair]
    slots = [1, NO_SLOT, 3] + [0] * (LONG_SEGMENT + 73) + [1] * LONG_SEGMENT + interleaved + [NO_SLOT, 3]
    specs = [MIXED_SPECS[i % len(MIXED_SPECS)] for i in range(5)]
    case = make_case(specs, slots=slots, dtype=dtype)
    groups = plan_groups(case.token_slots.segments, case.bank, case.token_slots.segment_rows)
    alone = {g.slots[0]: g.first_row for g in groups if len(g.slots) == 1}
    assert alone == {0: 3, 1: None, 2: None, 3: None, 4: None}, alone  # slot 1 starts apart, at row 0
    out, counts = run_cpu(malora_delta_cpu, case)
    case.check(out, "cpu long segments", counts)


def test_segment_rows_mark_consecutive_tokens_only():
    token_slots = TokenSlots.from_list([5, 5, NO_SLOT, 2, 2, 2, 5, 7])
    assert token_slots.segments == [(2, 0, 3), (5, 3, 6), (7, 6, 7)]
    assert token_slots.segment_rows == [3, None, 7]


def test_only_base_and_inactive_tokens_give_zero(make_case, delta):
    case = make_case([MIXED_SPECS[0], None], slots=[NO_SLOT, 1, 1, NO_SLOT])
    out, counts = run_cpu(delta, case)
    assert torch.equal(out, torch.zeros_like(out)) and not counts.any(), f"seed={case.seed}"


@pytest.mark.parametrize("backend", [pytest.param("native", marks=requires_native), "cpu", "reference", "auto"])
def test_dispatch_adds_into_y(make_case, monkeypatch, backend):
    monkeypatch.setenv(dispatch.BACKEND_ENV, backend)
    case = make_case([*MIXED_SPECS, None], 70)
    base = torch.randn(case.expected.shape)
    y, counts = base.clone(), case.new_counts()
    dispatch.add_malora_delta(y, case.x, case.bank, case.token_slots, counts)
    case.check(y - base, f"dispatch {backend}", counts)


def test_dispatch_without_adapters_returns_at_once(make_case, monkeypatch):
    monkeypatch.setenv(dispatch.BACKEND_ENV, "no-such-backend")  # never read: nothing to do
    case = make_case([MIXED_SPECS[0]], slots=[0])
    y = torch.randn(3, case.bank.d_out)
    before = y.clone()
    dispatch.add_malora_delta(y, torch.randn(3, case.bank.d_in), case.bank, TokenSlots.from_list([NO_SLOT] * 3))
    assert torch.equal(y, before)


def test_dispatch_rejects_unknown_backend(make_case, monkeypatch):
    monkeypatch.setenv(dispatch.BACKEND_ENV, "gpu-please")
    case = make_case([MIXED_SPECS[0]], slots=[0])
    with pytest.raises(ValueError, match="MALORA_KERNEL_BACKEND"):
        dispatch.add_malora_delta(torch.zeros(1, case.bank.d_out), case.x, case.bank, case.token_slots)


def test_slot_writes_after_first_use_reach_the_kernels(seed, delta):
    """A slot write (set_slot / deactivate_slot) after a first call drops the cached per-group constants,
    per-step plans and slot tables: after a swap and a clear the delta (same TokenSlots object) must
    follow the new weights."""
    gen = torch.Generator().manual_seed(seed)
    specs = MIXED_SPECS[:3]
    weights = [make_weights(spec, 37, 45, gen) for spec in specs]
    bank = make_bank(weights, torch.float32)
    slots = random_slots(gen, 40, len(specs), none_fraction=0.1)
    x, token_slots = torch.randn(40, 37, generator=gen), TokenSlots.from_list(slots)
    delta(x, bank, token_slots)  # builds the plans and constants

    # A new version in slot 0 with other routing (top_k, temperature, norm, bias): the group
    # constants and plans cached during the first call must not survive the write.
    new_spec = ModuleSpec(d=8, r=4, num_experts=4, top_k=3, alpha=2.0, router_norm="softmax_topk",
                          router_temperature=0.5, router_bias=True)
    weights[0] = make_weights(new_spec, 37, 45, gen)

    def check(label: str) -> torch.Tensor:
        expected, _ = reference_batch(x, slots, weights, torch.float32, bank.maxima[2])
        out = delta(x, bank, token_slots, out=torch.full((40, 45), float("nan")))
        error = float((out.double() - expected).abs().max() / expected.abs().max())
        assert error <= 1e-5, f"relative error {error:.3g} after {label} (seed {seed})"
        return out

    bank.set_slot(0, weights[0])
    check("a swap")
    bank.deactivate_slot(2)
    weights[2] = None
    out = check("a clear")
    assert (out[torch.tensor([s == 2 for s in slots])] == 0).all()


def test_tables_built_in_inference_mode_accept_later_slot_writes(make_case, delta):
    """The engine runs forwards under inference_mode and writes slots outside it."""
    case = make_case(MIXED_SPECS[:2], 9)
    with torch.inference_mode():
        delta(case.x, case.bank, case.token_slots)
    case.bank.deactivate_slot(0)  # raised "Inplace update to inference tensor" when the layouts were inference tensors
    out = delta(case.x, case.bank, case.token_slots)
    assert (out[torch.tensor([s == 0 for s in case.slots])] == 0).all()


def test_adapters_of_every_dtype_share_a_batch(seed, delta):
    """float32, bfloat16 and float16 adapters in one bank, each read in its own dtype."""
    case = make_mixed_dtype_case(seed)
    out, counts = run_cpu(delta, case)
    case.check(out, "mixed weight dtypes", counts)


def test_released_slot_gets_no_delta(make_case, delta):
    case = make_case(MIXED_SPECS[:3], 48, none_fraction=0.0)
    release(case, 1)  # its weights stay in the bank, stale
    out, counts = run_cpu(delta, case)
    case.check(out, "cpu released slot", counts)


@pytest.mark.parametrize("dtype", DTYPES)
def test_negative_and_zero_alpha_negate_or_remove_the_delta(make_case, dtype, delta):
    case = make_case([*SIGNED_ALPHA_SPECS, None], 90, dtype=dtype)
    out, counts = run_cpu(delta, case)
    case.check(out, "cpu signed alpha", counts)
    zero = torch.tensor([s == 2 for s in case.slots])
    assert zero.any() and not out[zero].any()


def test_random_configurations_match_the_reference(make_case, seed, delta):
    """Fuzz, for the torch path and the native kernel alike: random sizes (d above d_in too), adapter kinds (N = 1,
    k = N, both norms, negative and zero alpha), inactive slots and batches; fresh each run, the seed replays."""
    rng = random.Random(seed)
    for trial in range(20):
        case = random_case(make_case, rng)
        out, counts = run_cpu(delta, case)
        case.check(out, f"cpu fuzz trial {trial}", counts)
