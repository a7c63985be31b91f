"""CPU levels (malora_runtime/cpu_features.py): detection from /proc/cpuinfo lines of the CPUs users have, the
MALORA_MAX_ISA cap (what it changes: the level, the dtype `auto` picks, the compiler's target, oneDNN and ATen), and
a bad cap refused at start-up with one clear line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from malora_runtime.cpu_features import X86_LEVELS, IsaError, cpu_features, detect
from malora_runtime.dtype_choice import choose_dtype

pytestmark = pytest.mark.isa  # run again at every lower instruction-set level (tests/isa_levels.py)

ZEN3 = "fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 bmi2"
SKYLAKE_X = f"{ZEN3} avx512f avx512dq avx512cd avx512bw avx512vl"
ZEN4 = f"{SKYLAKE_X} avx512_vnni avx512_bf16"
SAPPHIRE_RAPIDS = f"{ZEN4} amx_bf16 amx_tile amx_int8"
GRAVITON3 = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm sve asimddp bf16"


@pytest.fixture
def cpuinfo(tmp_path):
    def write(flags: str, key: str = "flags") -> object:
        path = tmp_path / "cpuinfo"
        path.write_text(f"processor\t: 0\n{key}\t\t: {flags}\n")
        return path
    return write


@pytest.mark.parametrize(("flags", "level", "bf16"), [
    ("fpu sse sse2", "scalar", False),
    (ZEN3, "avx2", False),
    (ZEN3.replace(" fma", ""), "scalar", False),  # AVX2 without FMA is not the avx2 level
    (SKYLAKE_X, "avx512", False),
    (ZEN4, "avx512_bf16", True),
    (SAPPHIRE_RAPIDS, "amx", True),
])
def test_x86_levels_from_the_flags(cpuinfo, flags, level, bf16):
    features = detect(cpuinfo(flags), architecture="x86_64")
    assert (features.level, features.native_level, features.capped) == (level, level, False)
    assert features.native_bfloat16 is bf16
    assert features.levels[0] == "scalar" and features.levels[-1] == level
    assert features.march() == ["-march=native"]


def test_arm_levels_and_targets(cpuinfo):
    features = detect(cpuinfo(GRAVITON3, key="Features"), architecture="aarch64")
    assert features.levels == ("scalar", "neon") and not features.native_bfloat16
    assert features.march("scalar") == ["-march=armv8-a+nosimd"]
    assert detect(cpuinfo("fp evtstrm"), architecture="aarch64").level == "scalar"


def test_the_cap_lowers_the_level_the_dtype_and_the_target(cpuinfo):
    path = cpuinfo(SAPPHIRE_RAPIDS)
    capped = detect(path, cap="avx2", architecture="x86_64")
    assert (capped.level, capped.native_level, capped.capped) == ("avx2", "amx", True)
    assert capped.levels == ("scalar", "avx2") and capped.bf16_flags() == []
    assert capped.march() == ["-march=x86-64-v3"] and capped.march("scalar") == ["-march=x86-64"]
    assert "MALORA_MAX_ISA" in capped.describe() and "amx" in capped.describe()
    # A cap above what the CPU has changes nothing; `native` is no cap.
    for cap in ("amx", "native", None):
        assert detect(cpuinfo(ZEN3), cap=cap, architecture="x86_64").level == "avx2"
    with pytest.raises(IsaError, match="avx2, avx512"):
        detect(path, cap="avx3", architecture="x86_64")
    with pytest.raises(IsaError, match="scalar, neon"):
        detect(path, cap="avx2", architecture="aarch64")


def test_auto_dtype_follows_the_served_level():
    features = cpu_features()
    assert (choose_dtype("auto", "cpu").name == "bfloat16") is features.native_bfloat16


def run_python(code: str, cli_env: dict[str, str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**cli_env, **env})


def test_the_cap_reaches_onednn_aten_and_the_native_build(cli_env):
    """In a fresh process (both read the cap once): an avx2 cap on any CPU with AVX2 serves float32 through
    oneDNN's and ATen's AVX2 kernels, and builds the native libraries for x86-64-v3."""
    native = cpu_features().native_level
    if native not in X86_LEVELS or X86_LEVELS.index(native) <= X86_LEVELS.index("avx2"):
        pytest.skip(f"an avx2 cap lowers nothing on this CPU ({native}): its own runs are the AVX2 ones")
    if "avx2" not in cpu_features().levels:
        pytest.skip(f"this run serves below avx2 ({cpu_features().describe()})")
    code = ("import malora_runtime, torch, os\n"
            "from malora_runtime.cpu_features import cpu_features\n"
            "from malora_runtime.config import EngineConfig\n"
            "from malora_runtime.kernels.native.decode_ops import decode_ops\n"
            "print(cpu_features().level, torch.backends.cpu.get_cpu_capability(), os.environ['ONEDNN_MAX_CPU_ISA'],"
            " EngineConfig(dtype='auto').dtype, decode_ops().library._name.rsplit('/', 1)[-1].split('-')[1])\n")
    inherited = {k: v for k, v in cli_env.items() if k not in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")}
    result = run_python(code, inherited, MALORA_MAX_ISA="avx2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["avx2", "AVX2", "AVX2", "float32", "avx2"]


def test_a_cap_that_names_no_level_is_one_clear_line_at_start(cli_env):
    started = subprocess.run([sys.executable, "-m", "server.main", "--port", "0"], capture_output=True, text=True,
                             timeout=300, env={**cli_env, "MALORA_MAX_ISA": "avx1024"})
    assert started.returncode == 2, started.stderr[-2000:]
    assert "cannot start: MALORA_MAX_ISA='avx1024'" in started.stderr and "Traceback" not in started.stderr
