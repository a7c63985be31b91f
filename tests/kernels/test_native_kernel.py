"""The native CPU kernel beyond the shared CPU-path cases (tests/kernels/test_cpu_path.py runs those on
it too): sizes around its vector and block widths, batch invariance, strided tensors, bad calls, and
how it is chosen (how it is built: test_native_build.py)."""

from __future__ import annotations

import pytest
import torch

from malora_runtime.adapters.format import ModuleSpec
from malora_runtime.kernels import dispatch
from malora_runtime.kernels.native import BLOCK, add_malora_delta_native
from malora_runtime.kernels.routing_log import RoutingLog
from malora_runtime.kernels.token_slots import NO_SLOT, TokenSlots
from tests.conftest import requires_native
from tests.kernels.conftest import MIXED_SPECS, make_bank, make_weights, out_of_place, reference_batch

pytestmark = [requires_native, pytest.mark.isa]
malora_delta_native = out_of_place(add_malora_delta_native)

# [S; G] wider than 64 columns and N r wider than 64 (several column chunks), next to small adapters.
WIDE_SPECS = [
    ModuleSpec(d=70, r=7, num_experts=12, top_k=5, alpha=7.0, router_bias=True),
    ModuleSpec(d=3, r=1, num_experts=2, top_k=2, alpha=1.0, router_norm="softmax_topk"),
    MIXED_SPECS[1],  # LoRA
]


def run_native(case):
    out, counts = case.poisoned(), case.new_counts()
    malora_delta_native(case.x, case.bank, case.token_slots, out=out, expert_counts=counts)
    return out, counts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d_in, d_out", [(1, 1), (37, 45), (64, 16), (577, 200), (96, 1030)])
def test_sizes_around_vector_widths(make_case, d_in, d_out, dtype):
    # d_out 1030 = 16 chunks of 64 + 6 scalars; 200 = 3 chunks + 8 scalars; 45 = 2 vectors + 13. In bfloat16 the
    # kernel widens x's rows and rounds into y's itself: whole vectors of 16, then the scalar tails.
    case = make_case([*WIDE_SPECS, None], 90, d_in=d_in, d_out=d_out, dtype=dtype)
    out, counts = run_native(case)
    case.check(out, f"native {d_in}x{d_out} {dtype}", counts)


@pytest.mark.parametrize("length", [BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK + 7])
def test_segments_across_block_boundaries(make_case, length):
    # One long run per adapter, an interleaved pair, decode tokens and base tokens in one batch.
    interleaved = [s for pair in zip([1] * length, [2] * length) for s in pair]
    slots = [0] * length + interleaved + [NO_SLOT, 2, 1, NO_SLOT, 0]
    case = make_case([*WIDE_SPECS], slots=slots, d_in=50, d_out=70)
    out, counts = run_native(case)
    case.check(out, f"native segments of {length}", counts)


def test_each_token_is_batch_and_thread_invariant(make_case):
    """A token's delta does not depend on which tokens share its batch or block, nor on the thread
    count: bit for bit (seeded sampling relies on rows that do not change with the batch)."""
    case = make_case([*WIDE_SPECS, *MIXED_SPECS], 150, d_in=40, d_out=33, none_fraction=0.1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        whole = malora_delta_native(case.x, case.bank, case.token_slots)
        torch.set_num_threads(1)
        single = malora_delta_native(case.x, case.bank, case.token_slots)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, whole), f"seed {case.seed}"
    for i in range(0, len(case.slots), 7):
        alone = malora_delta_native(case.x[i:i + 1], case.bank, TokenSlots.from_list([case.slots[i]]))
        assert torch.equal(alone[0], whole[i]), f"token {i} (seed {case.seed})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_x_and_y(make_case, dtype):
    """Rows apart in both (bfloat16: x read and y written where they lie, or through a copy when y's rows
    are not contiguous)."""
    case = make_case(MIXED_SPECS, 40, d_in=37, d_out=45, dtype=dtype)
    wide_x = torch.randn(40, 60).to(dtype)
    wide_x[:, 5:42] = case.x
    wide_y = torch.full((40, 50), float("nan"), dtype=dtype)
    y = wide_y[:, 2:47]
    y.zero_()
    counts = case.new_counts()
    add_malora_delta_native(y, wide_x[:, 5:42], case.bank, case.token_slots, counts)
    case.check(y.clone(), "native strided", counts)
    assert wide_y[:, :2].isnan().all() and wide_y[:, 47:].isnan().all()  # nothing written outside y


def test_shapes_that_do_not_fit_are_refused(make_case):
    case = make_case(MIXED_SPECS[:2], 8)
    y = torch.zeros(8, case.bank.d_out)
    with pytest.raises(ValueError, match="do not fit"):
        add_malora_delta_native(y, torch.zeros(8, case.bank.d_in + 1), case.bank, case.token_slots)
    with pytest.raises(ValueError, match="do not fit"):  # fewer rows than the TokenSlots index
        add_malora_delta_native(y[:5], case.x[:5], case.bank, case.token_slots)
    assert not y.any()


def test_tensors_off_the_cpu_are_refused_before_any_pointer_is_read(make_case, monkeypatch):
    case = make_case(MIXED_SPECS[:2], 8)
    meta_x = torch.empty(case.x.shape, device="meta")
    with pytest.raises(ValueError, match="runs on CPU tensors"):
        add_malora_delta_native(torch.zeros(8, case.bank.d_out), meta_x, case.bank, case.token_slots)
    assert "native" not in case.bank._derived  # nothing was built for it
    monkeypatch.setenv(dispatch.BACKEND_ENV, "native")
    with pytest.raises(ValueError, match="native runs on the CPU"):
        dispatch.choose_backend(meta_x)


