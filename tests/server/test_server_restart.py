"""An adapter unloaded through the API stays unloaded when the server restarts, until it is loaded again."""

from __future__ import annotations

import shutil

import httpx
import pytest
from server_helpers import API_KEY, start_server, stop_server, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
ADMIN = "restart-test-admin-key"


def test_an_unloaded_adapter_stays_unloaded_across_a_restart(adapter_dirs, default_model, tmp_path):
    root = tmp_path / "root"
    for name in ("alpha", "beta"):
        shutil.copytree(adapter_dirs[name], root / name)
    args = ["--adapter-root", str(root), "--admin-key", ADMIN, "--state-dir", str(tmp_path / "state"),
            "--log-level", "warning", "--shutdown-timeout", "5"]
    user = {"Authorization": f"Bearer {API_KEY}"}
    admin = {"Authorization": f"Bearer {ADMIN}"}

    def serve(log_name: str):
        process, url = start_server(args, tmp_path / log_name, env={"MALORA_API_KEY": API_KEY})
        wait_ready(process, url, tmp_path / log_name)
        return process, url

    def models(url: str) -> set[str]:
        return {card["id"] for card in httpx.get(f"{url}/v1/models", headers=user, timeout=60).json()["data"]}

    process, url = serve("first.log")
    try:
        assert {"alpha", "beta"} <= models(url)
        r = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "beta"}, headers=admin,
                       timeout=60)
        assert r.status_code == 200, r.text
    finally:
        stop_server(process)
    process, url = serve("second.log")
    try:
        assert "beta" not in models(url) and "alpha" in models(url)
        r = httpx.post(f"{url}/v1/completions", json={"model": "beta", "prompt": "Hi", "max_tokens": 2}, headers=user,
                       timeout=120)
        assert r.status_code == 404
        r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "beta", "lora_path": "beta"},
                       headers=admin, timeout=60)
        assert r.status_code == 200, r.text
    finally:
        stop_server(process)
    process, url = serve("third.log")
    try:
        assert {"alpha", "beta"} <= models(url)
        r = httpx.post(f"{url}/v1/completions", json={"model": "beta", "prompt": "Hi", "max_tokens": 2}, headers=user,
                       timeout=120)
        assert r.status_code == 200, r.text
    finally:
        stop_server(process)
