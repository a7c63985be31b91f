"""One live `malora-serve` for the client tests: the default model, two random adapters under an adapter
root (a third directory, `gamma-dir`, for runtime loads), an API key and an admin key."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.server.server_helpers import REPO_ROOT, start_server, stop_server, wait_ready

API_KEY = "client-key"
ADMIN_KEY = "client-admin-key-16"


@dataclass
class Server:
    url: str
    base_model: str
    root: Path
    log: Path
    api_key: str = API_KEY
    admin_key: str = ADMIN_KEY

    def env(self) -> dict[str, str]:
        """What the CLI reads: base URL and both keys."""
        return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "MALORA_BASE_URL": self.url,
                "MALORA_API_KEY": API_KEY, "MALORA_ADMIN_KEY": ADMIN_KEY}


@pytest.fixture(scope="session")
def adapter_root(default_model, tmp_path_factory) -> Path:
    from malora_runtime.adapters import save_adapter
    from malora_runtime.adapters.init import random_adapter
    from malora_runtime.patching import linear_shapes

    model, _, source = default_model
    shapes = linear_shapes(model)
    root = tmp_path_factory.mktemp("client-adapters")
    specs = {"alpha": (["q_proj", "v_proj"], 4, 8, 16, 2, 1), "beta": (["q_proj", "v_proj", "o_proj"], 2, 4, 8, 1, 2),
             "gamma-dir": (["q_proj"], 2, 4, 8, 1, 3)}
    for name, (targets, experts, rank, subspace, top_k, seed) in specs.items():
        save_adapter(random_adapter(shapes, source.name, targets, experts, rank, subspace, top_k, seed,
                                    dtype="float32"), root / name)
    return root


@pytest.fixture(scope="session")
def server(adapter_root, default_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("client-server") / "server.log"
    args = [f"--adapter=alpha={adapter_root / 'alpha'}", f"--adapter=beta={adapter_root / 'beta'}",
            "--adapter-root", str(adapter_root), "--log-level", "warning", "--shutdown-timeout", "5"]
    process, url = start_server(args, log, env={"MALORA_API_KEY": API_KEY, "MALORA_ADMIN_KEY": ADMIN_KEY})
    try:
        wait_ready(process, url, log)
        yield Server(url, default_model[2].name, adapter_root, log)
    finally:
        stop_server(process)


@pytest.fixture
def malora(server):
    """Run the `malora` CLI in a subprocess against the live server."""

    def run(*args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "clients.cli", *args], capture_output=True, text=True,
                              env=env or server.env(), cwd=REPO_ROOT, timeout=300)
        if check:
            assert done.returncode == 0, done.stderr
        return done

    return run
