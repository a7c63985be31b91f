"""Shared builders for kernel tests: random adapters, banks, token slot lists, the float64 reference.

Every test draws a fresh seed (or `MALORA_TEST_SEED` to replay one) and every assertion message
names it. `make_case(...)` returns a `Case`: the packed batch, its `SlotBank`, its `TokenSlots`,
and the float64 reference of the whole heterogeneous batch, computed per slot with
`reference.malora_delta_reference` on the same dtype-rounded inputs the fast path sees.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from malora_runtime.adapters.format import ModuleSpec, ModuleWeights
from malora_runtime.kernels.reference import malora_delta_reference, route
from malora_runtime.kernels.slot_bank import SlotBank
from malora_runtime.kernels.token_slots import NO_SLOT, TokenSlots

# max |out - ref| / max |ref| allowed per input dtype.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}

# Adapters of different d, r, N, top_k, router norms, bias and temperature.
MIXED_SPECS = [
    ModuleSpec(d=8, r=4, num_experts=4, top_k=2, alpha=8.0),
    ModuleSpec(d=16, r=2, num_experts=1, top_k=1, alpha=4.0),  # LoRA: N = 1
    ModuleSpec(d=5, r=3, num_experts=6, top_k=6, alpha=3.0, router_norm="softmax_topk",
               router_temperature=0.7, router_bias=True),  # dense: k = N
    ModuleSpec(d=12, r=8, num_experts=8, top_k=3, alpha=16.0, router_temperature=1.5, router_bias=True),
    ModuleSpec(d=7, r=5, num_experts=5, top_k=2, alpha=5.0, router_norm="softmax_topk"),
]


def make_weights(spec: ModuleSpec, d_in: int, d_out: int, gen: torch.Generator) -> ModuleWeights:
    def randn(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    n = spec.num_experts
    return ModuleWeights(
        spec,
        S=randn(spec.d, d_in, std=d_in**-0.5),
        G=randn(n, d_in, std=2 * d_in**-0.5),
        P=randn(n, spec.r, spec.d, std=spec.d**-0.5),
        B=randn(n, d_out, spec.r, std=spec.r**-0.5),
        router_bias=randn(n, std=0.5) if spec.router_bias else None,
    )


def make_bank(weights: list[ModuleWeights | None], dtype: torch.dtype) -> SlotBank:
    """A bank with one slot per entry (None: inactive slot), each adapter packed in `dtype` on its own."""
    real = [w for w in weights if w is not None]
    bank = SlotBank(real[0].d_in, real[0].d_out, len(weights))
    for slot, w in enumerate(weights):
        if w is not None:
            bank.set_slot(slot, w.to(dtype=dtype))
    return bank


def reference_batch(
    x: torch.Tensor, slots: list[int], weights: list[ModuleWeights | None], dtype: torch.dtype, n_max: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 delta [T, d_out], expected expert counts [num_slots, n_max]) of a heterogeneous batch."""
    x64 = x.double()
    out = torch.zeros(x.shape[0], real_d_out(weights), dtype=torch.float64)
    counts = torch.zeros(len(weights), n_max, dtype=torch.int64)
    for slot in sorted(set(slots) - {NO_SLOT}):
        w = weights[slot]
        if w is None:
            continue
        rows = torch.tensor([i for i, s in enumerate(slots) if s == slot])
        t64 = {name: t.to(dtype).double() for name, t in w.tensors().items()}
        spec = w.spec
        out[rows] = malora_delta_reference(
            x64[rows], t64["S"], t64["G"], t64["P"], t64["B"], spec.scale, spec.top_k,
            t64.get("router_bias"), spec.router_norm, spec.router_temperature,
        )
        logits = x64[rows] @ t64["G"].T + t64.get("router_bias", 0.0)
        chosen, _ = route(logits, spec.top_k, spec.router_norm, spec.router_temperature)
        counts[slot, : spec.num_experts] += torch.bincount(chosen.flatten(), minlength=spec.num_experts)
    return out, counts


def real_d_out(weights: list[ModuleWeights | None]) -> int:
    return next(w for w in weights if w is not None).d_out


