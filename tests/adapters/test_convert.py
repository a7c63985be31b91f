"""Conversions: PEFT LoRA exactly, MoLoRA by SVD (exact at d = N r, energy < 1 below)."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from malora_runtime.adapters import load_adapter
from malora_runtime.adapters.convert import MOLORA_CONFIG, MOLORA_WEIGHTS, molora_to_malora
from malora_runtime.kernels.reference import route
from malora_runtime.patching import linear_shapes, set_adapter
from tests.conftest import requires_native

# The default model's PEFT check also runs on a GPU with MALORA_TEST_DEVICE=cuda (scripts/gpu-check.sh).
DEVICE = os.environ.get("MALORA_TEST_DEVICE", "cpu")


def make_peft_adapter(model, directory: Path, targets: list[str], rank: int, alpha: float, **extra) -> Path:
    """A PEFT LoRA adapter with random non-zero A and B (PEFT initialises B to zero)."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=rank, lora_alpha=alpha,
                                                                 target_modules=targets, **extra))
    generator = torch.Generator().manual_seed(int(torch.seed() % 2**31))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    peft_model.save_pretrained(directory)
    return directory


def peft_logits(model, directory: Path, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), directory)
    peft_model.eval()
    with torch.no_grad():
        return peft_model(ids).logits


@torch.no_grad()
def malora_logits(model, adapter, ids: torch.Tensor) -> torch.Tensor:
    set_adapter(model, adapter)
    try:
        return model(ids).logits
    finally:
        set_adapter(model, None)


@pytest.mark.parametrize("extra", [{}, {"use_rslora": True}])
def test_peft_lora_matches_peft_logits_on_a_tiny_llama(tiny_llama, tmp_path: Path, extra: dict) -> None:
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    directory = make_peft_adapter(tiny_llama, tmp_path / "peft", targets, rank=4, alpha=8, **extra)
    ids = torch.randint(0, 256, (2, 12))
    expected = peft_logits(tiny_llama, directory, ids)
    adapter = load_adapter(directory, linear_shapes(tiny_llama))
    got = malora_logits(tiny_llama, adapter, ids)
    assert (expected - tiny_llama(ids).logits).abs().max() > 1e-3, "the adapter must change the logits"
    assert (got - expected).abs().max().item() <= PEFT_TOLERANCE[torch.float32]


def test_peft_lora_matches_peft_logits_on_the_default_model(default_model, tmp_path: Path) -> None:
    model, tokenizer, _ = default_model
    if DEVICE != "cpu":
        if not torch.cuda.is_available():
            pytest.skip(f"MALORA_TEST_DEVICE={DEVICE}: no GPU here")
        model = copy.deepcopy(model).to(DEVICE)  # the session's model stays on the CPU
    directory = make_peft_adapter(model, tmp_path / "peft", ["q_proj", "v_proj"], rank=8, alpha=16)
    ids = torch.tensor([tokenizer("The quick brown fox jumps over the lazy dog")["input_ids"]], device=DEVICE)
    expected = peft_logits(model, directory, ids)
    got = malora_logits(model, load_adapter(directory, linear_shapes(model)), ids)
    assert (got - expected).abs().max().item() <= PEFT_TOLERANCE[torch.float32]


# bfloat16 logits of the default model are ~20 and keep 8 significant bits (a step of 0.125 there): PEFT's own
# bfloat16 logits measured 0.44-1.02 (max abs) from its float32 ones, and ours 0.31-1.06 from PEFT's bfloat16 (1.06
# in one run of six: 1.0 was too tight), while the adapters changed the logits by 4.4-7.8. The bound holds ours
# within rounding of PEFT's, and the adapter's effect must be at least twice the bound.
PEFT_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1.5}


