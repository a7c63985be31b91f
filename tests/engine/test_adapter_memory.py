"""Adapters in slots cost their own bytes: no padding to other adapters' shapes, no per-slot reservation, no copy
on the CPU; a byte budget evicts least recently used idle adapters; nothing leaks (tiny model)."""

from __future__ import annotations

import contextlib
import gc
import random
import weakref

import pytest

from malora_runtime.adapters.init import random_adapter
from malora_runtime.config import EngineConfig
from malora_runtime.engine.adapter_slots import NoFreeSlotError
from malora_runtime.engine.errors import SlotMemoryError
from malora_runtime.engine.llm_engine import LLMEngine
from malora_runtime.kernels.dispatch import BACKEND_ENV
from malora_runtime.kernels.packed import TAIL, pack_adapter
from malora_runtime.patching import linear_shapes
from malora_runtime.sampling_params import SamplingParams
from tests.conftest import make_tiny_llama

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The four shapes, scaled to the tiny model: (targets, N, r, d, dtype).
SHAPES = {
    "alpha": (["q_proj", "k_proj", "v_proj", "o_proj"], 4, 8, 16, "float16"),
    "beta": (["q_proj", "v_proj"], 8, 4, 32, "bfloat16"),
    "gamma": (ALL, 1, 16, 16, "float32"),
    "delta": (["gate_proj", "up_proj", "down_proj"], 6, 8, 24, "float16"),
}


class Tokenizer:  # the engine only decodes; these tests read token ids
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True) -> str:
        return " ".join(map(str, ids))


def make_adapter(name: str, seed: int = 0):
    targets, n, r, d, dtype = SHAPES[name]
    return random_adapter(linear_shapes(make_tiny_llama()), "tiny", targets, n, r, d, min(2, n), seed=seed,
                          dtype=dtype)


def tensor_bytes(adapter) -> int:
    """The adapter's own bytes: its tensors as the file holds them."""
    return sum(t.numel() * t.element_size() for w in adapter.modules.values() for t in w.tensors().values())


def engine(slots: int = 8, budget: int | None = None) -> LLMEngine:
    config = EngineConfig(max_loaded_adapters=slots, num_kv_blocks=64, block_size=4, max_model_len=64,
                          adapter_bank_memory=budget)
    return LLMEngine(make_tiny_llama(), Tokenizer(), config, "tiny")


def run(core: LLMEngine, requests: dict[str, str | None], tokens: int = 3) -> dict[str, list[int]]:
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    for request_id, adapter in requests.items():
        core.add_request(request_id, [1, 2, 3, 4, 5], params, adapter)
    out: dict[str, list[int]] = {r: [] for r in requests}
    while core.has_unfinished():
        for output in core.step():
            assert output.error is None, output.error
            out[output.request_id] += [t for c in output.outputs for t in c.token_ids]
    return out


def bank_table_bytes(core: LLMEngine) -> int:
    banks = [layer.bank for layer in core.runner.adapters.layers().values() if layer.bank is not None]
    return sum(a.nbytes for b in banks for a in (b.tables.addresses, b.tables.meta, b.tables.fmeta))


@pytest.mark.parametrize("backend", ["native", "cpu", "reference"])
def test_mixed_shapes_cost_their_own_bytes(monkeypatch, backend):
    """Four adapters of different shapes and dtypes, all active and all in one batch: the slots hold exactly
    the adapters' packed buffers (their tensors, plus per module a 16-element tail and, without a router
    bias, N zeros), the banks copy nothing, and a step with each kernel backend adds nothing to either."""
    monkeypatch.setenv(BACKEND_ENV, backend)
    core = engine()
    adapters = {name: pack_adapter(make_adapter(name)) for name in SHAPES}
    for name, adapter in adapters.items():
        core.add_adapter(name, adapter)
    slots = core.runner.adapters
    own = sum(tensor_bytes(a) for a in adapters.values())
    tails = sum((TAIL + (0 if w.router_bias is not None else w.spec.num_experts)) * w.packed.buffer.element_size()
                for a in adapters.values() for w in a.modules.values())
    assert slots.active_bytes == own + tails and tails < 0.01 * own
    for layer in slots.layers().values():
        for slot, module in enumerate(layer.bank.modules):
            if module is not None:  # the very buffer the adapter (the host tier) holds
                state = slots.slots[slot]
                assert module is state.adapter.modules[layer.path].packed
    run(core, {name: name for name in SHAPES} | {"base": None})
    assert slots.device_copy_bytes == 0 and slots.active_bytes == own + tails


def test_slots_cost_nothing_until_loaded():
    """Hundreds of slots: a bank holds a 64-byte table row per slot, whatever the adapters' sizes."""
    core = engine(slots=512)
    core.add_adapter("gamma", make_adapter("gamma"))
    modules = len(core.runner.adapters.layers())
    assert bank_table_bytes(core) == modules * 512 * (4 * 8 + 5 * 4 + 3 * 4)