@dataclass
class Case:
    seed: int
    dtype: torch.dtype
    x: torch.Tensor  # [T, d_in] in dtype
    slots: list[int]  # [T]
    bank: SlotBank
    token_slots: TokenSlots
    expected: torch.Tensor  # [T, d_out] float64
    expected_counts: torch.Tensor  # [num_slots, n_max] int64

    def poisoned(self) -> torch.Tensor:
        return torch.full(self.expected.shape, float("nan"), dtype=self.dtype)

    def new_counts(self) -> torch.Tensor:
        return torch.zeros_like(self.expected_counts)

    def check(self, out: torch.Tensor, label: str, counts: torch.Tensor | None = None) -> None:
        where = f"[{label}, dtype={self.dtype}, T={len(self.slots)}, seed={self.seed}]"
        assert out.dtype == self.dtype and out.shape == self.expected.shape, where
        assert not torch.isnan(out).any(), f"unwritten (NaN) elements {where}"
        none = torch.tensor([s == NO_SLOT or self.bank.infos[s] is None for s in self.slots])
        assert (out[none] == 0).all(), f"tokens without an adapter got a delta {where}"
        scale = self.expected.abs().max().clamp_min(1e-12)
        error = float((out.double() - self.expected).abs().max() / scale)
        assert error <= TOLERANCE[self.dtype], f"relative error {error:.3g} > {TOLERANCE[self.dtype]} {where}"
        if counts is not None:
            assert torch.equal(counts, self.expected_counts), f"expert_counts differ {where}"


@pytest.fixture
def seed() -> int:
    return int(os.environ.get("MALORA_TEST_SEED", random.randrange(2**31)))


def random_slots(gen: torch.Generator, num_tokens: int, num_slots: int, none_fraction: float) -> list[int]:
    picks = torch.randint(0, num_slots, (num_tokens,), generator=gen).tolist()
    drop = (torch.rand(num_tokens, generator=gen) < none_fraction).tolist()
    return [NO_SLOT if d else s for s, d in zip(picks, drop)]


@pytest.fixture
def make_case(seed: int) -> Callable[..., Case]:
    """make_case(specs, num_tokens | slots=, d_in=37, d_out=45, dtype=float32, ...) -> Case.

    `specs` entries may be None (an inactive slot). `transform(weights, x, gen)` may edit the random
    weights and input in place before the bank is built (for ties). Slots default to random over
    all slots with `none_fraction` of the tokens on the base model.
    """

    def build(
        specs: list[ModuleSpec | None],
        num_tokens: int = 0,
        *,
        slots: list[int] | None = None,
        d_in: int = 37,
        d_out: int = 45,
        dtype: torch.dtype = torch.float32,
        none_fraction: float = 0.15,
        transform: Callable[[list[ModuleWeights | None], torch.Tensor, torch.Generator], None] | None = None,
    ) -> Case:
        gen = torch.Generator().manual_seed(seed)
        weights = [None if s is None else make_weights(s, d_in, d_out, gen) for s in specs]
        if slots is None:
            slots = random_slots(gen, num_tokens, len(specs), none_fraction)
        x = torch.randn(len(slots), d_in, generator=gen)
        if transform is not None:
            transform(weights, x, gen)
        x = x.to(dtype)
        bank = make_bank(weights, dtype)
        expected, counts = reference_batch(x, slots, weights, dtype, bank.maxima[2])
        return Case(seed, dtype, x, slots, bank, TokenSlots.from_list(slots), expected, counts)

    return build


# Every path also gets adapters whose alpha is negative or zero: the delta negated, or none.
SIGNED_ALPHA_SPECS = [
    ModuleSpec(d=8, r=4, num_experts=4, top_k=2, alpha=-8.0),
    ModuleSpec(d=5, r=3, num_experts=6, top_k=6, alpha=-3.0, router_norm="softmax_topk", router_bias=True),
    ModuleSpec(d=16, r=2, num_experts=1, top_k=1, alpha=0.0),
    ModuleSpec(d=12, r=8, num_experts=8, top_k=3, alpha=16.0, router_temperature=1.5, router_bias=True),
]


