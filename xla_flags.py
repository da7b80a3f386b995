"""The XLA flags this project sets, all of them here, each with its evidence in notes/benchmarks.md
("XLA CPU flags"). Every entry point (train.py, sample.py, evaluate.py, bench.py) calls `apply()`
before JAX starts its backend, and train.py prints what it added. A flag the user already gives
in XLA_FLAGS is left as given, so `XLA_FLAGS=--xla_cpu_prefer_vector_width=256` undoes ours.

XLA:CPU vectorizes its own loops (elementwise and reduction fusions: a third of a small model's
step) for 256-bit registers unless told otherwise, LLVM's choice for CPUs whose 512-bit
instructions lower the clock (Intel's first AVX-512 server parts). On an AMD CPU with AVX-512
(Zen 4 and later, no such penalty) 512-bit vectors made small_6x384's training step 13-15%
faster; matmuls are unaffected (their kernels pick their own width). Intel's AVX-512 CPUs are not
measured here, so nothing is set on them; below AVX-512 (or under --xla_cpu_max_isa=AVX2) there
is nothing to widen.
"""
from __future__ import annotations

import os

VECTOR_WIDTH = "--xla_cpu_prefer_vector_width"
# An --xla_cpu_max_isa below AVX-512 leaves 256-bit registers the widest.
NARROW_ISAS = ("SSE4_2", "AVX", "AVX2")


def wide_vectors_measured() -> bool:
    """Whether this CPU is one where 512-bit vectors were measured to help: AuthenticAMD with
    avx512f in Linux's /proc/cpuinfo (False where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("vendor_id", "flags"))][:2]
    except OSError:
        return False
    text = " ".join(lines) + " "
    return "AuthenticAMD" in text and " avx512f " in text


def cpu_flags(xla_flags: str, wide: bool) -> list[str]:
    """The flags to add to `xla_flags` (the user's XLA_FLAGS) on a CPU where 512-bit vectors help
    (`wide`) or not."""
    capped = any(f"--xla_cpu_max_isa={isa}" in xla_flags.split() for isa in NARROW_ISAS)
    if not wide or capped or VECTOR_WIDTH in xla_flags:
        return []
    return [f"{VECTOR_WIDTH}=512"]


def apply() -> list[str]:
    """Add this machine's flags to XLA_FLAGS, for this process and the ones it starts; returns
    those added. Call it before anything runs on a JAX backend: flags are read when it starts."""
    current = os.environ.get("XLA_FLAGS", "")
    added = cpu_flags(current, wide_vectors_measured())
    if added:
        os.environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added
