"""Where a training step's time goes, per category of operation: `python bench.py profile`.

train.py's step (as `bench.py train` builds it) runs under jax.profiler for a few steps. Every
event in the trace whose name is a top-level instruction of the compiled program (an XLA
thunk: a fusion, a dot, a copy) is summed into the category of that instruction, read from the
compiled HLO: a fusion is classified by what it contains. An op's time is its wall time on the
thread that started it (a matmul spreads its work over the thread pool inside that one event), so
the categories add up to about the step's wall time when ops run one after another, and to more
when independent ops overlap; "busy in ops" gives both that sum and the process's CPU time over
the wall time. On a GPU the events are the kernels on the device's streams, each named by the
instruction XLA launched it for, so "busy in ops" is the share of the step the GPU computed.

With --twin (CPU only), the PyTorch twin's eager step is profiled the same way beside it
(torch.profiler): each aten op's self time, on the thread that called it, summed into the same
categories. The two columns then say which framework spends more outside the weight matmuls, the
part of a small model's step that decides the race on a CPU whose two matmul libraries are equal.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

from benchmarks import common, train_step
from cli import format_table
from configs.base import ConfigError
from configs.load import load_config, preset_path

CATEGORIES = {
    "weight matmuls": "dots without batch dimensions: projections, MLP, unembedding, and their gradients",
    "attention matmuls": "batched dots: QK^T, PV and their gradients",
    "reductions": "fusions with a reduce: norms' statistics, softmax, loss, bias gradients",
    "elementwise": "loop fusions: activations, RoPE, residual adds, the optimizer update",
    "copies and transposes": "copy, transpose, concatenate, slice, pad",
    "layer slicing and stacking": "dynamic-slice / dynamic-update-slice: the scan reading and writing stacked arrays",
    "buffer fills": "broadcasts of a constant: buffers zeroed or filled each step",
    "other": "everything else (custom calls, sorts, scatters, RNG)",
}
# backward includes what remat recomputes; update is everything outside jax.grad's forward and
# backward: clipping, the optimizer, and the buffers the scan fills before its loop.
PHASES = ("forward", "backward", "update")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = .*? ([a-z][a-z0-9-]*)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) .*\{$")
_CONTAINERS = {"while", "call", "conditional", "parameter", "get-tuple-element", "tuple", "constant", "bitcast"}
_MOVES = {"copy", "transpose", "concatenate", "slice", "pad", "reshape", "bitcast", "parameter", "constant",
          "broadcast", "iota", "convert"}


def parse_hlo(text: str) -> dict[str, list[tuple[str, str, str]]]:
    """computation name -> its instructions as (name, opcode, rest of the line)."""
    computations, current = defaultdict(list), None
    for line in text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = header.group(1)
            continue
        match = _INSTRUCTION.match(line)
        if match and current:
            computations[current].append(match.groups())
    return computations


def _opcodes(computations, name: str, seen=None) -> list[tuple[str, str]]:
    """(opcode, rest) of every instruction in a computation and the computations it calls."""
    seen = set() if seen is None else seen
    seen.add(name)
    out = []
    for _, opcode, rest in computations.get(name, []):
        out.append((opcode, rest))
        for callee in re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", rest):
            if callee not in seen:
                out += _opcodes(computations, callee, seen)
    return out


def classify(opcode: str, rest: str, computations) -> str | None:
    """The category of one top-level instruction; None for containers (a while loop's time is
    its body's instructions)."""
    if opcode in _CONTAINERS:
        return None
    inner = [(opcode, rest)]
    if opcode == "fusion":
        called = re.search(r"calls=%([\w.\-]+)", rest)
        inner = _opcodes(computations, called.group(1)) if called else inner
    ops = {op for op, _ in inner}
    dots = [r for op, r in inner if op in ("dot", "convolution")]
    # On a GPU: cuBLAS GEMMs and cuDNN's fused attention are custom calls.
    dots += [r for op, r in inner if op == "custom-call" and "gemm" in r]
    if any(op == "custom-call" and "fmha" in r for op, r in inner):
        return "attention matmuls"
    if dots:
        batched = ("lhs_batch_dims", '"lhs_batch_dimensions":["')
        return "attention matmuls" if any(b in r for r in dots for b in batched) else "weight matmuls"
    if ops & {"reduce", "reduce-window"}:
        return "reductions"
    if ops & {"dynamic-slice", "dynamic-update-slice"} and ops <= _MOVES | {"dynamic-slice", "dynamic-update-slice"}:
        return "layer slicing and stacking"
    if ops <= {"broadcast", "constant", "parameter", "bitcast"}:
        return "buffer fills"
    if ops <= _MOVES:
        return "copies and transposes"
    if ops & {"custom-call", "sort", "scatter", "gather", "rng", "rng-bit-generator"}:
        return "other"
    return "elementwise"


def phase(rest: str) -> str:
    """Which part of the step an instruction belongs to, from the JAX op name XLA kept for it."""
    name = re.search(r'op_name="([^"]*)"', rest)
    name = name.group(1) if name else ""
    return "backward" if "transpose(jvp(" in name else "forward" if "jvp(" in name else "update"


def categories(hlo_text: str) -> dict[str, tuple[str, str]]:
    """Instruction name -> (category, phase), for every instruction of every computation (the
    thunks a trace names are top-level instructions of the entry and loop bodies)."""
    computations = parse_hlo(hlo_text)
    out = {}
    for instructions in computations.values():
        for name, opcode, rest in instructions:
            category = classify(opcode, rest, computations)
            if category:
                out[name] = (category, phase(rest))
    return out


def gpu_streams(events: list[dict]) -> set:
    """(pid, tid) of the GPU's stream lines in a trace: the kernels as they ran. The device's other
    lines (XLA Modules, XLA Ops) are spans derived from them and would count them twice."""
    names = {(e["pid"], e.get("tid")): str(e.get("args", {}).get("name", "")) for e in events
             if e.get("ph") == "M" and e.get("name") in ("process_name", "thread_name")}
    gpus = {pid for (pid, tid), name in names.items() if tid is None and name.startswith("/device:GPU")}
    return {(pid, tid) for (pid, tid), name in names.items() if pid in gpus and tid is not None
            and name.startswith("Stream")}


def instruction(event: dict, names, streams: set) -> str | None:
    """The instruction a trace event ran: on a CPU the thunk's own name; on a GPU, for kernels on
    the device's streams only (the host's launches would count twice), the `hlo_op` XLA attached."""
    if streams:
        if (event.get("pid"), event.get("tid")) not in streams:
            return None
        return event.get("args", {}).get("hlo_op", event["name"])
    return event["name"] if event["name"] in names else None


def op_times(trace_dir: str, names: dict[str, tuple[str, str]]) -> tuple[Counter, Counter, Counter]:
    """Seconds summed over the trace's events: per category, per phase, per instruction. A GPU
    kernel no instruction claims counts as "other", under its kernel's name, in no phase."""
    events = json.load(gzip.open(next(Path(trace_dir).rglob("*.trace.json.gz"))))["traceEvents"]
    streams = gpu_streams(events)
    per_category, per_phase, per_op = Counter(), Counter(), Counter()
    for event in events:
        name = instruction(event, names, streams) if event.get("ph") == "X" else None
        if name:
            category, part = names.get(name, ("other", None))
            per_category[category] += event["dur"] / 1e6
            if part:
                per_phase[part] += event["dur"] / 1e6
            per_op[name] += event["dur"] / 1e6
    return per_category, per_phase, per_op


def profile_worker(cfg, batch: dict, steps: int, warmup: int) -> dict:
    """Trace `steps` steps of train.py's step after `warmup` untimed ones (in a spawned worker)."""
    import time

    import jax

    state, step, data = train_step.jax_step(cfg, batch)
    step = step.lower(state, data).compile()   # the program the trace's names come from
    hlo, memory = step.as_text(), step.memory_analysis()
    for _ in range(warmup + 1):
        state, metrics = step(state, data)
        metrics["loss"].block_until_ready()
    with tempfile.TemporaryDirectory() as trace_dir:
        start, cpu = time.perf_counter(), time.process_time()
        with jax.profiler.trace(trace_dir):
            for _ in range(steps):
                state, metrics = step(state, data)
                metrics["loss"].block_until_ready()
        wall, cpu = (time.perf_counter() - start) / steps, (time.process_time() - cpu) / steps
        per_category, per_phase, per_op = op_times(trace_dir, categories(hlo))
    return {"wall_s": wall, "cpu_s": cpu, "temp_bytes": memory.temp_size_in_bytes,
            "argument_bytes": memory.argument_size_in_bytes, "categories": {k: v / steps for k, v in per_category.items()},
            "phases": {k: v / steps for k, v in per_phase.items()},
            "top": {k: v / steps for k, v in per_op.most_common(12)}}


# PyTorch's aten ops by name. The matmul kernels are named; the rest by what the op computes. Views,
# allocation, autograd's engine and the optimizer's Python are the framework's own time: "other".
_TORCH_WEIGHT = {"aten::mm", "aten::addmm"}
_TORCH_ATTENTION = ("aten::bmm", "scaled_dot_product")
_TORCH_REDUCTIONS = ("sum", "mean", "norm", "softmax", "nll_loss", "cross_entropy", "logsumexp")
_TORCH_MOVES = {"aten::copy_", "aten::cat", "aten::stack", "aten::clone", "aten::_to_copy", "aten::roll",
                "aten::slice_backward", "aten::select_backward", "aten::constant_pad_nd"}
_TORCH_FILLS = {"aten::fill_", "aten::zero_", "aten::zeros", "aten::zeros_like", "aten::ones_like", "aten::full"}
_TORCH_VIEWS = ("view", "as_strided", "lift_fresh", "expand", "reshape", "transpose", "permute", "unsqueeze", "squeeze", "t",
                "detach", "alias", "slice", "select", "split", "unbind", "empty")
_TORCH_ELEMENTWISE = ("add", "sub", "mul", "div", "neg", "exp", "log", "tanh", "sigmoid", "silu", "gelu", "erf",
                      "sqrt", "rsqrt", "square", "reciprocal", "pow", "where", "clamp", "cos", "sin", "fused_adam",
                      "lerp", "masked_fill", "threshold", "relu", "dropout", "maximum", "minimum")


def torch_category(name: str) -> str:
    """The category of one aten op (a torch.profiler event name)."""
    if name in _TORCH_WEIGHT:
        return "weight matmuls"
    if any(key in name for key in _TORCH_ATTENTION):
        return "attention matmuls"
    if not name.startswith("aten::"):
        return "other"
    op = name.removeprefix("aten::").strip("_").removeprefix("foreach_")   # the clip's _foreach_mul_
    if op in ("max", "amax", "min", "amin") or any(key in op for key in _TORCH_REDUCTIONS):
        return "reductions"
    if name in _TORCH_MOVES:
        return "copies and transposes"
    if name in _TORCH_FILLS:
        return "buffer fills"
    if op in _TORCH_VIEWS or op.split("_")[0] in _TORCH_VIEWS or op.endswith("_view"):
        return "other"
    return "elementwise" if any(op.startswith(key) for key in _TORCH_ELEMENTWISE) else "other"


def torch_profile_worker(cfg, batch: dict, steps: int, warmup: int) -> dict:
    """The twin's eager step under torch.profiler, as profile_worker does JAX's (in a spawned worker)."""
    import time

    import torch

    step, inputs, targets = train_step.torch_step(cfg, batch, "eager", "cpu")
    for _ in range(warmup + 1):
        step(inputs, targets)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            step(inputs, targets)
        wall, cpu = (time.perf_counter() - start) / steps, (time.process_time() - cpu) / steps
    per_category, per_op = Counter(), Counter()
    for event in prof.key_averages():
        per_category[torch_category(event.key)] += event.self_cpu_time_total / 1e6 / steps
        per_op[event.key] += event.self_cpu_time_total / 1e6 / steps
    return {"wall_s": wall, "cpu_s": cpu, "categories": dict(per_category), "top": dict(per_op.most_common(12))}


def table(result: dict, twin: dict | None = None) -> str:
    """Per category: ms/step and share of the op time, the twin's beside them where profiled; the
    whole and what lies outside the weight matmuls; then each step's wall, XLA's buffers, the
    phases and the slowest instructions."""
    results = {"JAX": result, **({"PyTorch eager": twin} if twin else {})}
    total = lambda r: sum(r["categories"].values())
    busy = {name: total(r) for name, r in results.items()}
    rows = [("category", *(cell for name in results for cell in (f"{name} ms/step", "share")), "what it holds")]

    def row(label: str, seconds_of, what: str) -> tuple:
        cells = [(1e3 * seconds_of(r), seconds_of(r) / busy[name]) for name, r in results.items()]
        return (label, *(cell for ms, share in cells for cell in (f"{ms:,.1f}", f"{share:.0%}")), what)
    for category, what in CATEGORIES.items():
        rows.append(row(category, lambda r: r["categories"].get(category, 0.0), what))
    rows.append(row("all ops", total, "summed over the ops; the walls below"))
    rows.append(row("outside the weight matmuls", lambda r: total(r) - r["categories"].get("weight matmuls", 0.0),
                    "what decides a small model's step where the two matmul libraries are equal"))
    lines = [format_table(rows, right=range(1, 2 * len(results) + 1))]
    if twin:
        lines.append("PyTorch's attention matmuls are its fused attention, softmax included, and any bmm; its "
                     "other holds autograd's engine, views, allocation and the optimizer's Python")
    for name, r in results.items():
        wall = r["wall_s"]
        lines.append(f"{name}: step wall {1e3 * wall:,.1f} ms (traced); busy in ops {busy[name] / wall:.2f} (a GPU's "
                     f"kernels, or a CPU's cores); the process's cores {r['cpu_s'] / wall:.2f}")
    phases = ", ".join(f"{name} {1e3 * result['phases'].get(name, 0.0):,.1f} ms" for name in PHASES)
    lines += [f"XLA's buffers: state and batch {result['argument_bytes'] / 2**20:,.0f} MiB (donated), "
              f"temporaries {result['temp_bytes'] / 2**20:,.0f} MiB", f"JAX by phase: {phases}"]
    for name, r in results.items():
        slowest = [("op", "ms/step")] + [(op, f"{1e3 * seconds:,.2f}") for op, seconds in r["top"].items()]
        lines += [f"\n{name}: slowest ops", format_table(slowest, right=(1,))]
    return "\n".join(lines)


def run(args) -> list[dict]:
    """`bench.py profile`: the table for --config (default the 6x384 suite shape), with --twin the
    PyTorch twin's eager step beside it. On a GPU, XLA's command buffers are turned off for the
    worker: kernels replayed from one keep no `hlo_op`."""
    config = load_config(args.config or str(preset_path("small_6x384")), args.overrides)
    if args.twin:
        train_step.check_twin(config)
    hw = common.hardware(("jax", "torch") if args.twin else ("jax",))
    if hw["gpu"] and args.twin:
        raise ConfigError("--twin profiles the PyTorch twin on a CPU only; leave it out on a GPU")
    cfg = train_step.bench_config(config, args.batch, args.dtype, hw["gpu"])
    if hw["gpu"]:
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_gpu_enable_command_buffer=".strip()
    print(common.header("profile", hw, f"{cfg.name}: batch {args.batch} x seq {args.seq}, {cfg.model.compute_dtype}, "
                        f"attn_impl {cfg.model.attn_impl}, malloc {common.malloc_label()}; "
                        f"{args.steps} traced steps after {args.warmup + 1}"))
    batch = common.make_batch(args.batch, args.seq, cfg.model.vocab_size)
    workers = {"jax": profile_worker, **({"torch": torch_profile_worker} if args.twin else {})}
    results = {}
    for name, worker in workers.items():
        results[name] = common.in_worker(worker, cfg, batch, args.steps, args.warmup)
        if "error" in results[name]:
            raise SystemExit(f"error: the profiled {name} worker failed: {results[name]['error']}")
    print("\n" + table(results["jax"], results.get("torch")))
    return [{"framework": name, "config": cfg.name, "batch": args.batch, "seq": args.seq, **result}
            for name, result in results.items()]
