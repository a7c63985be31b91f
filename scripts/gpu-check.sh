#!/usr/bin/env bash
# One-shot validation on a machine with one NVIDIA GPU (docs/BENCHMARKS.md, "GPU check"). After the README's
# set-up (`make setup`, run here; nothing else is installed), in under 8 minutes (the pieces' limits add up to 8):
#   kernels  the Triton kernel tests compiled on the GPU against the float64 reference, and the ahead-of-time
#            compile test (sm_80 / sm_90 / sm_100, ptxas statistics)
#   engine   the default model on CUDA with adapters: the engine against the reference path, batched (batch
#            invariance), seeded sampling alone and in a busy batch, the example adapters served by a real
#            malora-serve with the offline path's answers, and a PEFT LoRA against PEFT's own logits
#   bench    `malora bench kernels` and `malora bench offline` on the GPU
# Every figure goes to $OUT_DIR/gpu-check.json and a short report to $OUT_DIR/gpu-check.md; each piece's output
# to $OUT_DIR/<piece>.log. The exit status is 0 only when every piece passed.
#
#   scripts/gpu-check.sh                                   # OUT_DIR defaults to bench-results/gpu-check
#   SKIP_SETUP=1 PYTHON=python3 scripts/gpu-check.sh       # an environment prepared otherwise (no `make setup`)
set -euo pipefail

cd "$(dirname "$0")/.."
OUT_DIR=${OUT_DIR:-bench-results/gpu-check}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
rm -f "$OUT_DIR/pieces.tsv"

if [[ "${SKIP_SETUP:-0}" != 1 ]]; then
    make setup
fi
PY=${PYTHON:-.venv/bin/python}
if ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "torch sees no GPU here ($("$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"))" \
        "- nothing to check; the ahead-of-time compile test runs without one (tests/kernels/test_triton_compile.py)" >&2
    exit 2
fi

# Compiled, not interpreted: tests/conftest.py turns the interpreter on only where TRITON_INTERPRET is unset.
# The tests named below run on the GPU with MALORA_TEST_DEVICE=cuda; the delta goes through Triton or fails.
export TRITON_INTERPRET=0 MALORA_TEST_DEVICE=cuda MALORA_KERNEL_BACKEND=triton PYTHONUNBUFFERED=1
export MALORA_COMPILE_REPORT="$OUT_DIR/compile.json"
# A fresh Triton cache (first compiles are part of what is checked), writable whoever runs this.
TRITON_CACHE_DIR=$(mktemp -d "${TMPDIR:-/tmp}/malora-gpu-check-triton.XXXXXX")
export TRITON_CACHE_DIR

# piece NAME SECONDS COMMAND...: run COMMAND bounded by SECONDS, its output in NAME.log; record exit and time.
failed=0
piece() {
    local name=$1 limit=$2 start=$SECONDS status=0
    shift 2
    echo "== $name (at most $limit s): $*"
    timeout --kill-after=15 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1 || status=$?
    [[ $status == 0 ]] || failed=1
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" "$limit" >>"$OUT_DIR/pieces.tsv"
    echo "   exit $status after $((SECONDS - start)) s"
}

nvidia-smi >"$OUT_DIR/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed (see $OUT_DIR/nvidia-smi.txt)"

piece kernels 120 "$PY" -m pytest -q -rA tests/kernels/test_triton_interpret.py tests/kernels/test_triton_compile.py \
    --junitxml="$OUT_DIR/kernels.xml"
piece engine 210 "$PY" -m pytest -q -rA tests/engine/test_engine_e2e.py \
    tests/adapters/test_convert.py::test_peft_lora_matches_peft_logits_on_the_default_model \
    tests/training/test_examples_served.py --junitxml="$OUT_DIR/engine.xml"
piece bench-kernels 60 "$PY" -m clients.cli bench kernels --device cuda --rounds 3 --min-time 0.1 \
    --json "$OUT_DIR/bench-kernels.json"
piece bench-offline 90 "$PY" -m clients.cli bench offline --device cuda --json "$OUT_DIR/bench-offline.json"
rm -rf "$TRITON_CACHE_DIR"

# One JSON file with every figure, and a short report.
"$PY" - "$OUT_DIR" <<'PYTHON'
import json
import platform
import sys
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path

out = Path(sys.argv[1])


def load(name):
    path = out / name
    return json.loads(path.read_text()) if path.is_file() else None


