"""Serving in bfloat16: `--dtype auto` picks it only where the hardware computes it natively, and the engine in
bfloat16 (packed bfloat16 linears, bfloat16 KV cache, adapters through the kernel) gives transformers' own
bfloat16 greedy text on the real default model, except at a near-tie."""

from __future__ import annotations

import pytest
import torch

from malora_runtime.adapters.init import random_adapter
from malora_runtime.config import EngineConfig
from malora_runtime.dtype_choice import choose_dtype, cpu_bf16_flags
from malora_runtime.engine.llm_engine import LLMEngine
from malora_runtime.models.loader import load_model
from malora_runtime.models.packed_linear import PackedLinear, pack_linears
from malora_runtime.offline import greedy_generate
from malora_runtime.patching import linear_shapes, set_adapter
from malora_runtime.sampling_params import SamplingParams
from tests.conftest import BF16_PACKING_REFUSAL

pytestmark = pytest.mark.isa  # run again at every lower instruction-set level (tests/isa_levels.py)

PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "Water boils at",
           "The quick brown fox", "SELECT * FROM", "Roses are red,", "My favourite colour is"]
MAX_TOKENS = 10
# bfloat16 keeps 8 significant bits: logits near 20 are 0.125 apart, and a batch's summation order differs
# from a lone request's. A divergence is accepted only where the reference's own top two are this close.
NEAR_TIE = 0.5


@pytest.mark.parametrize(("flags", "expected"), [
    ("fpu sse avx512f avx512_bf16 avx512_vnni", "bfloat16"),
    ("fpu sse avx512f amx_bf16 amx_tile", "bfloat16"),
    ("fpu sse avx2 avx512f avx512_vnni", "float32"),
])
def test_auto_picks_bfloat16_only_with_native_instructions(tmp_path, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    choice = choose_dtype("auto", "cpu", cpuinfo)
    assert choice.name == expected and choice.reason.startswith("auto: ")
    assert choose_dtype("float32", "cpu", cpuinfo).name == "float32"
    assert cpu_bf16_flags(tmp_path / "missing") == []


def test_the_config_resolves_auto_and_says_why():
    config = EngineConfig(dtype="auto")
    assert config.dtype in ("bfloat16", "float32") and config.dtype_reason.startswith("auto: ")
    assert EngineConfig(dtype="bfloat16").dtype_reason == "requested (bfloat16)"
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(dtype="int8")


@pytest.fixture(scope="module")
def bf16_model():
    model, tokenizer, source = load_model(None, dtype=torch.bfloat16)
    pack_linears(model)  # the reference multiplies as the engine does (oneDNN, packed bfloat16)
    return model, tokenizer, source


@pytest.mark.slow
def test_the_default_model_in_bfloat16_matches_generate(bf16_model):
    model, tokenizer, source = bf16_model
    adapter = random_adapter(linear_shapes(model), source.name, ["q_proj", "v_proj"], 4, 8, 16, 2, seed=3,
                             dtype="float16", output_scale=0.3)
    engine_model, _, _ = load_model(None, dtype=torch.bfloat16)
    engine = LLMEngine(engine_model, tokenizer, EngineConfig(dtype="bfloat16"), source.name)
    engine.add_adapter("fp16", adapter)
    # Packed where oneDNN packs bfloat16 (not on an AVX2-only CPU: there torch's matmul, as in the reference).
    assert isinstance(engine_model.model.layers[0].mlp.up_proj, PackedLinear) == (BF16_PACKING_REFUSAL is None)
    assert engine.runner.pool.keys[0].dtype == torch.bfloat16  # the paged KV cache: twice the blocks per byte
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    names = [None if i % 2 == 0 else "fp16" for i in range(len(PROMPTS))]

    def run(indices) -> dict[int, list[int]]:
        for i in indices:
            engine.add_request(f"r{i}", PROMPTS[i], params, names[i])
        got: dict[int, list[int]] = {i: [] for i in indices}
        while engine.has_unfinished():
            for output in engine.step():
                for completion in output.outputs:
                    got[int(output.request_id[1:])] += completion.token_ids
        return got

    expected = {i: greedy_generate(model, tokenizer, tokenizer(p)["input_ids"], adapter if names[i] else None,
                                   MAX_TOKENS, ignore_eos=True) for i, p in enumerate(PROMPTS)}
    def assert_same_up_to_a_near_tie(i: int, tokens: list[int]) -> None:
        if tokens == expected[i]:
            return
        step = next(j for j, (a, b) in enumerate(zip(tokens, expected[i])) if a != b)
        set_adapter(model, adapter if names[i] else None)
        try:
            with torch.inference_mode():
                ids = tokenizer(PROMPTS[i])["input_ids"] + expected[i][:step]
                logits = model(torch.tensor([ids])).logits[0, -1].float()
        finally:
            set_adapter(model, None)
        gap = float(logits.max() - logits[tokens[step]])
        assert gap <= NEAR_TIE, f"{PROMPTS[i]!r} on {names[i]}: diverges at token {step} with a logit gap of {gap:.3g}"

    # Alone on the base model through transformers' forward (the reference decode path), the engine multiplies as
    # generate does: the very same tokens. Through the fast decode path (the default; its GEMV sums in another
    # order) and batched, with an fp16 adapter (computed in float32 by the kernel, where the reference layer
    # computes it in bfloat16) on half of them: the same tokens up to a near-tie.
    fast_decoder = engine.runner.fast_decoder
    assert fast_decoder is not None
    for i in range(0, len(PROMPTS), 2):
        engine.runner.fast_decoder = None
        assert run([i])[i] == expected[i], f"{PROMPTS[i]!r} alone on the base model"
        engine.runner.fast_decoder = fast_decoder
        assert_same_up_to_a_near_tie(i, run([i])[i])
    for i, tokens in run(range(len(PROMPTS))).items():
        assert_same_up_to_a_near_tie(i, tokens)


@pytest.mark.slow
def test_the_default_model_is_cached_in_the_dtype_it_is_served_in():
    """One converted copy per dtype: bfloat16's is half the bytes and holds exactly float32's weights rounded once."""
    from safetensors.torch import load_file

    from malora_runtime.models.loader import materialize, resolve_model

    source = resolve_model(None)
    float32_dir, bfloat16_dir = materialize(source, torch.float32), materialize(source, torch.bfloat16)
    assert float32_dir != bfloat16_dir

    def weights(directory) -> dict[str, torch.Tensor]:
        return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}

    full, half = weights(float32_dir), weights(bfloat16_dir)
    assert full.keys() == half.keys() and {t.dtype for t in half.values()} == {torch.bfloat16}
    assert all(torch.equal(half[k], full[k].to(torch.bfloat16)) for k in full)
    disk = [sum(f.stat().st_size for f in d.glob("*.safetensors")) for d in (float32_dir, bfloat16_dir)]
    assert 0.45 < disk[1] / disk[0] < 0.55, disk
