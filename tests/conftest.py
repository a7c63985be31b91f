"""Shared fixtures: a tiny random Llama (fast), the real default model (loaded once), adapters."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

# No GPU here: Triton kernels are tested on the CPU by its interpreter. The mode is read when triton
# is first imported (transformers and peft may import it), so it is set before anything else loads.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Servers started by the tests remember runtime unloads here, not in the user's cache (it outlives the run).
os.environ.setdefault("MALORA_STATE_DIR", tempfile.mkdtemp(prefix="malora-test-state-"))

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent


def _native_kernel_missing() -> bool:
    from malora_runtime.kernels.native import native_kernel

    return native_kernel() is None


# For tests of the native CPU kernel: skipped, with the reason shown, where no C++ compiler can build it
# (the server then serves with the torch CPU path, which its own tests cover).
requires_native = pytest.mark.skipif(_native_kernel_missing(), reason="the native kernel cannot be built here")


def _bf16_packing_refusal() -> str | None:
    from malora_runtime.models.packed_linear import packing_refusal

    return packing_refusal(torch.bfloat16)


# For tests of the packed bfloat16 products (and `--quantization int8`, built on them): skipped, with oneDNN's own
# reason, on a CPU where oneDNN does not pack bfloat16 (AVX2-only, or under MALORA_MAX_ISA=avx2); the refusal
# itself is tested there.
BF16_PACKING_REFUSAL = _bf16_packing_refusal()
requires_bf16_packing = pytest.mark.skipif(BF16_PACKING_REFUSAL is not None,
                                           reason=f"oneDNN does not pack bfloat16 on this CPU: {BF16_PACKING_REFUSAL}")


def _native_bf16_missing() -> bool:
    from malora_runtime.cpu_features import cpu_features

    return not cpu_features().native_bfloat16


# For tests of what only a CPU with native bfloat16 does (AVX512_BF16 / AMX: `--dtype auto` picks bfloat16, the
# native bfloat16 dot products): skipped elsewhere, with the reason.
requires_native_bf16 = pytest.mark.skipif(_native_bf16_missing(),
                                          reason="the CPU (or its MALORA_MAX_ISA cap) has no native bfloat16")


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """For offline references generated one token at a time: batch-1 products are too small to share, and two
    OpenMP threads on a CPU whose other core is busy (a server under test, another process) wait on each other at
    every product, 5-10x slower than one thread here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def make_tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    tie_word_embeddings=False)
    settings.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**settings)).to(dtype)
    model.eval()
    model.requires_grad_(False)
    return model


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture(scope="session")
def default_model():
    """(model, tokenizer, source) of the real SmolLM2-135M-Instruct, float32, converted once and cached."""
    from malora_runtime.models.loader import load_model

    return load_model(None)


@pytest.fixture(scope="session")
def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT)
    return env
