"""A live `malora-serve` (uvicorn, real default model, two random adapters) shared by the server tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from server_helpers import (
    ADAPTERS,
    API_KEY,
    MAX_BODY_BYTES,
    MAX_NUM_SEQS,
    MAX_WAITING,
    LiveServer,
    start_server,
    stop_server,
    wait_ready,
)


@pytest.fixture(scope="session")
def adapter_dirs(default_model, tmp_path_factory) -> dict[str, Path]:
    """Two random MALoRA adapters of different shapes, saved as the server will read them."""
    from malora_runtime.adapters import save_adapter
    from malora_runtime.adapters.init import random_adapter
    from malora_runtime.patching import linear_shapes

    model, _, source = default_model
    shapes = linear_shapes(model)
    root = tmp_path_factory.mktemp("adapters")
    specs = {"alpha": (["q_proj", "v_proj"], 4, 8, 16, 2, 1), "beta": (["q_proj", "v_proj", "o_proj"], 2, 4, 8, 1, 2)}
    dirs = {}
    for name, (targets, experts, rank, subspace, top_k, seed) in specs.items():
        adapter = random_adapter(shapes, source.name, targets, experts, rank, subspace, top_k, seed, dtype="float32")
        dirs[name] = save_adapter(adapter, root / name)
    return dirs


@pytest.fixture(scope="session")
def tokenizer(default_model):
    return default_model[1]


@pytest.fixture(scope="session")
def live_server(adapter_dirs, default_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    args = [f"--adapter={name}={path}" for name, path in adapter_dirs.items()]
    args += ["--max-num-seqs", str(MAX_NUM_SEQS), "--max-waiting", str(MAX_WAITING),
             "--max-body-bytes", str(MAX_BODY_BYTES), "--log-level", "warning", "--shutdown-timeout", "5"]
    process, url = start_server(args, log, env={"MALORA_API_KEY": API_KEY})
    try:
        wait_ready(process, url, log)
        yield LiveServer(url, process, log, default_model[2].name)
    finally:
        stop_server(process)


@pytest.fixture(scope="session")
def client(live_server):
    import openai

    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def http(live_server):
    with live_server.http() as c:
        yield c


@pytest.fixture(params=[None, *ADAPTERS], ids=["base", *ADAPTERS])
def model(request, live_server) -> str:
    """Each test runs on the base model and on both adapters."""
    return request.param or live_server.base_model
