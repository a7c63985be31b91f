"""Engine configuration: one dataclass, checked when built."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cpu_features import cpu_features
from .dtype_choice import choose_dtype

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZATIONS = ("gguf", "int8")


@dataclass(slots=True)
class EngineConfig:
    model: str | None = None
    """Base model: None for the default (SmolLM2-135M-Instruct), a HF directory or a .gguf file."""
    dtype: str = "float32"
    """float32, bfloat16, float16, or auto (`dtype_choice.choose_dtype`: bfloat16 where the hardware has it),
    resolved when the config is built."""
    device: str = "cpu"
    block_size: int = 16
    """Tokens per KV cache block."""
    kv_cache_memory: int = 1 << 30
    """Bytes for the KV block pool (keys and values of every layer)."""
    num_kv_blocks: int | None = None
    """Exact number of KV blocks, overriding `kv_cache_memory` (for tests and tuning)."""
    max_num_seqs: int = 64
    """Most sequences in one step."""
    max_num_batched_tokens: int = 2048
    """Most tokens (prefill chunks plus decodes) in one step."""
    max_model_len: int | None = None
    """Longest prompt plus output; defaults to the model's context length."""
    max_loaded_adapters: int = 32
    """Adapter slots in the batched weight tensors."""
    adapter_bank_memory: int | None = 8 << 30
    """Bytes of adapters in slots at most (None: no limit): least recently used idle ones are evicted to make room;
    an adapter larger than the whole budget is refused."""
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    """A long prompt is computed over several steps (decodes are never stalled behind it)."""
    count_expert_routing: bool = True
    """Accumulate per-expert token counts for metrics (cheap, on the device)."""
    keep_freed_memory: bool = True
    """On CPU with glibc, serve large tensors from the heap and keep freed memory for reuse (no page
    faults on every prefill's fresh activations; 18% faster prefill; process-wide, see engine.allocator)."""
    dtype_reason: str = ""
    """Why `dtype` is what it is (set when the config is built; logged at start and shown by /version)."""
    pack_cpu_linears: bool = True
    """On CPU in float32 or bfloat16, run the base linears through oneDNN on pre-packed weights (2.2-2.7x faster
    than torch's default matmul here; one more copy of the linear weights in memory)."""
    quantization: str | None = None
    """"gguf": a GGUF model's quantized tensors served as stored, through the block kernels (models.gguf_blocks);
    "int8": weight-only int8 copies of the packed base linears for one-row decode (models.quantized_linear; needs
    the packed CPU linears); None: float weights (a GGUF file de-quantized once)."""
    fast_decode: bool = True
    """Steps of single-token chunks of a Llama-style model on CPU run through the native decode path
    (models.fast_decode: one native call per small op of a layer) where the start-up probe finds it agrees with
    transformers' forward, which stays the reference and the path for prefills; False: always transformers'."""

    def __post_init__(self) -> None:
        if self.dtype not in (*DTYPES, "auto"):
            raise ValueError(f"dtype must be one of {sorted(DTYPES)} or auto, got {self.dtype!r}")
        if torch.device(self.device).type == "cpu":
            cpu_features()  # a MALORA_MAX_ISA naming no level of this CPU is refused here, with the levels
        if self.dtype == "auto" or not self.dtype_reason:
            choice = choose_dtype(self.dtype, self.device)
            self.dtype, self.dtype_reason = choice.name, choice.reason
        for name in ("block_size", "kv_cache_memory", "max_num_seqs", "max_num_batched_tokens",
                     "max_loaded_adapters"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.adapter_bank_memory is not None and self.adapter_bank_memory < 1:
            raise ValueError(f"adapter_bank_memory must be >= 1, got {self.adapter_bank_memory}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)} or None, got "
                             f"{self.quantization!r}")
        if self.quantization == "gguf" and torch.device(self.device).type != "cpu":
            raise ValueError("--quantization gguf runs the CPU block kernels: it needs --device cpu")
        if self.quantization == "gguf" and self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"--quantization gguf computes in float32 or bfloat16, not {self.dtype}")
        if self.quantization == "int8" and not self.pack_cpu_linears:
            raise ValueError("quantization needs the packed CPU linears (pack_cpu_linears)")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]
