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
