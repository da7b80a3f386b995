"""What every benchmark shares: one timer, peak memory, fresh worker processes, the load other
processes put on the machine, one hardware description for every table's header, and the loader
of the PyTorch twin (torch/*.py).

Imports neither JAX nor PyTorch at the top: each is imported where it runs, usually in a spawned
worker, so the two frameworks never share a process's thread pools.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import importlib.util
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# XLA:CPU allocates each step's temporaries afresh and glibc maps blocks of more than 32 MiB straight
# from the kernel, so every step page-faults them in again, 4 KiB at a time (notes/benchmarks.md,
# "Page faults"). The glibc settings a benchmark's workers start with (GLIBC_TUNABLES, read at
# process start; use_malloc): "hugepages" asks the kernel for 2 MiB transparent huge pages (glibc
# 2.35 on, where the THP mode is madvise or always): one fault per 2 MiB, at the same peak memory;
# "tuned" keeps freed memory mapped in one arena that never trims: no faults, a higher peak.
MALLOC_REUSE = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776"
MALLOCS = {"hugepages": "glibc.malloc.hugetlb=1", "default": None, "tuned": MALLOC_REUSE}
# The instruction-set extensions that decide matmul speed (x86 flags, then Arm features).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "asimd", "sve", "sve2")
PEAK_REPS = 10   # timed matmuls behind each framework's peak
# Caps both frameworks' CPU kernels at AVX2 on an AVX-512 machine (most laptops have AVX2 only):
# PyTorch's own kernels, MKL's sgemm and oneDNN's; XLA_FLAGS gains --xla_cpu_max_isa=AVX2.
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2"}


# --- Timing and memory ---------------------------------------------------------------------------


def time_steps(run, steps: int, warmup: int, reset_peak=lambda: None) -> tuple[float, float]:
    """(seconds of the first call, median seconds of `steps` calls after `warmup` more); `run` must
    block until its work is done. `reset_peak` runs after the first call (where compilation and
    one-time allocations happen), so peak memory covers the steady state; the warmup calls absorb
    what it costs the next call (reset_peak_rss's trim)."""
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    reset_peak()
    for _ in range(warmup):
        run()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def rss_bytes() -> int:
    """This process's resident set now."""
    return _status_kb("VmRSS") * 1024


def reset_peak_rss() -> None:
    """Hand memory already freed back to the OS, then reset the kernel's resident-set high-water
    mark to the resident set left. Without the trim, what compilation freed but malloc kept (all
    of it under MALLOC_REUSE) would count as the steady state's memory."""
    libc = ctypes.util.find_library("c")
    if libc and hasattr(ctypes.CDLL(libc), "malloc_trim"):   # glibc only
        ctypes.CDLL(libc).malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss() -> int:
    """The resident-set high-water mark since the process began or reset_peak_rss."""
    return _status_kb("VmHWM") * 1024


# --- Workers and the machine's load --------------------------------------------------------------


def use_malloc(name: str) -> str:
    """The glibc malloc setting MALLOCS[name] for the workers spawned from now on, which read
    GLIBC_TUNABLES at startup. Returns malloc_label()."""
    if MALLOCS[name]:
        os.environ["GLIBC_TUNABLES"] = MALLOCS[name]
    else:
        os.environ.pop("GLIBC_TUNABLES", None)
    return malloc_label()


def malloc_label() -> str:
    """The malloc setting in this process's environment, as workers spawned now start with it: its
    name in MALLOCS, or the tunables given."""
    tunables = os.environ.get("GLIBC_TUNABLES")
    return next((name for name, value in MALLOCS.items() if value == tunables), f"GLIBC_TUNABLES={tunables}")


def cap_at_avx2() -> None:
    """AVX2 kernels only, for the workers spawned from now on (they read the environment at startup)."""
    os.environ.update(AVX2_ENV)
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_max_isa=AVX2".strip()


def in_worker(fn, *args):
    """fn(*args) in a freshly spawned process; an exception there comes back as {"error": ...}."""
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(fn, *args).result()
    except Exception as err:  # a failed torch.compile is a result to report, not a crash
        text = str(err).strip()
        return {"error": f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"}


def load_mark() -> tuple[float, float, float]:
    """(CPU-seconds the whole machine has been busy, of which this process and its ended workers,
    wall time): the start of a contention measurement."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:9]]
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    own = sum(getattr(resource.getrusage(who), field) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for field in ("ru_utime", "ru_stime"))
    return busy, own, time.perf_counter()


def contention(mark: tuple[float, float, float]) -> str:
    """How many cores other processes kept busy since `mark`: timings are clean only near 0."""
    busy, own, now = load_mark()
    others = max((busy - mark[0] - (own - mark[1])) / (now - mark[2]), 0.0)
    return (f"other processes kept {others:.1f} of {os.cpu_count()} cores busy during this run"
            + ("; the timings above are contended" if others > 0.1 else ""))


# --- Hardware ------------------------------------------------------------------------------------


def thp_mode() -> str:
    """The kernel's transparent huge page mode (always, madvise or never; "none" without THP), which
    decides what --malloc hugepages can do, and whether the default malloc gets huge pages too."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "none"
    return text[text.find("[") + 1:text.find("]")] if "[" in text else text.strip()


def cpu_info() -> dict:
    """The CPU's model name, its matmul-relevant instruction sets and core count, from /proc/cpuinfo;
    the kernel's huge page mode."""
    fields = {}
    with open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())  # the first processor's
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return {"cpu": fields.get("model name") or platform.processor() or platform.machine(),
            "isa": [flag for flag in ISA_FLAGS if flag in flags], "cores": os.cpu_count(), "thp": thp_mode()}


def matmul_peak(framework: str, gpu: bool, reps: int = PEAK_REPS) -> float:
    """FLOP/s of a large square matmul: fp32 (sgemm) on a CPU, bf16 on a GPU."""
    n = 8192 if gpu else 2048
    if framework == "jax":
        import jax
        import jax.numpy as jnp
        dtype = jnp.bfloat16 if gpu else jnp.float32
        a, b = jnp.ones((n, n), dtype), jnp.ones((n, n), dtype)
        matmul = jax.jit(jnp.matmul)
        _, seconds = time_steps(lambda: matmul(a, b).block_until_ready(), reps, 2)
    else:
        import torch
        device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
        a, b = torch.ones(n, n, dtype=dtype, device=device), torch.ones(n, n, dtype=dtype, device=device)
        sync = torch.cuda.synchronize if gpu else (lambda: None)
        _, seconds = time_steps(lambda: (a @ b, sync()), reps, 2)
    return 2 * n ** 3 / seconds


def framework_info(framework: str) -> dict:
    """A framework's version, whether it sees a GPU, the device's name and the matmul peak there
    (run in a worker, so each framework starts its own thread pools)."""
    if framework == "jax":
        import jax
        gpu = jax.default_backend() == "gpu"
        version, device = jax.__version__, jax.devices()[0].device_kind if gpu else "cpu"
    else:
        import torch
        gpu = torch.cuda.is_available()
        version, device = torch.__version__, torch.cuda.get_device_name() if gpu else "cpu"
    return {"version": version, "gpu": gpu, "device": device, "peak": matmul_peak(framework, gpu)}


def hardware(frameworks=("jax", "torch")) -> dict:
    """The one hardware description: the CPU, Python, and for each framework its version, device and
    matmul peak, measured now. "peak" is the highest of them (what MFU is taken over); "gpu" is
    whether the first framework (JAX, where it runs) sees one."""
    info = {**cpu_info(), "python": platform.python_version(), "frameworks": {}}
    for name in frameworks:
        got = in_worker(framework_info, name)
        if "error" in got:
            raise SystemExit(f"error: cannot measure {name}'s matmul peak: {got['error']}")
        info["frameworks"][name] = got
    measured = list(info["frameworks"].values())
    peak = max((f["peak"] for f in measured), default=None)
    return info | {"gpu": bool(measured) and measured[0]["gpu"], "peak": peak}


def header(command: str, hw: dict, extra: str = "") -> str:
    """The lines that open every table: command, date, the hardware, and what else was fixed."""
    now = datetime.datetime.now(datetime.timezone.utc)
    lines = [f"bench.py {command} · {now:%Y-%m-%d %H:%M} UTC · {hw['cpu']}, {hw['cores']} cores "
             f"({' '.join(hw['isa']) or 'no vector extensions listed'}; huge pages {hw['thp']}) · "
             f"python {hw['python']}"]
    settings = [f"{k}={os.environ[k]}" for k in ("XLA_FLAGS", "GLIBC_TUNABLES", *AVX2_ENV) if os.environ.get(k)]
    if settings:
        lines.append("environment: " + " ".join(settings))
    for name, f in hw["frameworks"].items():
        kind = "bf16 8192^3" if f["gpu"] else "fp32 2048^3"
        lines.append(f"{name} {f['version']} on {f['device']}: matmul peak ({kind}, median of {PEAK_REPS}) "
                     f"{f['peak'] / 1e9:,.0f} GFLOP/s")
    return "\n".join(lines + ([extra] if extra else []))


# --- Inputs and the PyTorch twin -----------------------------------------------------------------


def make_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict:
    """Random int32 {"inputs", "targets"} [batch, seq], targets the inputs shifted by one."""
    tokens = np.random.default_rng(seed).integers(0, vocab, (batch, seq + 1), dtype=np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def load_twin(name: str = "model"):
    """torch/NAME.py (the PyTorch twin: model, train), loaded by path once per process. The folder
    has no __init__.py, so `import torch` stays PyTorch."""
    module_name = f"torch_twin_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, ROOT / "torch" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]
