"""Every remote `malora` subcommand through a subprocess against the live server, its output parsed;
`malora chat` through a pseudo-terminal with a scripted conversation."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time

import pytest

from tests.server.server_helpers import REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def rows(table: str) -> list[list[str]]:
    return [line.split() for line in table.strip().splitlines()]


def test_models_table_and_json(malora, server):
    table = rows(malora("models").stdout)
    assert table[0] == ["ID", "KIND", "STATE", "PARENT", "MAX", "LEN"]
    kinds = {row[0]: row[1] for row in table[1:]}
    assert kinds[server.base_model] == "base" and kinds["alpha"] == kinds["beta"] == "adapter"
    models = json.loads(malora("models", "--json").stdout)
    assert {m["id"] for m in models} >= {server.base_model, "alpha", "beta"}


def test_complete_text_json_and_stream(malora):
    text = malora("complete", "The capital of France is", "--max-tokens", "6", "--temperature", "0").stdout
    result = json.loads(malora("complete", "The capital of France is", "--max-tokens", "6", "--temperature", "0",
                               "--json").stdout)
    assert text.rstrip("\n") == result["choices"][0]["text"] and result["object"] == "text_completion"
    streamed = malora("complete", "The capital of France is", "--max-tokens", "6", "--temperature", "0",
                      "--stream").stdout
    assert streamed == text
    chat = json.loads(malora("complete", "Say hi.", "--chat", "--adapter", "alpha", "--max-tokens", "4",
                             "--json").stdout)
    assert chat["object"] == "chat.completion" and chat["model"] == "alpha" and chat["adapter_version"] == 1


def test_adapters_ls_load_reload_unload(malora):
    table = rows(malora("adapters", "ls").stdout)
    assert table[0][:4] == ["NAME", "STATE", "VERSION", "SLOT"]
    assert {"alpha", "beta"} <= {row[0] for row in table[1:-1]} and table[-1][0].startswith("loads=")
    assert malora("adapters", "load", "cli-gamma", "gamma-dir").stdout.strip() == \
        "loaded cli-gamma version 1: loaded"
    listed = {a["name"]: a for a in json.loads(malora("adapters", "ls", "--json").stdout)["adapters"]}
    assert listed["cli-gamma"]["state"] == "loaded" and listed["cli-gamma"]["num_experts"] == 2
    reloaded = json.loads(malora("adapters", "reload", "cli-gamma", "--pin", "--json").stdout)
    assert (reloaded["version"], reloaded["pinned"]) == (2, True)
    assert malora("adapters", "unload", "cli-gamma").stdout.strip() == "unloaded cli-gamma version 2: unloaded"


def test_server_errors_exit_1_with_the_message(malora, server):
    missing = malora("complete", "hi", "--adapter", "nope", check=False)
    assert missing.returncode == 1 and "404" in missing.stderr and "'nope' does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr
    no_admin = malora("adapters", "ls", check=False, env={**server.env(), "MALORA_ADMIN_KEY": ""})
    assert no_admin.returncode == 1 and "admin key" in no_admin.stderr


def _read_until(fd: int, marker: bytes, timeout: float = 120) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {marker!r} in {seen!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                data = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            seen += data
    return seen


def test_chat_in_a_pseudo_terminal(server):
    import pty

    main_fd, child_fd = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "clients.cli", "chat", "--adapter", "alpha", "--max-tokens", "8", "--temperature",
         "0"], stdin=child_fd, stdout=child_fd, stderr=child_fd, env=server.env(), cwd=REPO_ROOT,
        close_fds=True)
    os.close(child_fd)
    try:
        banner = _read_until(main_fd, b">>> ")
        assert b"chatting with alpha" in banner
        os.write(main_fd, b"What is the capital of France?\n")
        first = _read_until(main_fd, b">>> ").decode(errors="replace")
        reply = first.split("France?", 1)[1].rsplit(">>> ", 1)[0].strip()
        assert reply, first
        os.write(main_fd, b"And of Italy?\n")
        second = _read_until(main_fd, b">>> ").decode(errors="replace")
        assert second.split("Italy?", 1)[1].rsplit(">>> ", 1)[0].strip()
        os.write(main_fd, b"/reset\n")
        assert b"(conversation reset)" in _read_until(main_fd, b">>> ")
        os.write(main_fd, b"/exit\n")
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        os.close(main_fd)


def test_chat_reads_a_pipe_without_prompts(server):
    done = subprocess.run([sys.executable, "-m", "clients.cli", "chat", "--max-tokens", "4", "--temperature", "0"],
                          input="Hello!\n/exit\n", capture_output=True, text=True, env=server.env(), cwd=REPO_ROOT,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() and ">>>" not in done.stdout