def test_peft_lora_matches_peft_logits_in_bfloat16(default_model, tmp_path: Path) -> None:
    """The converted adapter in bfloat16 (the reference layer, and the engine: bfloat16 base, float32 delta in the
    kernel) against PEFT's own bfloat16 outputs."""
    from malora_runtime.config import EngineConfig
    from malora_runtime.engine.llm_engine import LLMEngine
    from malora_runtime.engine.model_runner import Chunk
    from malora_runtime.models.loader import load_model

    _, tokenizer, _ = default_model
    model, _, _ = load_model(None, dtype=torch.bfloat16)  # unwrapped: the session's model may carry our layers
    directory = make_peft_adapter(model, tmp_path / "peft", ["q_proj", "v_proj", "down_proj"], rank=8, alpha=16)
    texts = ["The quick brown fox jumps over the lazy dog", "def fibonacci(n): return", "Paris is the capital of"]
    ids = [torch.tensor([tokenizer(t)["input_ids"]]) for t in texts]
    expected = [peft_logits(model, directory, i)[0, -1].float() for i in ids]  # before our layers wrap the model
    base = [model(i).logits[0, -1].float() for i in ids]
    adapter = load_adapter(directory, linear_shapes(model))
    engine = LLMEngine(load_model(None, dtype=torch.bfloat16)[0], tokenizer, EngineConfig(dtype="bfloat16",
                                                                                          num_kv_blocks=64))
    slot = engine.add_adapter("peft", adapter)
    tolerance = PEFT_TOLERANCE[torch.bfloat16]
    for text, i, want, plain in zip(texts, ids, expected, base, strict=True):
        assert (want - plain).abs().max() > 2 * tolerance, "the adapter must change the logits well beyond the bound"
        reference = malora_logits(model, adapter, i)[0, -1].float()
        served = engine.runner.run([Chunk(i[0].tolist(), 0, [0, 1], slot, True)])[0]
        for got in (reference, served):
            assert (got - want).abs().max().item() <= tolerance, text
            assert want[got.argmax()] >= want.max() - tolerance, text  # the same top token, up to a near-tie


def test_cli_converts_peft_and_the_result_loads(tiny_llama, tmp_path: Path, cli_env) -> None:
    directory = make_peft_adapter(tiny_llama, tmp_path / "peft", ["q_proj", "v_proj"], rank=4, alpha=8)
    out = tmp_path / "malora"
    run = subprocess.run([sys.executable, "-m", "clients.cli", "convert", "peft-lora", str(directory), str(out)],
                         capture_output=True, text=True, env=cli_env, timeout=120)
    assert run.returncode == 0, run.stderr
    converted = load_adapter(out, linear_shapes(tiny_llama))
    ids = torch.randint(0, 256, (1, 9))
    expected = peft_logits(tiny_llama, directory, ids)
    torch.testing.assert_close(malora_logits(tiny_llama, converted, ids), expected, rtol=0, atol=1e-5)


def write_molora(directory: Path, model, targets: list[str], n: int, r: int, top_k: int, stack_rank: int | None = None,
                 **router: object) -> dict:
    """A random mixture of LoRA experts in the documented MoLoRA layout; returns its tensors. `stack_rank`: the
    experts' stacked A [N r, d_in] has that rank; `router`: router_bias, router_norm, router_temperature."""
    directory.mkdir()
    tensors = {}
    for path, (d_in, d_out) in linear_shapes(model).items():
        if path.rsplit(".", 1)[-1] in targets:
            a = torch.randn(n * r, d_in) * 0.2
            if stack_rank is not None:
                a = (torch.randn(n * r, stack_rank) @ torch.randn(stack_rank, d_in)) * 0.05
            tensors[f"{path}.A"] = a.reshape(n, r, d_in).contiguous()
            tensors[f"{path}.B"] = torch.randn(n, d_out, r) * 0.2
            tensors[f"{path}.router"] = torch.randn(n, d_in)
            if router.get("router_bias"):
                tensors[f"{path}.router_bias"] = torch.randn(n)
    save_file(tensors, str(directory / MOLORA_WEIGHTS))
    config = {"format": "molora", "base_model": "tiny", "target_modules": targets,
              "modules": {t: {"r": r, "num_experts": n, "top_k": top_k, "alpha": 2.0 * r, **router}
                          for t in targets}}
    (directory / MOLORA_CONFIG).write_text(json.dumps(config))
    return tensors