def test_expert_counts_accumulate_across_calls_and_threads(make_case):
    """The kernel counts with atomic adds from both threads into the caller's tensor, which may be wider
    than the bank's n_max (the engine's grow with the bank); a RoutingLog is for the torch path only."""
    case = make_case([*WIDE_SPECS, None, *MIXED_SPECS], 300)
    wide = torch.zeros(case.bank.num_slots, case.bank.maxima[2] + 3, dtype=torch.int64)
    for _ in range(3):
        malora_delta_native(case.x, case.bank, case.token_slots, expert_counts=wide)
    assert torch.equal(wide[:, :case.bank.maxima[2]], 3 * case.expected_counts) and not wide[:, -3:].any()
    with pytest.raises(TypeError, match="int64 CPU tensor"):
        malora_delta_native(case.x, case.bank, case.token_slots, expert_counts=RoutingLog())
    with pytest.raises(TypeError, match="int64 CPU tensor"):
        malora_delta_native(case.x, case.bank, case.token_slots, expert_counts=torch.zeros(2, 2, dtype=torch.int64))


def test_auto_uses_native_and_falls_back_to_torch(make_case, monkeypatch):
    monkeypatch.setenv(dispatch.BACKEND_ENV, "auto")
    case = make_case(MIXED_SPECS, 30)
    assert dispatch.choose_backend(case.x) == "native"
    monkeypatch.setattr(dispatch, "native_kernel", lambda: None)  # a machine where it cannot be built
    assert dispatch.choose_backend(case.x) == "cpu"
    y, counts = torch.zeros(case.expected.shape), case.new_counts()
    dispatch.add_malora_delta(y, case.x, case.bank, case.token_slots, counts)
    case.check(y, "auto without native", counts)


def test_slots_read_the_adapters_own_buffers(seed):
    """A packed adapter is read where it lies: the bank holds no copy, and a change to the adapter's buffer
    is what the next call computes with. Mixed shapes and dtypes share the bank with no padding."""
    from malora_runtime.kernels.packed import PackedModule
    from malora_runtime.kernels.slot_bank import SlotBank

    gen = torch.Generator().manual_seed(seed)
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    weights = [PackedModule.from_weights(make_weights(spec, 30, 20, gen), dtype).weights(spec)
               for spec, dtype in zip(WIDE_SPECS[:1] + MIXED_SPECS[:2], dtypes)]
    bank = SlotBank(30, 20, 3)
    for slot, w in enumerate(weights):
        bank.set_slot(slot, w)
        assert bank.module(slot) is w.packed
    assert bank.copied_bytes() == 0
    token_slots = TokenSlots.from_list([0, 1, 2, 2, 1, 0])
    x = torch.randn(6, 30, generator=gen)
    before = malora_delta_native(x, bank, token_slots)
    for slot, w in enumerate(weights):
        expected, _ = reference_batch(x, token_slots.slots.tolist(), [w if s == slot else None for s in range(3)],
                                      w.S.dtype, 12)
        rows = token_slots.slots == slot
        error = float((before[rows].double() - expected[rows]).abs().max() / expected[rows].abs().max())
        assert error <= 1e-5, f"slot {slot} ({w.S.dtype} weights, exact in float32): error {error:.3g} (seed {seed})"
    weights[1].B.mul_(2)  # through the adapter's own tensors: the bank sees it
    after = malora_delta_native(x, bank, token_slots)
    rows = token_slots.slots == 1
    assert torch.allclose(after[rows], 2 * before[rows], rtol=1e-3, atol=1e-6) and torch.equal(after[~rows],
                                                                                           before[~rows])


def test_reads_past_a_row_end_never_reach_the_output(make_case):
    """The kernel reads whole vectors of 16 from each row's start, past the row's end (into the next part
    of the buffer or its tail) and drops those columns: NaN there must change nothing."""
    case = make_case(MIXED_SPECS, 50)
    for slot in case.bank.active_slots:
        module = case.bank.module(slot)
        module.buffer[module.shape.offsets[4]:] = float("nan")
    out, counts = run_native(case)
    case.check(out, "native NaN tail", counts)


def test_new_and_cleared_slots_reach_the_kernel(seed):
    """The slot table is written per slot: an adapter written after a first call (or a slot cleared)
    must be what the next call computes with."""
    gen = torch.Generator().manual_seed(seed)
    weights = [make_weights(spec, 30, 20, gen) for spec in MIXED_SPECS[:2]] + [None]
    bank = make_bank(weights, torch.float32)
    token_slots = TokenSlots.from_list([0, 1, 2, 2, 1])
    x = torch.randn(5, 30, generator=gen)
    before = malora_delta_native(x, bank, token_slots)
    assert not before[2:4].any()
    bank.set_slot(2, make_weights(MIXED_SPECS[0], 30, 20, gen))
    after = malora_delta_native(x, bank, token_slots)
    assert after[2:4].abs().sum() > 0 and torch.equal(after[[0, 1, 4]], before[[0, 1, 4]])
    bank.deactivate_slot(0)
    assert not malora_delta_native(x, bank, token_slots)[0].any()
