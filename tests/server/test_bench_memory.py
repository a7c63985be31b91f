"""`malora bench memory` end to end: a real server on the default model, adapters read from an adapter root,
resident memory measured from /proc. Small (three adapters of the four shapes): this checks the command and
that a running server's memory grows by about the adapters' own bytes, not the 150x of padded slot banks;
docs/BENCHMARKS.md has the four-shape and thousand-adapter runs."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_memory_reports_growth_near_the_adapters_bytes(tmp_path, cli_env):
    out = tmp_path / "memory.json"
    run = subprocess.run([sys.executable, "-m", "clients.cli", "bench", "memory", "--count", "3", "--json", str(out)],
                         capture_output=True, text=True, env=cli_env, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["adapters"] == 3 and report["adapter_bytes"] > 1 << 20
    # The budget the issue sets: growth <= 1.2 x the adapters' bytes + 64 MiB (a padded bank grew ~150x).
    assert report["meets_goal"], report
    assert report["rss_growth_bytes"] <= 1.2 * report["adapter_bytes"] + (64 << 20)
    # /metrics counts the packed modules: the files' tensor bytes plus a tail and zero bias per module.
    assert 0.97 * report["adapter_bytes"] <= report["reported_slot_bytes"] <= 1.01 * report["adapter_bytes"]
    assert report["batch"]["succeeded"] == report["batch"]["requests"] == 3
    assert 0 < report["cold_activation_p50_s"] <= report["cold_activation_p99_s"]
