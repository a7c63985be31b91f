"""Starting and stopping a real `malora-serve` process on loopback, for the server tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

API_KEY = "test-key"
ADAPTERS = ("alpha", "beta")
MAX_NUM_SEQS = 64
MAX_WAITING = 16
MAX_BODY_BYTES = 256 * 1024
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class LiveServer:
    url: str
    process: subprocess.Popen
    log: Path
    base_model: str
    adapter_files: list[Path] = field(default_factory=list)  # weights files of the adapters it was started with

    def http(self, key: str | None = API_KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "server.main", "--host", "127.0.0.1", "--port", str(port), *args]
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    with log.open("w") as out:
        process = subprocess.Popen(cmd, cwd=REPO_ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{port}"


def wait_ready(process: subprocess.Popen, url: str, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    process.kill()
    raise RuntimeError(f"server not ready after {timeout}s:\n{log.read_text()[-4000:]}")


def stop_server(process: subprocess.Popen, timeout: float = 30) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def wait_idle(http: httpx.Client, timeout: float = 30) -> dict:
    """Poll `/v1/engine/stats` until no block, sequence or admitted request is left; return the stats."""
    deadline = time.monotonic() + timeout
    while True:
        stats = http.get("/v1/engine/stats").json()
        if (stats["kv_blocks_used"], stats["num_running"], stats["num_waiting"], stats["num_admitted"]) == (0,) * 4:
            return stats
        assert time.monotonic() < deadline, stats
        time.sleep(0.05)
