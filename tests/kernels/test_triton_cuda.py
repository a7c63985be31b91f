"""The Triton kernel compiled (not interpreted) wherever CUDA is present: the whole comparison suite of
test_triton_interpret.py, run on the GPU in a fresh process (TRITON_INTERPRET is read when `triton.jit` wraps the
kernel, so this process, where the suite already runs interpreted, cannot also run it compiled). Elsewhere the test
is skipped and says why."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device here: the compiled Triton kernel runs only on a GPU "
                                "(the same comparisons run interpreted in test_triton_interpret.py)")


@pytest.mark.timeout(1800)
def test_the_compiled_kernel_matches_the_reference_on_the_gpu():
    pytest.importorskip("triton", reason="triton is not installed")
    env = {**os.environ, "MALORA_TEST_DEVICE": "cuda", "TRITON_INTERPRET": "0", "PYTHONPATH": str(REPO_ROOT)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/kernels/test_triton_interpret.py"], cwd=REPO_ROOT, env=env, capture_output=True,
                         text=True, timeout=1700)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " skipped" not in run.stdout.splitlines()[-1], run.stdout[-2000:]
