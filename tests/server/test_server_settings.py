"""Flags, `MALORA_*` environment variables, adapter discovery and start-up errors (no model needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from server_helpers import REPO_ROOT

from server.main import main
from server.settings import parse_settings


def test_defaults_env_and_flags():
    s = parse_settings([], env={})
    assert (s.host, s.port, s.api_keys, s.adapters, s.engine.model) == ("127.0.0.1", 8000, [], {}, None)
    env = {"MALORA_PORT": "9001", "MALORA_API_KEY": "a,b", "MALORA_MAX_NUM_SEQS": "8",
           "MALORA_KV_CACHE_MEMORY": "1000000", "MALORA_OPEN_HEALTH": "false", "MALORA_ADAPTER": "x=/tmp/x,y=/y"}
    s = parse_settings([], env=env)
    assert (s.port, s.api_keys, s.engine.max_num_seqs, s.engine.kv_cache_memory) == (9001, ["a", "b"], 8, 1000000)
    assert s.open_health is False and s.adapters == {"x": Path("/tmp/x"), "y": Path("/y")}
    s = parse_settings(["--port", "9002", "--api-key", "c", "--adapter", "z=/z", "--max-num-batched-tokens", "64"],
                       env=env)
    assert (s.port, s.api_keys, s.adapters, s.engine.max_num_batched_tokens) == (9002, ["c"], {"z": Path("/z")}, 64)
    assert s.max_admitted == 8 + s.max_waiting


def test_vllm_compatible_metrics_default_on_and_turned_off_by_flag_or_env():
    assert parse_settings([], env={}).vllm_compatible_metrics is True
    assert parse_settings(["--vllm-compatible-metrics", "false"], env={}).vllm_compatible_metrics is False
    assert parse_settings([], env={"MALORA_VLLM_COMPATIBLE_METRICS": "0"}).vllm_compatible_metrics is False
    on = parse_settings(["--vllm-compatible-metrics"], env={"MALORA_VLLM_COMPATIBLE_METRICS": "false"})
    assert on.vllm_compatible_metrics is True


def test_quantization_flag():
    assert parse_settings(["--quantization", "gguf"], env={}).engine.quantization == "gguf"
    assert parse_settings([], env={"MALORA_QUANTIZATION": "gguf"}).engine.quantization == "gguf"
    assert parse_settings(["--quantization", "none"], env={}).engine.quantization is None


@pytest.mark.parametrize("argv", [["--adapter", "nodir"], ["--adapter", "a=/x", "--adapter", "a=/y"],
                                  ["--port", "-1"], ["--max-num-seqs", "0"], ["--port", "abc"],
                                  ["--quantization", "gguf", "--device", "cuda"], ["--quantization", "int4"],
                                  ["--quantization", "gguf", "--dtype", "float16"]])
def test_bad_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        parse_settings(argv, env={})
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_bad_env_value_exits_2():
    with pytest.raises(SystemExit):
        parse_settings([], env={"MALORA_PORT": "eighty"})


def test_help_lists_every_flag_and_env_name():
    out = subprocess.run([sys.executable, "-m", "server.main", "--help"], cwd=REPO_ROOT, capture_output=True,
                         text=True, check=True).stdout
    for flag in ("--model", "--adapter", "--adapter-root", "--host", "--port", "--api-key", "--max-num-seqs",
                 "--max-num-batched-tokens", "--kv-cache-memory", "--max-waiting", "--shutdown-timeout"):
        assert flag in out
        assert "MALORA_" + flag[2:].replace("-", "_").upper() in out


def test_adapter_flags():
    s = parse_settings(["--adapter-root", "/r1", "--adapter-root", "/r2", "--pin", "x", "--admin-key", "k" * 16,
                        "--max-cpu-adapters", "40", "--max-adapter-bytes", "1000"], env={})
    assert (s.adapter_roots, s.pins, s.admin_key) == ([Path("/r1"), Path("/r2")], ["x"], "k" * 16)
    assert (s.max_cpu_adapters, s.max_adapter_bytes) == (40, 1000)
    s = parse_settings([], env={"MALORA_ADAPTER_ROOT": "/a,/b", "MALORA_ADMIN_KEY": "env-admin-key-0123"})
    assert (s.adapter_roots, s.admin_key, s.pins) == ([Path("/a"), Path("/b")], "env-admin-key-0123", [])
    assert parse_settings([], env={}).admin_key is None


@pytest.mark.parametrize("argv", [["--max-cpu-adapters", "0"], ["--max-loaded-adapters", "2", "--pin", "a",
                                                                 "--pin", "b"], ["--max-adapter-bytes", "0"]])
def test_bad_adapter_flags_exit_2(argv):
    with pytest.raises(SystemExit):
        parse_settings(argv, env={})


def test_missing_adapter_directory_is_a_clear_startup_error(tmp_path, caplog):
    assert main(["--adapter", f"ghost={tmp_path / 'nope'}"]) == 2
    assert "ghost" in caplog.text and "not a directory" in caplog.text
