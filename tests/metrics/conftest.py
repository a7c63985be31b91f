"""A fresh server of its own for the metrics tests, so every counter starts at zero; a tiny base model for tests
that start several servers."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.server.server_helpers import API_KEY, LiveServer, start_server, stop_server, wait_ready


@pytest.fixture(scope="module")
def metrics_server(default_model, tmp_path_factory):
    from malora_runtime.adapters import save_adapter
    from malora_runtime.adapters.init import random_adapter
    from malora_runtime.patching import linear_shapes

    model, _, source = default_model
    shapes = linear_shapes(model)
    root = tmp_path_factory.mktemp("metrics-adapters")
    args, files = [], []
    for name, targets, experts, seed in (("alpha", ["q_proj", "v_proj"], 4, 1), ("beta", ["o_proj"], 3, 2)):
        adapter = random_adapter(shapes, source.name, targets, experts, 4, 8, 2, seed, dtype="float32")
        directory = save_adapter(adapter, root / name)
        args.append(f"--adapter={name}={directory}")
        files.append(directory / "malora_model.safetensors")
    log = tmp_path_factory.mktemp("metrics-server") / "server.log"
    process, url = start_server(args + ["--log-level", "warning"], log, env={"MALORA_API_KEY": API_KEY})
    try:
        wait_ready(process, url, log)
        yield LiveServer(url, process, log, source.name, files)
    finally:
        stop_server(process)


@pytest.fixture(scope="session")
def tiny_model_dir(default_model, tmp_path_factory) -> Path:
    """A random 2-layer Llama (hidden size 64) with the default model's tokenizer, saved as an HF directory that
    `--model` takes: a server on it starts and steps in a fraction of the default model's time."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = default_model[1]
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    directory = tmp_path_factory.mktemp("models") / "tiny-llama"
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
