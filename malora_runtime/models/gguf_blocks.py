"""Load a GGUF model with its quantized tensors kept as stored: the default for GGUF files (`--quantization gguf`).

The file is memory-mapped; every tensor in a block format the native kernels read (`block_ops.FORMATS`: Q4_0, Q4_1,
Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) becomes a `BlockLinear` (or `BlockEmbedding`) over the file's bytes, so the
base model costs its file size in memory, not a float copy 4-8x larger, and a decode step reads that much. Float
tensors (norms, biases, an F16 output head) are loaded as usual in the served dtype.

transformers stays the reference for everything else: the config and tokenizer are its GGUF parsing (cached next
to the float conversions after the first start), the modules are its modeling code built on the meta device, the
names its GGUF name map, and its per-architecture tensor processing is applied to the blocks where it is a
permutation of output rows (Llama's q/k rotary layout) and refused otherwise (the model is then served from the
float conversion).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..cache import cache_root
from ..kernels.native.block_ops import FORMATS, BlockWeight
from .block_linear import BlockEmbedding, BlockLinear
from .loader import CACHE_LAYOUT_VERSION, ModelSource

log = logging.getLogger(__name__)

FLOAT_TYPES = ("F32", "F16", "BF16")


class BlockModelError(ValueError):
    """This GGUF file cannot be served from its blocks (a format or layout the kernels do not read)."""


@dataclass(frozen=True)
class BlockModelInfo:
    """What a block-served model holds: formats by tensor count, and the bytes of its block weights."""

    formats: dict[str, int]
    block_bytes: int


def _metadata_dir(source: ModelSource) -> Path:
    """The cached config and tokenizer of a GGUF file (parsing them from the file takes seconds)."""
    assert source.gguf_file is not None
    stat = (source.path / source.gguf_file).stat()
    key = f"{Path(source.gguf_file).stem}-{stat.st_size}-{int(stat.st_mtime)}-{CACHE_LAYOUT_VERSION}-metadata"
    return cache_root() / "models" / key


def load_metadata(source: ModelSource):
    """(config, tokenizer) of a GGUF file, from the cache or parsed once by transformers and cached atomically."""
    from transformers import AutoConfig, AutoTokenizer

    target = _metadata_dir(source)
    if not (target / "config.json").is_file():
        log.info("reading the config and tokenizer of %s (once; cached at %s)", source.gguf_file, target)
        config = AutoConfig.from_pretrained(source.path, gguf_file=source.gguf_file)
        tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        try:
            config.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            try:
                os.replace(staging, target)
            except OSError:  # another process cached the same file first
                if not (target / "config.json").is_file():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return AutoConfig.from_pretrained(target), AutoTokenizer.from_pretrained(target)


def _row_permutation(processor, name: str, rows: int) -> np.ndarray | None:
    """The output-row permutation transformers' processing applies to tensor `name` (None: none), found by
    processing a column of row indices; BlockModelError where the processing is anything but a row permutation."""
    index = np.arange(rows, dtype=np.float64)[:, None]
    processed = processor.process(weights=index, name=name, tensor_key_mapping={}, parsed_parameters={}).weights
    order = np.asarray(processed).reshape(-1)
    if processed.shape != index.shape or not np.array_equal(np.sort(order), index[:, 0]):
        raise BlockModelError(f"{name}: transformers re-shapes this tensor when it loads it; its blocks cannot be "
                              "served as stored (use --quantization none)")
    order = order.astype(np.int64)
    return None if np.array_equal(order, index[:, 0]) else order


def _tensor_of(array: np.ndarray) -> torch.Tensor:
    """A tensor over the array's memory (the file's read-only map, or a copy): torch warns that it cannot mark the
    map read-only; nothing writes to block weights (the kernels only read them)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, leaf, module)


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace the meta parameter or buffer `name` by `value`."""
    path, _, leaf = name.rpartition(".")
    module = model.get_submodule(path) if path else model
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    elif leaf in module._buffers:
        module._buffers[leaf] = value
    else:
        raise BlockModelError(f"{name}: no such parameter in the model")


def _meta_tensors(model: nn.Module) -> list[str]:
    return [name for name, t in [*model.named_parameters(remove_duplicate=False),
                                 *model.named_buffers(remove_duplicate=False)] if t.is_meta]


def load_block_model(source: ModelSource, dtype: torch.dtype):
    """(model, tokenizer, info) for a GGUF file: quantized tensors as block modules over the memory-mapped file,
    the rest in `dtype`. BlockModelError where a tensor is in a format or layout the block kernels do not read."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    assert source.gguf_file is not None
    config, tokenizer = load_metadata(source)
    reader = GGUFReader(source.path / source.gguf_file)  # a read-only memory map: tensors are views of the file
    architecture = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config.to_dict())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    names = get_gguf_hf_weights_map(model, processor)
    modules = dict(model.named_modules())
    formats: dict[str, int] = {}
    blocks_by_name: dict[str, BlockWeight] = {}
    for tensor in reader.tensors:
        hf_name = names.get(tensor.name)
        if hf_name is None:
            continue  # e.g. a precomputed rotary table: transformers ignores it too
        type_name = tensor.tensor_type.name
        path, _, leaf = hf_name.rpartition(".")
        module = modules.get(path)
        if type_name in FORMATS:
            if leaf != "weight" or not isinstance(module, nn.Linear | nn.Embedding):
                raise BlockModelError(f"{tensor.name} ({hf_name}) is {type_name}, for a {type(module).__name__}: "
                                      "only linear layers and embeddings are served from blocks")
            data = np.asarray(tensor.data)
            order = _row_permutation(processor, tensor.name, data.shape[0])
            blocks = _tensor_of(np.ascontiguousarray(data[order]) if order is not None else data)
            bias = getattr(module, "bias", None)  # a bias the file listed before its weight
            bias = None if bias is None or bias.is_meta else bias.detach().float().contiguous()
            weight = BlockWeight(blocks, FORMATS[type_name], int(tensor.shape[0]), bias)
            blocks_by_name[hf_name] = weight
            replacement = BlockLinear(weight) if isinstance(module, nn.Linear) else BlockEmbedding(weight, dtype)
            _set_module(model, path, replacement)
            modules[path] = replacement
            formats[type_name] = formats.get(type_name, 0) + 1
        elif type_name in FLOAT_TYPES:
            values = processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name,
                                       tensor_key_mapping={}, parsed_parameters={}).weights
            value = torch.from_numpy(np.array(values, dtype=np.float32))
            if isinstance(module, BlockLinear) and leaf == "bias":
                module.use(BlockWeight(module.block_weight.blocks, module.block_weight.format, module.in_features,
                                       value.contiguous()))
            else:
                _set_tensor(model, hf_name, value.to(dtype))
        else:
            raise BlockModelError(f"{tensor.name} is {type_name}, which the block kernels do not read (they read "
                                  f"{', '.join(FORMATS)}); serve this file with --quantization none")
    _tie_output_head(model, blocks_by_name)
    _materialize_rotary(model, config)
    missing = _meta_tensors(model)
    if missing:
        raise BlockModelError(f"the GGUF file has no tensors for {', '.join(missing[:5])}"
                              f"{' ...' if len(missing) > 5 else ''}")
    model.eval()
    model.requires_grad_(False)
    info = BlockModelInfo(formats, sum(w.blocks.numel() for w in blocks_by_name.values()))
    log.info("serving %s from its blocks: %s, %.1f MiB", source.gguf_file,
             ", ".join(f"{count} {name}" for name, count in sorted(formats.items())), info.block_bytes / 2**20)
    return model, tokenizer, info


def _tie_output_head(model: nn.Module, blocks_by_name: dict[str, BlockWeight]) -> None:
    """A file without an output head ties it to the embedding (as transformers does): from the same blocks."""
    head = model.get_output_embeddings()
    if head is None or not (head.weight is not None and head.weight.is_meta):
        return
    embedding = model.get_input_embeddings()
    if isinstance(embedding, BlockEmbedding):
        weight = embedding.block_weight
        path = next(name for name, module in model.named_modules() if module is head)
        _set_module(model, path, BlockLinear(BlockWeight(weight.blocks, weight.format, weight.in_features)))
    elif not embedding.weight.is_meta:
        head.weight = embedding.weight


def _materialize_rotary(model: nn.Module, config) -> None:
    """Rotary embeddings hold buffers computed from the config, not stored in the file: built again on the CPU."""
    for path, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding") and any(b.is_meta for b in module.buffers()):
            _set_module(model, path, type(module)(config=config))
