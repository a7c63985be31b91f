"""`malora bench kernels` runs end to end through the CLI and writes every figure it promises (a tiny
configuration: this checks the command, not the speed; docs/BENCHMARKS.md has the real runs)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from malora_runtime.kernels.native import native_kernel


def test_bench_kernels_writes_every_path_and_bar(tmp_path, cli_env):
    out = tmp_path / "kernels.json"
    run = subprocess.run(
        [sys.executable, "-m", "clients.cli", "bench", "kernels", "--tokens", "1,32", "--d-out", "48,70",
         "--adapters", "3", "--min-time", "0.001", "--rounds", "1", "--rotate-mib", "1", "--json", str(out)],
        capture_output=True, text=True, env=cli_env, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    assert ("cpu = native kernel" if native_kernel() is not None else "cpu = torch") in run.stdout
    report = json.loads(out.read_text())
    seconds = report["seconds_per_call"]
    assert set(seconds) == {"naive", "cpu", "cpu_torch", "base", "base_torch"}
    for path, by_width in seconds.items():
        assert set(by_width) == {"48", "70"}, path
        for by_tokens in by_width.values():
            assert set(by_tokens) == {"1", "32"} and all(s > 0 for s in by_tokens.values()), path
    assert [line.split(":")[0] for line in report["bars"]] == [
        "bar naive/cpu >= 10 at T=32, d_out=48", "bar naive/cpu >= 10 at T=32, d_out=70"]


@pytest.mark.parametrize("bad", [["--adapters", "0"], ["--tokens", "32,abc"], ["--rounds", "0"],
                                 ["--rotate-mib", "-1"], ["--d-out", "0"]])
def test_bench_kernels_refuses_bad_arguments_with_a_usage_error(bad, cli_env):
    run = subprocess.run([sys.executable, "-m", "clients.cli", "bench", "kernels", *bad], capture_output=True,
                         text=True, env=cli_env, timeout=120, check=False)
    assert run.returncode == 2 and f"argument {bad[0]}" in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_matched_mode_times_malora_against_lora_of_equal_parameters_and_rank_budget(tmp_path, cli_env):
    out = tmp_path / "matched.json"
    run = subprocess.run([sys.executable, "-m", "clients.cli", "bench", "kernels", "--matched", "--tokens", "1,32",
                          "--min-time", "0.01", "--rounds", "1", "--json", str(out)], capture_output=True, text=True,
                         env=cli_env, timeout=300)
    assert run.returncode == 0, run.stderr
    data = json.loads(out.read_text())
    spec = data["spec"]
    malora_params = spec["d"] * spec["d_in"] + spec["N"] * spec["d_in"] + spec["N"] * spec["r"] * (
        spec["d"] + spec["d_out"])
    assert data["lora_ranks"] == {"matched": round(malora_params / (spec["d_in"] + spec["d_out"])),
                                  "matched_rank": spec["top_k"] * spec["r"]}
    for key in ("matched", "matched_rank"):
        assert set(data[key]) == {"1", "32"}
        for figures in data[key].values():
            assert figures["lora"] == min(figures["lora_kernel"], figures["lora_torch"]) and figures["malora"] > 0
    assert "bar malora/lora <= 1.1 at equal parameters" in run.stdout


def test_work_items_split_only_where_threads_would_idle():
    from malora_runtime.kernels.native import BLOCK, MIN_BLOCK, item_block

    assert item_block(32, 1, 2) == 16 and item_block(2048, 1, 2) == BLOCK
    assert item_block(32, 32, 2) == BLOCK  # one segment per adapter already feeds every thread
    assert item_block(1, 1, 2) == BLOCK and item_block(12, 1, 4) == MIN_BLOCK and item_block(32, 1, 1) == BLOCK