def tests(name):
    path = out / name
    if not path.is_file():
        return None
    suites = ET.parse(path).getroot()
    counts = {key: sum(int(s.get(key, 0)) for s in suites.iter("testsuite"))
              for key in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suites.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    skips = [case.find("skipped") for case in suites.iter("testcase") if case.find("skipped") is not None]
    # A module skipped as a whole says "collection skipped" and puts its reason in the text.
    reasons = sorted({(s.get("message") if s.get("message") != "collection skipped" else s.text or "")[:240]
                      for s in skips if s.get("type") != "pytest.xfail"})
    expected = sorted({(s.get("message") or "")[:240] for s in skips if s.get("type") == "pytest.xfail"})
    return {**counts, "failed": failed, "skip_reasons": reasons, "expected_failures": expected}


try:
    import torch
    import triton

    environment = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                   "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__}
except Exception as error:  # the report is still written
    environment = {"error": repr(error)}
environment["python"] = platform.python_version()
suites = {"kernels": tests("kernels.xml"), "engine": tests("engine.xml")}
pieces = {}
for line in (out / "pieces.tsv").read_text().splitlines():
    name, status, seconds, limit = line.split("\t")
    verdict = "passed" if status == "0" else "timed out" if status in ("124", "137") else "failed"
    suite = suites.get(name)
    if verdict == "passed" and suite and suite["skipped"] >= suite["tests"]:
        verdict = "skipped"  # nothing ran: not a pass
    pieces[name] = {"verdict": verdict, "exit": int(status), "seconds": int(seconds), "limit_s": int(limit),
                    "log": f"{name}.log"}
compiled = load("compile.json")
report = {
    "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    "environment": environment,
    "nvidia_smi": (out / "nvidia-smi.txt").read_text() if (out / "nvidia-smi.txt").is_file() else None,
    "pieces": pieces,
    "tests": suites,
    "compile": compiled,
    "bench_kernels": load("bench-kernels.json"),
    "bench_offline": load("bench-offline.json"),
}
(out / "gpu-check.json").write_text(json.dumps(report, indent=1))

lines = [f"# GPU check, {report['date']}", "",
         f"GPU {environment.get('gpu')}, torch {environment.get('torch')} (CUDA {environment.get('cuda')}), "
         f"triton {environment.get('triton')}, Python {environment['python']}.", "",
         "| piece | verdict | seconds (limit) |", "| --- | --- | --- |"]
lines += [f"| {name} | {p['verdict']} | {p['seconds']} ({p['limit_s']}) |" for name, p in pieces.items()]
for name, result in report["tests"].items():
    if result:
        lines += ["", f"Tests, {name}: {result['tests']} run, {result['failures'] + result['errors']} failed, "
                      f"{result['skipped']} skipped."]
        lines += [f"- failed: `{test}`" for test in result["failed"]]
        lines += [f"- skipped: {reason}" for reason in result["skip_reasons"]]
        lines += [f"- expected failure: {reason}" for reason in result["expected_failures"]]
if compiled:
    results = [r for r in compiled["results"].values() if "registers" in r]
    spilled = [f"{r['config']['arch']}/{r['config']['mode']}/{r['config']['dtype']}/{r['config']['shape']}"
               for r in results if r["spill_stores"] + r["spill_loads"]]
    lines += ["", f"Ahead-of-time compiles: {len(results)} of {len(compiled['results'])} configurations, at most "
                  f"{max((r['registers'] for r in results), default=0)} registers; spills in: "
                  f"{', '.join(spilled) or 'none'}."]
kernels = report["bench_kernels"]
if kernels:
    lines += ["", "`malora bench kernels` (ms per call, d_out 576):", "",
              "| T | naive | triton | base |", "| --- | --- | --- | --- |"]
    seconds = kernels["seconds_per_call"]
    for t in seconds["triton"].get("576", {}):
        lines.append(f"| {t} | " + " | ".join(f"{seconds[p]['576'][t] * 1e3:.3f}" for p in ("naive", "triton", "base"))
                     + " |")
    lines += [f"- {bar}" for bar in kernels["bars"]]
offline = report["bench_offline"]
if offline:
    lines += ["", "`malora bench offline` (output tokens/s): " + ", ".join(
        f"{k} {v:.1f}" for k, v in offline.items() if k in ("a0", "a", "b", "c", "d"))
        + "; ratios " + ", ".join(f"{k} {v:.2f}" for k, v in offline["ratios"].items()) + "."]
(out / "gpu-check.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PYTHON

echo "wrote $OUT_DIR/gpu-check.json and $OUT_DIR/gpu-check.md"
exit "$failed"
