"""The Triton kernel compiled ahead of time for real GPUs (sm_80, sm_90, sm_100), with no GPU present.

The interpreter (TRITON_INTERPRET=1, every other kernel test) accepts code that a real compile rejects:
tile shapes, dtypes, register pressure. Triton compiles to PTX and cubin for a `GPUTarget` without a GPU
(its wheel ships `ptxas`), but not in a process that imported triton in interpreter mode (its
`triton.language` helpers are then interpreter objects), so this file, run as a script with
TRITON_INTERPRET=0, compiles every configuration in one subprocess and writes ptxas's statistics as JSON;
the tests read them.

What compiles is what a launch would compile: the constexprs and num_warps come from the launcher's own
`triton_malora.launch_config`, the arguments from `kernel_args` on real (CPU) tensors of the shapes below,
and the signature and specialisations (pointer dtypes, 16-byte alignment, ints divisible by 16) from the
kernel's own binder, as `JITFunction.run` derives them before it compiles.

Gates: every configuration compiles and fits the target's shared memory; the decode configuration (the
per-token mode) spills no register for the adapter shapes this project ships and benchmarks. Spills
elsewhere (prefill tiles, adapters larger than those) are reported as warnings. MALORA_COMPILE_REPORT=FILE
copies every figure to FILE (scripts/gpu-check.sh does).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
D_IN = D_OUT = 576  # the default model's q_proj and o_proj

# Largest (d, r, N) of the adapters in a bank, for adapters this project ships or benchmarks.
SHAPES = {
    "examples": (16, 4, 4),  # examples/adapters (d 16 or 8, r 4, N 4 or 2): `make serve`
    "lora16": (16, 16, 1),  # a PEFT LoRA of rank 16, converted (N = 1): bench offline's b
    "mixed": (16, 16, 4),  # those LoRAs and bench offline d's MALoRAs (N 4, r 8, d 16) in one bank
    "bench": (32, 8, 8),  # malora bench kernels (N 8, r 8, d 32)
    "large": (64, 16, 16),  # larger than anything shipped: reported, not gated
    "limits": (1024, 256, 64),  # the largest adapter the server accepts (--max-adapter-*): see KNOWN_FAILURES
}
# Most dynamic shared memory per block: A100, H100/H200, B200.
SHARED_LIMIT = {80: 166912, 90: 232448, 100: 232448}


@dataclass(frozen=True)
class Config:
    arch: int
    mode: str  # "token" (decode) or "tile" (prefill), as `choose_mode` picks
    dtype: str  # the model's dtype: x, y and the bank
    shape: str
    count: bool = True  # expert counting (EngineConfig.count_expert_routing, on by default)

    @property
    def id(self) -> str:
        return f"sm{self.arch}-{self.mode}-{self.dtype}-{self.shape}" + ("" if self.count else "-nocount")

    @property
    def gated(self) -> bool:
        """Spills fail the test: the decode configuration, for the shapes that ship."""
        return self.mode == "token" and self.shape not in ("large", "limits")


def _configs() -> list[Config]:
    dtypes = ("float32", "bfloat16", "float16")
    configs = [Config(arch, mode, dtype, "examples") for arch in (80, 90, 100) for mode in ("token", "tile")
               for dtype in dtypes]
    configs += [Config(arch, "token", dtype, shape) for shape in ("lora16", "mixed", "bench") for arch in (80, 90)
                for dtype in ("float32", "bfloat16")]
    configs += [Config(arch, "token", "float32", "examples", count=False) for arch in (80, 90, 100)]
    configs += [Config(90, "tile", "bfloat16", "bench"), Config(90, "token", "bfloat16", "large"),
                Config(90, "token", "bfloat16", "limits")]
    return configs


CONFIGS = _configs()
# Known, tracked failures (strict: the test fails once they compile, so this list is kept true).
KNOWN_FAILURES = {
    "sm90-token-bfloat16-limits": "the kernel holds P as one [BLOCK_D, BLOCK_NR] tile: at d 1024, N r 16384 that is "
                                  "16M elements, over Triton's 1M per tensor; the server accepts such adapters",
}


# ---- the subprocess: compiles every configuration (TRITON_INTERPRET=0) ----

def _arguments(config: Config) -> tuple[tuple, dict]:
    """(positional arguments, launch keywords) of `_malora_kernel` for `config`, as the launcher builds them."""
    import torch

    from malora_runtime.adapters.format import ModuleSpec, ModuleWeights
    from malora_runtime.kernels import triton_malora as tm
    from malora_runtime.kernels.slot_bank import SlotBank
    from malora_runtime.kernels.token_slots import NO_SLOT, TokenSlots

    dtype = getattr(torch, config.dtype)
    maxima = SHAPES[config.shape]
    d, r, n = maxima
    spec = ModuleSpec(d=d, r=r, num_experts=n, top_k=min(2, n), alpha=float(r))
    weights = ModuleWeights(spec, S=torch.zeros(d, D_IN), G=torch.zeros(n, D_IN), P=torch.zeros(n, r, d),
                            B=torch.zeros(n, D_OUT, r))
    bank = SlotBank(D_IN, D_OUT, 2, storage_dtype=dtype)  # as a GPU bank: every module in the model's dtype
    for slot in range(2):
        bank.set_slot(slot, weights)
    token_slots = TokenSlots.from_list([0, 1, NO_SLOT, 0])
    x = torch.zeros(4, D_IN, dtype=dtype)
    y = torch.zeros(4, D_OUT, dtype=dtype)
    tiles = token_slots.slots if config.mode == "token" else tm.tile_table(token_slots, bank)
    counts = torch.zeros(2, maxima[2], dtype=torch.int64) if config.count else y.new_zeros(1, dtype=torch.int64)
    launch = tm.launch_config(config.mode, dtype, dtype, maxima, config.count, interpreted=False)
    return tm.kernel_args(y, x, bank, token_slots, tiles, counts), launch


def _unsupported(arch: int) -> str | None:
    """Why the bundled ptxas cannot build for sm_`arch` (checked from sm_100 on), else None."""
    from triton.backends.nvidia.compiler import get_ptxas

    if arch < 100:
        return None
    tool = get_ptxas(arch)
    listing = subprocess.run([tool.path, "--list-arch"], capture_output=True, text=True)
    if listing.returncode != 0 or str(arch) not in listing.stdout.split():
        return f"{Path(tool.path).name} {tool.version} (bundled with triton) does not list sm_{arch}"
    return None


def _compile(config: Config) -> dict:
    """Compile one configuration; ptxas's statistics, or the error."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource, compile, make_backend
    from triton.runtime.jit import create_function_from_signature

    from malora_runtime.kernels import triton_malora as tm

    kernel = tm._malora_kernel
    target = GPUTarget("cuda", config.arch, 32)
    backend = make_backend(target)
    args, launch = _arguments(config)
    # As JITFunction.run does before compiling: bind, derive the signature and the specialisations.
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **launch)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch, bound, specialization, options)
    log = io.StringIO()
    try:
        with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True  # Triton prints `ptxas -v`'s statistics
            knobs.compilation.always_compile = True  # really compile, whatever the cache holds
            compiled = compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                               options=options.__dict__)
    except Exception as error:  # any compile failure is the finding, reported with its message
        return {"error": f"{type(error).__name__}: {error}"[-6000:]}
    text = log.getvalue()
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    registers = re.search(r"Used (\d+) registers", text)
    if spills is None or registers is None:
        return {"error": f"no ptxas statistics in its log:\n{text[-2000:]}"}
    ptxas = get_ptxas(config.arch)
    return {
        "registers": int(registers.group(1)), "spill_stores": int(spills.group(1)),
        "spill_loads": int(spills.group(2)), "shared": compiled.metadata.shared,
        "num_warps": compiled.metadata.num_warps, "ptx_bytes": len(compiled.asm["ptx"]),
        "cubin_bytes": len(compiled.asm["cubin"]), "ptxas": f"{Path(ptxas.path).name} {ptxas.version}",
        "launch": launch,
    }


