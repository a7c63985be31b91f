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


def write_molora(directory: Path, model, targets: list[str], n: int, r: int, top_k: int) -> dict:
    """A random mixture of LoRA experts in the documented MoLoRA layout; returns its tensors."""
    directory.mkdir()
    tensors = {}
    for path, (d_in, d_out) in linear_shapes(model).items():
        if path.rsplit(".", 1)[-1] in targets:
            tensors[f"{path}.A"] = torch.randn(n, r, d_in) * 0.2
            tensors[f"{path}.B"] = torch.randn(n, d_out, r) * 0.2
            tensors[f"{path}.router"] = torch.randn(n, d_in)
    save_file(tensors, str(directory / MOLORA_WEIGHTS))
    config = {"format": "molora", "base_model": "tiny", "target_modules": targets,
              "modules": {t: {"r": r, "num_experts": n, "top_k": top_k, "alpha": 2.0 * r} for t in targets}}
    (directory / MOLORA_CONFIG).write_text(json.dumps(config))
    return tensors


def molora_delta(x, A, B, router, top_k, scale):
    """The mixture of LoRA experts computed directly from its own A_t (no shared subspace)."""
    chosen, weights = route(x @ router.T, top_k)
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
