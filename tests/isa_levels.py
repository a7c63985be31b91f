"""`make test`'s second part: the CPU-specific tests (marked `isa`) once more at each instruction-set level below this
CPU's own, as a CPU of that level would run them (`MALORA_MAX_ISA`: the native libraries built for that level, the
dtype `auto` picks there, oneDNN's and ATen's kernels for it).

Why: the suite must pass on every CPU users have, and a machine can only run the paths its CPU takes; an AVX-512
machine runs the AVX2 and scalar ones this way (an AVX2-only Zen 3 had 7 failures nobody had seen). `avx2`, the
most common server level, runs every `isa` test (the real model's included); the other levels the kernels' and
the tiny models' (`isa and not slow`), to keep the suite inside its time.

Each level is its own pytest process: oneDNN and ATen read the cap once, at their first use.
    python -m tests.isa_levels [pytest args...]
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from malora_runtime.cpu_features import ENV_CAP, cpu_features

log = logging.getLogger("tests.isa_levels")

FULL_LEVEL = "avx2"  # the level that also runs the real model's `isa` tests


def lower_levels() -> list[str]:
    """The levels below the served one, highest first."""
    return list(reversed(cpu_features().levels[:-1]))


def main(extra: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    levels = lower_levels()
    if not levels:
        log.info("isa levels: this CPU serves at %s, the lowest level: nothing more to run", cpu_features().level)
        return 0
    failed = []
    for level in levels:
        selection = "isa" if level == FULL_LEVEL else "isa and not slow"
        log.info("isa levels: %s=%s, -m %r", ENV_CAP, level, selection)
        env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")}
        env[ENV_CAP] = level
        code = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", selection,
                                *extra], env=env)
        if code != 0:
            failed.append(f"{level} (exit {code})")
    if failed:
        log.error("isa levels: failed at %s", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