def molora_delta(x, A, B, router, top_k, scale, bias=None, norm="topk_softmax", temperature=1.0):
    """The mixture of LoRA experts computed directly from its own A_t (no shared subspace)."""
    chosen, weights = route(x @ router.T + (0.0 if bias is None else bias), top_k, norm, temperature)
    out = torch.zeros(x.shape[0], B.shape[1], dtype=x.dtype)
    for i in range(x.shape[0]):
        for j in range(top_k):
            t = int(chosen[i, j])
            out[i] += weights[i, j] * (B[t] @ (A[t] @ x[i]))
    return scale * out


def test_molora_with_full_subspace_reproduces_its_own_outputs(tiny_llama, tmp_path: Path) -> None:
    n, r, k = 3, 4, 2
    tensors = write_molora(tmp_path / "molora", tiny_llama, ["q_proj", "up_proj"], n, r, k)
    adapter, energies = molora_to_malora(tmp_path / "molora", subspace_rank=n * r)
    assert all(e == pytest.approx(1.0, abs=1e-12) for e in energies.values())
    for path, weights in adapter.modules.items():
        x = torch.randn(6, weights.d_in, dtype=torch.float64)
        A, B, router = (tensors[f"{path}.{n}"].double() for n in ("A", "B", "router"))
        expected = molora_delta(x, A, B, router, k, scale=2.0)
        w = weights.to(dtype=torch.float64)
        got = molora_delta(x, torch.einsum("nrd,di->nri", w.P, w.S), w.B, w.G, k, scale=w.spec.scale)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_molora_cli_with_small_subspace_reports_energy_below_one(tiny_llama, tmp_path: Path, cli_env) -> None:
    write_molora(tmp_path / "molora", tiny_llama, ["v_proj"], n=4, r=4, top_k=2)
    out = tmp_path / "malora"
    run = subprocess.run([sys.executable, "-m", "clients.cli", "convert", "molora", str(tmp_path / "molora"),
                          str(out), "--subspace-rank", "3"], capture_output=True, text=True, env=cli_env,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    energies = [float(v) for v in re.findall(r"energy kept ([0-9.]+)", run.stdout)]
    assert len(energies) == 2 + 1  # two layers, then the minimum
    assert all(0 < e < 1 for e in energies)
    loaded = load_adapter(out, linear_shapes(tiny_llama))
    assert loaded.config.modules["v_proj"].d == 3


def served_delta(weights, x: torch.Tensor, path: str) -> torch.Tensor:
    """The delta of one converted module through a serving kernel (`path`: torch or native), float32."""
    from malora_runtime.kernels.cpu import malora_delta_cpu
    from malora_runtime.kernels.native import add_malora_delta_native
    from malora_runtime.kernels.token_slots import TokenSlots
    from tests.kernels.conftest import make_bank, out_of_place

    bank = make_bank([weights], torch.float32)
    kernel = malora_delta_cpu if path == "torch" else out_of_place(add_malora_delta_native)
    return kernel(x.float(), bank, TokenSlots.from_list([0] * x.shape[0])).double()


def molora_reference(tensors: dict, path: str, x: torch.Tensor, spec) -> torch.Tensor:
    A, B, router = (tensors[f"{path}.{name}"].double() for name in ("A", "B", "router"))
    bias = tensors.get(f"{path}.router_bias")
    return molora_delta(x, A, B, router, spec.top_k, spec.scale, None if bias is None else bias.double(),
                        spec.router_norm, spec.router_temperature)


@pytest.mark.parametrize("kernel", ["torch", pytest.param("native", marks=requires_native)])
@pytest.mark.parametrize("case", ["full subspace d = N r", "low-rank stack, d = its rank"])
def test_molora_converts_exactly_through_the_serving_kernels(tiny_llama, tmp_path: Path, kernel, case) -> None:
    """At d = N r, or at d = rank of the stacked A below N r, the converted adapter's served delta is the
    mixture's own (float32 kernel against the float64 mixture), with router bias and softmax_topk carried."""
    n, r, k = 4, 3, 2
    low_rank = case.startswith("low")
    tensors = write_molora(tmp_path / "molora", tiny_llama, ["q_proj", "down_proj"], n, r, k,
                           stack_rank=5 if low_rank else None, router_bias=True, router_norm="softmax_topk",
                           router_temperature=0.7)
    d = 5 if low_rank else n * r
    adapter, energies = molora_to_malora(tmp_path / "molora", subspace_rank=d)
    assert all(e == pytest.approx(1.0, abs=1e-9) for e in energies.values())
    for path, weights in adapter.modules.items():
        spec = weights.spec
        assert (spec.d, spec.router_norm, spec.router_temperature, spec.router_bias) == (d, "softmax_topk", 0.7, True)
        x = torch.randn(9, weights.d_in, dtype=torch.float64)
        expected = molora_reference(tensors, path, x.float().double(), spec)
        got = served_delta(weights, x, kernel)
        error = float((got - expected).abs().max() / expected.abs().max())
        assert error < 1e-5, (path, error)


def test_the_delta_error_is_bounded_by_the_discarded_singular_values(tiny_llama, tmp_path: Path) -> None:
    """With d below the stack's rank, per token |delta' - delta| <= scale * max_t |B_t|_2 * sigma_{d+1} * |x|:
    each A_t (I - V_d V_d^T) is a block of the stack's residual, whose norm is sigma_{d+1}, and the routing
    weights of a token sum to at most 1."""
    from malora_runtime.adapters.convert import read_molora

    n, r, k, d = 4, 4, 2, 6
    tensors = write_molora(tmp_path / "molora", tiny_llama, ["v_proj"], n, r, k)
    adapter, energies = molora_to_malora(tmp_path / "molora", subspace_rank=d)
    _, modules = read_molora(tmp_path / "molora")
    for path, weights in adapter.modules.items():
        stack = modules[path].A.reshape(n * r, -1).double()
        sigma = torch.linalg.svdvals(stack)
        b_norm = max(float(torch.linalg.matrix_norm(b.double(), ord=2)) for b in modules[path].B)
        x = torch.randn(64, weights.d_in, dtype=torch.float64)
        w = weights.to(dtype=torch.float64)
        exact = molora_reference(tensors, path, x, w.spec)
        got = molora_delta(x, torch.einsum("nrd,di->nri", w.P, w.S), w.B, w.G, k, w.spec.scale)
        error = (got - exact).norm(dim=-1)
        bound = w.spec.scale * b_norm * float(sigma[d]) * x.norm(dim=-1)
        assert energies[path] < 1 and error.max() > 0
        assert (error <= bound * (1 + 1e-9)).all(), float((error / bound).max())


def test_a_converted_adapter_with_router_bias_and_softmax_topk_saves_and_reloads(tiny_llama, tmp_path: Path):
    from malora_runtime.adapters import save_adapter

    tensors = write_molora(tmp_path / "molora", tiny_llama, ["o_proj"], 3, 2, 3, router_bias=True,
                           router_norm="softmax_topk", router_temperature=1.5)
    adapter, _ = molora_to_malora(tmp_path / "molora", subspace_rank=6)
    save_adapter(adapter, tmp_path / "malora")
    loaded = load_adapter(tmp_path / "malora", linear_shapes(tiny_llama))
    for path, weights in loaded.modules.items():
        spec = weights.spec
        assert (spec.router_norm, spec.router_temperature, spec.router_bias, spec.top_k) == ("softmax_topk", 1.5,
                                                                                             True, 3)
        torch.testing.assert_close(weights.router_bias.float(), tensors[f"{path}.router_bias"])
        x = torch.randn(5, weights.d_in, dtype=torch.float64)
        w = weights.to(dtype=torch.float64)
        got = molora_delta(x, torch.einsum("nrd,di->nri", w.P, w.S), w.B, w.G, 3, spec.scale, w.router_bias,
                           "softmax_topk", 1.5)
        torch.testing.assert_close(got, molora_reference(tensors, path, x, spec), rtol=1e-4, atol=1e-5)