def random_spec(rng: random.Random) -> ModuleSpec:
    """A random adapter module for fuzzing: N from 1 (LoRA), k up to N (dense), d sometimes above d_in, alpha
    sometimes negative or zero, both router norms, bias, temperature."""
    n = rng.randint(1, 10)
    return ModuleSpec(
        d=rng.randint(1, 40), r=rng.randint(1, 12), num_experts=n, top_k=rng.choice([rng.randint(1, n), n]),
        alpha=rng.choice([rng.uniform(0.5, 16.0), rng.uniform(0.5, 16.0), -rng.uniform(0.5, 16.0), 0.0]),
        router_bias=rng.random() < 0.5, router_norm=rng.choice(["topk_softmax", "softmax_topk"]),
        router_temperature=rng.choice([1.0, rng.uniform(0.3, 2.0)]))


def random_case(make_case: Callable[..., Case], rng: random.Random, max_tokens: int = 150) -> Case:
    """A random batch: 1-6 slots (some inactive), random sizes, a random share of tokens on the base model."""
    specs = [None if rng.random() < 0.15 else random_spec(rng) for _ in range(rng.randint(1, 6))]
    if all(s is None for s in specs):
        specs[0] = MIXED_SPECS[0]
    return make_case(specs, rng.randint(1, max_tokens), d_in=rng.randint(1, 200), d_out=rng.randint(1, 300),
                     none_fraction=rng.random() * 0.5)


def make_mixed_dtype_case(seed: int, num_tokens: int = 80) -> Case:
    """A float32 batch over adapters stored in float32, bfloat16 and float16 in one bank (each read in its own
    dtype, as the CPU tier holds it); the reference uses the same rounded weights, so float32's bound holds."""
    gen = torch.Generator().manual_seed(seed)
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    stored = [make_weights(spec, 37, 45, gen).to(dtype=dtypes[i % 3]) for i, spec in enumerate(MIXED_SPECS)]
    bank = SlotBank(37, 45, len(stored))
    for slot, w in enumerate(stored):
        bank.set_slot(slot, w)
    slots = random_slots(gen, num_tokens, len(stored), none_fraction=0.1)
    x = torch.randn(num_tokens, 37, generator=gen)
    expected, counts = reference_batch(x, slots, [w.to(dtype=torch.float32) for w in stored], torch.float32,
                                       bank.maxima[2])
    return Case(seed, torch.float32, x, slots, bank, TokenSlots.from_list(slots), expected, counts)


def out_of_place(add: Callable[..., None]) -> Callable[..., torch.Tensor]:
    """From add(y, x, bank, token_slots, expert_counts), which adds the delta into y, the form
    f(x, bank, token_slots, out=None, expert_counts=None) -> out, every row written (0: no delta)."""

    def delta(x, bank, token_slots, out=None, expert_counts=None) -> torch.Tensor:
        out = torch.zeros(x.shape[0], bank.d_out, dtype=x.dtype) if out is None else out.zero_()
        add(out, x, bank, token_slots, expert_counts)
        return out

    return delta


def release(case: Case, slot: int) -> None:
    """Release `slot` in the case's bank (stale weights stay) and expect no delta for its tokens."""
    case.bank.deactivate_slot(slot)
    rows = torch.tensor([s == slot for s in case.slots])
    case.expected[rows] = 0.0
    case.expected_counts[slot] = 0


def make_ties(weights: list[ModuleWeights | None], x: torch.Tensor, gen: torch.Generator) -> None:
    """Dyadic x and G (exact in every dtype and summation order), G rows duplicated -> exact ties.

    Every adapter's experts come in groups with identical router rows; the lower index must win.
    """
    x.copy_(torch.randint(-4, 5, x.shape, generator=gen) / 4)
    for w in weights:
        if w is None:
            continue
        n = w.spec.num_experts
        base = torch.randint(-4, 5, (max(1, n // 2), w.d_in), generator=gen) / 4
        w.G.copy_(base[torch.arange(n) % base.shape[0]])
        if w.router_bias is not None:
            w.router_bias.copy_((torch.arange(n) % base.shape[0]) / 8)
