"""The Triton kernel, both launch modes, run by Triton's interpreter on CPU tensors, or compiled on a GPU.

TRITON_INTERPRET must be set before `triton.jit` wraps the kernel, so it is set here at import
time and the kernel module is (re)loaded after it.

MALORA_TEST_DEVICE=cuda runs the same comparisons compiled on the GPU (scripts/gpu-check.sh does): the
cases are built on the CPU as always and copied there. It needs TRITON_INTERPRET=0 in the environment
(tests/conftest.py sets 1 where it is unset), and is skipped, with the reason, where no GPU is present.
"""

from __future__ import annotations

import importlib
import os
import sys

DEVICE = os.environ.get("MALORA_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from malora_runtime.adapters.format import ModuleSpec  # noqa: E402
from malora_runtime.kernels.slot_bank import SlotBank  # noqa: E402
from malora_runtime.kernels.token_slots import NO_SLOT, TokenSlots  # noqa: E402
from tests.kernels.conftest import (  # noqa: E402
    MIXED_SPECS,
    SIGNED_ALPHA_SPECS,
    make_mixed_dtype_case,
    make_ties,
    release,
)

triton = pytest.importorskip("triton", reason="triton is not installed: the Triton kernels are not tested")
if DEVICE != "cpu":
    if not torch.cuda.is_available():
        pytest.skip(f"MALORA_TEST_DEVICE={DEVICE}: no GPU here to run the compiled kernel", allow_module_level=True)
    if triton.knobs.runtime.interpret:
        pytest.fail(f"MALORA_TEST_DEVICE={DEVICE} runs the kernel compiled: set TRITON_INTERPRET=0", pytrace=False)
if "malora_runtime.kernels.triton_malora" in sys.modules:
    importlib.reload(sys.modules["malora_runtime.kernels.triton_malora"])
from malora_runtime.kernels import dispatch  # noqa: E402
from malora_runtime.kernels import triton_malora as tm  # noqa: E402

MODES = ["token", "tile"]


def on_device(case) -> tuple[torch.Tensor, SlotBank, TokenSlots]:
    """(x, bank, token_slots) of the case on DEVICE: as built on the CPU, or copies."""
    if DEVICE == "cpu":
        return case.x, case.bank, case.token_slots
    cpu = case.bank
    bank = SlotBank(cpu.d_in, cpu.d_out, cpu.num_slots, torch.device(DEVICE), storage_dtype=case.dtype)
    for slot in cpu.active_slots:  # a GPU bank: each active module copied there, in the model's dtype
        module = cpu.module(slot)
        info = cpu.infos[slot]
        spec = ModuleSpec(d=info.d, r=info.r, num_experts=info.num_experts, top_k=info.top_k,
                          alpha=info.scale * info.r, router_temperature=info.router_temperature,
                          router_norm="softmax_topk" if info.softmax_first else "topk_softmax",
                          router_bias=info.has_router_bias)
        bank.set_slot(slot, module.weights(spec))
    return case.x.to(DEVICE), bank, TokenSlots.from_list(case.slots, DEVICE)


def run_triton(case, mode):
    x, bank, token_slots = on_device(case)
    out, counts = case.poisoned().to(DEVICE), case.new_counts().to(DEVICE)
    result = tm.malora_delta_triton(x, bank, token_slots, out=out, expert_counts=counts, mode=mode)
    assert result is out
    return out.cpu(), counts.cpu()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_tokens", [1, 40])
def test_mixed_batch(make_case, mode, dtype, num_tokens):
    case = make_case([*MIXED_SPECS, None], num_tokens, dtype=dtype)
    out, counts = run_triton(case, mode)
    case.check(out, f"triton {mode} mixed", counts)


@pytest.mark.parametrize("mode", MODES)
def test_batch_of_257_tokens(make_case, mode):
    case = make_case([*MIXED_SPECS, None], 257, d_in=24, d_out=20, none_fraction=0.3)
    out, counts = run_triton(case, mode)
    case.check(out, f"triton {mode} 257", counts)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k", [1, 2])
def test_router_ties_pick_the_lower_index(make_case, mode, dtype, top_k):
    specs = [ModuleSpec(d=6, r=3, num_experts=6, top_k=top_k, alpha=2.0),
             ModuleSpec(d=4, r=2, num_experts=4, top_k=top_k + 1, alpha=1.0, router_bias=True,
                        router_norm="softmax_topk", router_temperature=0.5)]
    case = make_case(specs, 40, dtype=dtype, transform=make_ties)
    out, counts = run_triton(case, mode)
    case.check(out, f"triton {mode} ties k={top_k}", counts)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("spec", [
    ModuleSpec(d=9, r=9, num_experts=1, top_k=1, alpha=9.0),
    ModuleSpec(d=6, r=2, num_experts=5, top_k=5, alpha=1.0, router_norm="softmax_topk", router_bias=True),
    ModuleSpec(d=3, r=4, num_experts=7, top_k=7, alpha=3.0, router_temperature=0.25, router_bias=True),
], ids=["lora", "k=N-softmax_topk-bias", "k=N-temperature"])
def test_single_adapter_kinds(make_case, mode, spec):
    case = make_case([spec], 20, none_fraction=0.0)
    out, counts = run_triton(case, mode)
    case.check(out, f"triton {mode} single", counts)


def test_base_and_inactive_tokens_cost_nothing(make_case):
    case = make_case([MIXED_SPECS[0], None], slots=[NO_SLOT, 1, NO_SLOT, 1])
    for mode in MODES:
        out, counts = run_triton(case, mode)
        assert torch.equal(out, torch.zeros_like(out)) and not counts.any(), f"{mode} seed={case.seed}"


def test_mode_chooser_and_dispatch(make_case, monkeypatch):
    decode = make_case(MIXED_SPECS, slots=[0, 1, 2, 3, 4, NO_SLOT])
    prefill = make_case(MIXED_SPECS, slots=[2] * 30 + [NO_SLOT] + [4] * 9)
    assert tm.choose_mode(decode.token_slots) == "token"
    assert tm.choose_mode(prefill.token_slots) == "tile"
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    for case in (decode, prefill):
        base = torch.randn(case.expected.shape)
        y = base.to(DEVICE, copy=True)
        dispatch.add_malora_delta(y, *on_device(case))
        case.check(y.cpu() - base, "dispatch triton")


@pytest.mark.skipif(DEVICE != "cpu", reason="a CPU bank reads each adapter in its own dtype; a GPU bank has one")
@pytest.mark.parametrize("mode", MODES)
def test_adapters_of_every_dtype_share_a_batch(seed, mode):
    """One launch per weight dtype: each program reads only slots of its launch's dtype."""
    case = make_mixed_dtype_case(seed)
    out, counts = run_triton(case, mode)
    case.check(out, f"triton {mode} mixed weight dtypes", counts)


@pytest.mark.parametrize("mode", MODES)
def test_released_slot_gets_no_delta(make_case, mode):
    case = make_case(MIXED_SPECS[:3], 24, none_fraction=0.0)
    release(case, 1)  # its weights stay in the bank, stale
    out, counts = run_triton(case, mode)
    case.check(out, f"triton released slot {mode}", counts)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_negative_and_zero_alpha_negate_or_remove_the_delta(make_case, mode, dtype):
    """The kernel folds the scale into the routing weights: the columns of the chosen experts must be found
    before that, or a negative alpha (negative weights) left them all unread and gave no delta."""
    case = make_case([*SIGNED_ALPHA_SPECS, None], 40, dtype=dtype)
    out, counts = run_triton(case, mode)
    case.check(out, f"triton {mode} signed alpha", counts)
    negative = torch.tensor([s in (0, 1) for s in case.slots])
    assert negative.any() and out[negative].abs().sum() > 0