def _api_missing() -> str | None:
    """Why this Triton cannot be driven as below (its binder and `_pack_args` are internal; Triton 3.9 has them)."""
    import inspect

    import triton
    from triton.compiler import ASTSource
    from triton.runtime import jit

    if not hasattr(jit, "create_function_from_signature") or not hasattr(jit.JITFunction, "_pack_args") or (
            "constexprs" not in inspect.signature(ASTSource).parameters):
        return f"triton {triton.__version__} lacks the ahead-of-time interface this test uses (written for 3.9)"
    return None


def compile_all(out: Path) -> None:
    import triton

    results: dict[str, dict] = {}
    missing = _api_missing()
    for config in CONFIGS:
        reason = missing or _unsupported(config.arch)
        results[config.id] = {"skip": reason} if reason else _compile(config)
        results[config.id]["config"] = asdict(config)
    out.write_text(json.dumps({"triton": triton.__version__, "results": results}, indent=1))


# ---- the tests ----

@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, dict]:
    pytest.importorskip("triton", reason="triton is not installed: the Triton kernels are not compiled")
    tmp = tmp_path_factory.mktemp("triton-aot")
    out = tmp / "compiled.json"
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp / "cache"), "PYTHONPATH": str(REPO_ROOT)}
    run = subprocess.run([sys.executable, __file__, str(out)], cwd=REPO_ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, f"the compile subprocess failed:\n{run.stderr[-6000:]}"
    if os.environ.get("MALORA_COMPILE_REPORT"):
        shutil.copyfile(out, os.environ["MALORA_COMPILE_REPORT"])
    return json.loads(out.read_text())["results"]


@pytest.mark.parametrize("config", [
    pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[c.id])) if c.id in KNOWN_FAILURES
    else c for c in CONFIGS], ids=lambda c: c.id)