def test_many_adapters_share_one_batch_and_match_running_alone():
    """40 distinct adapters of mixed shapes in one batch give each request the tokens it gets alone."""
    names = list(SHAPES)
    adapters = {f"a{i}": make_adapter(names[i % 4], seed=i) for i in range(40)}
    together = engine(slots=64)
    for name, adapter in adapters.items():
        together.add_adapter(name, adapter)
    batched = run(together, {name: name for name in adapters})
    alone = engine(slots=1)
    for name in list(adapters)[::7]:
        alone.add_adapter(name, adapters[name])
        assert run(alone, {name: name})[name] == batched[name], name
        alone.remove_adapter(name)


def test_the_budget_evicts_least_recently_used_idle_adapters():
    """A byte budget for two adapters: a third evicts the least recently used idle one (pinned ones stay); one
    larger than the whole budget is refused; one that fits only once running requests end waits for them."""
    small = [pack_adapter(make_adapter("alpha", seed=i)) for i in range(4)]
    size = small[0].num_bytes()
    core = engine(slots=8, budget=2 * size + size // 2)
    core.add_adapter("a0", small[0], pinned=True)
    core.add_adapter("a1", small[1])
    core.add_adapter("a2", small[2])  # evicts a1 (idle, unpinned), not a0 (pinned)
    slots = core.runner.adapters
    assert set(slots.current) == {"a0", "a2"} and slots.num_evictions == 1
    assert slots.active_bytes <= core.config.adapter_bank_memory
    with pytest.raises(SlotMemoryError, match="--adapter-bank-memory"):
        core.add_adapter("delta", _huge(size))
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    core.add_request("busy", [1, 2, 3], params, "a2")  # a2 in use, a0 pinned: no room for a3
    with pytest.raises(NoFreeSlotError, match="in use"):
        core.add_adapter("a3", small[3])
    while core.has_unfinished():
        core.step()
    core.add_adapter("a3", small[3])  # a2 is idle now
    assert set(slots.current) == {"a0", "a3"} and slots.active_bytes <= core.config.adapter_bank_memory


def test_evictions_before_a_refusal_still_drop_their_cached_blocks(monkeypatch):
    """An activation that evicts an idle adapter and then finds the rest in use gives up (the request waits),
    but the evicted activation's prefix-cache blocks are forgotten all the same."""
    small = [pack_adapter(make_adapter("alpha", seed=i)) for i in range(2)]
    size = small[0].num_bytes()
    big = pack_adapter(_huge(size))
    core = engine(slots=8, budget=big.num_bytes() + size // 2)
    core.add_adapter("a0", small[0])
    core.add_adapter("a1", small[1])
    a0_key = core.runner.adapters.slots[core.runner.adapters.current["a0"]].cache_key
    core.add_request("busy", [1, 2, 3], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True), "a1")
    forgotten: list[int] = []
    monkeypatch.setattr(core.scheduler.block_manager, "drop_adapter", forgotten.append)
    with pytest.raises(NoFreeSlotError):
        core.add_adapter("big", big)  # evicts idle a0, then a1 (in use) still leaves no room
    assert "a0" not in core.runner.adapters.current and forgotten == [a0_key]


def _huge(size: int):
    adapter = random_adapter(linear_shapes(make_tiny_llama()), "tiny", ALL, 8, 16, 32, 2, seed=0, dtype="float32")
    assert adapter.num_bytes() > 3 * size
    return adapter


def test_load_unload_reload_in_any_order_leaks_nothing():
    """A random sequence of activations, new versions, unloads and requests; at the end, with every adapter
    unloaded and every request done, no bank holds a module and no adapter object is alive."""
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    core = engine(slots=3, budget=None)
    alive: list[weakref.ref] = []
    version = 0
    for step in range(60):
        name = f"a{rng.randrange(5)}"
        action = rng.random()
        slots = core.runner.adapters
        if action < 0.5:
            version += 1
            adapter = make_adapter(rng.choice(list(SHAPES)), seed=version)
            alive.append(weakref.ref(adapter))
            with contextlib.suppress(NoFreeSlotError):  # every slot busy: the adapter is simply not activated
                core.add_adapter(name, adapter, version)
            del adapter
        elif action < 0.7 and name in slots.current:
            core.remove_adapter(name)
        elif name in slots.current:
            core.add_request(f"r{step}", [1, 2, 3], SamplingParams(max_tokens=rng.randint(1, 4), temperature=0.0,
                                                                    ignore_eos=True), name)
        if rng.random() < 0.5 and core.has_unfinished():
            core.step()
    while core.has_unfinished():
        core.step()
    for name in list(core.runner.adapters.current):
        core.remove_adapter(name)
    slots = core.runner.adapters
    assert slots.active_bytes == 0 and all(state is None for state in slots.slots), f"seed {seed}"
    for layer in slots.layers().values():
        assert all(m is None for m in layer.bank.modules) and not layer.bank.tables.addresses.any()
    gc.collect()
    leaked = [ref() for ref in alive if ref() is not None]
    assert not leaked, f"{len(leaked)} adapters still alive (seed {seed})"
