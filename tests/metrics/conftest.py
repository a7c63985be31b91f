"""A fresh server of its own for the metrics tests, so every counter starts at zero."""

from __future__ import annotations

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