def test_kernel_compiles_for_the_target(compiled, config: Config) -> None:
    result = compiled[config.id]
    if "skip" in result:
        pytest.skip(result["skip"])
    assert "error" not in result, f"{config.id} does not compile:\n{result['error']}"
    assert result["shared"] <= SHARED_LIMIT[config.arch], (
        f"{config.id}: {result['shared']} bytes of shared memory, more than sm_{config.arch} has per block")
    spilled = result["spill_stores"] + result["spill_loads"]
    stats = (f"{config.id}: {result['registers']} registers, {result['spill_stores']} bytes spill stores, "
             f"{result['spill_loads']} bytes spill loads ({result['ptxas']})")
    if config.gated:
        assert spilled == 0, f"the decode configuration spills registers: {stats}"
    elif spilled:
        warnings.warn(f"register spills (not gated): {stats}", stacklevel=1)


def test_the_launcher_passes_launch_config(monkeypatch) -> None:
    """The launcher launches with exactly `launch_config`'s keywords, so the compiles above cannot drift
    from what runs (checked on the CPU, where the launcher asks for its interpreter configuration)."""
    pytest.importorskip("triton", reason="triton is not installed: the Triton kernels are not compiled")
    import torch

    from malora_runtime.adapters.format import ModuleSpec
    from malora_runtime.kernels import triton_malora as tm
    from malora_runtime.kernels.token_slots import TokenSlots
    from tests.kernels.conftest import make_bank, make_weights

    launches: list[dict] = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(kwargs)

    monkeypatch.setattr(tm, "_malora_kernel", Recorder())
    gen = torch.Generator().manual_seed(0)
    weights = make_weights(ModuleSpec(d=5, r=3, num_experts=3, top_k=2, alpha=3.0), 24, 20, gen)
    bank = make_bank([weights], torch.float32)
    x = torch.randn(20, 24)
    for slots, mode in (([0, -1, 0], "token"), ([0] * 20, "tile")):
        token_slots = TokenSlots.from_list(slots)
        assert tm.choose_mode(token_slots) == mode
        tm.add_malora_delta_triton(torch.zeros(len(slots), 20), x[: len(slots)], bank, token_slots,
                                   torch.zeros(1, bank.maxima[2], dtype=torch.int64))
        assert launches.pop() == tm.launch_config(mode, torch.float32, torch.float32, bank.maxima, True,
                                                  interpreted=True)


if __name__ == "__main__":
    compile_all(Path(sys.argv[1]))
