"""`malora generate` and `malora adapter init` on the real default model, through the console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from malora_runtime.adapters import load_adapter


def malora(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clients.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_generate_answers_paris(cli_env) -> None:
    run = malora("generate", "--chat", "--prompt", "What is the capital of France?", "--max-tokens", "24",
                 env=cli_env)
    assert run.returncode == 0, run.stderr
    assert "Paris" in run.stdout


def test_adapter_init_info_and_generate_with_it(tmp_path: Path, cli_env, default_model) -> None:
    out = tmp_path / "random"
    run = malora("adapter", "init", "--experts", "4", "--rank", "8", "--subspace-rank", "16", "--top-k", "2",
                 "--targets", "q_proj,v_proj", "--seed", "3", str(out), env=cli_env)
    assert run.returncode == 0, run.stderr
    adapter = load_adapter(out)
    assert len(adapter.modules) == 60 and all(w.B.abs().sum() > 0 for w in adapter.modules.values())
    info = json.loads(malora("adapter", "info", str(out), env=cli_env).stdout)
    # 30 layers x (q: 576->576, v: 576->192), by docs/malora.md's parameter formula.
    per_q = 16 * 576 + 4 * 576 + 4 * 8 * (16 + 576)
    per_v = 16 * 576 + 4 * 576 + 4 * 8 * (16 + 192)
    assert info["parameters"] == 30 * (per_q + per_v)
    base = malora("generate", "--prompt", "Once upon a time", "--max-tokens", "8", env=cli_env)
    adapted = malora("generate", "--prompt", "Once upon a time", "--max-tokens", "8", "--adapter", str(out),
                     env=cli_env)
    assert base.returncode == 0 and adapted.returncode == 0, adapted.stderr
    assert base.stdout != adapted.stdout


def test_generate_with_a_bad_adapter_fails_with_one_clear_line(tmp_path: Path, cli_env) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "pytorch_model.bin").write_bytes(b"x")
    run = malora("generate", "--prompt", "hi", "--adapter", str(tmp_path / "bad"), env=cli_env)
    assert run.returncode == 2
    assert "pickle" in run.stderr and "Traceback" not in run.stderr
