"""`/dashboard` in headless Chromium renders live figures after traffic, with no console errors."""

from __future__ import annotations

import re
import shutil
import subprocess

import httpx
import pytest

from malora_runtime.kernels.native import native_kernel
from tests.server.server_helpers import API_KEY

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
BROWSER = next((path for name in BROWSERS if (path := shutil.which(name))), None)


def run_browser(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
             "--virtual-time-budget=6000", "--window-size=1400,1100"]
    return subprocess.run([BROWSER, *flags, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(BROWSER is None, reason="no Chromium on this machine (.ci/run installs Debian's chromium)")
def test_dashboard_renders_live_values(metrics_server, tmp_path) -> None:
    with httpx.Client(base_url=metrics_server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as h:
        for model in (metrics_server.base_model, "alpha", "beta"):
            body = {"model": model, "prompt": "Hello there", "max_tokens": 6, "ignore_eos": True}
            assert h.post("/v1/completions", json=body).status_code == 200
    assert httpx.get(f"{metrics_server.url}/v1/dashboard/summary").status_code == 401  # its data needs the key
    url = f"{metrics_server.url}/dashboard#key={API_KEY}"
    dom = run_browser(["--dump-dom", url], tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert 'data-updates="' in html, "the page never rendered a summary"
    throughput = re.search(r'id="throughput">([^<]*)<', html).group(1)
    assert throughput not in ("", "–") and float(throughput) > 0
    assert re.search(r'id="queues">0 / 0<', html)
    in_slots, in_host = re.search(r'id="adapter-memory">([\d.]+) / ([\d.]+)<', html).groups()
    assert float(in_slots) > 0 and float(in_host) == 0  # alpha and beta are in slots
    for name in ("alpha", "beta"):
        assert f"<td>{name}</td>" in html
    assert re.search(r'class="heat"[^>]*title="expert 0: \d+ tokens"', html), "no routing heat map"
    if native_kernel() is not None:  # the kernel counts per layer: the by-layer grid of each adapter
        for name in ("alpha", "beta"):
            grid = re.search(rf'id="layer-routing-{name}"[^>]*>(.*?)</div>', html)
            assert grid and re.search(r'title="[\w.]+, expert 0: \d+%"', grid.group(1)), name
    charts = re.findall(r'<canvas id="chart-[a-z]+"[^>]*data-points="(\d+)"', html)
    assert len(charts) == 4 and all(int(n) > 0 for n in charts)
    console_errors = [line for line in dom.stderr.splitlines()
                      if "CONSOLE" in line and ("error" in line.lower() or "Uncaught" in line)]
    assert not console_errors, console_errors
    shot = tmp_path / "dashboard.png"
    screenshot = run_browser([f"--screenshot={shot}", url], tmp_path)
    assert screenshot.returncode == 0 and shot.stat().st_size > 10_000
