"""Paired A/B of JAX training steps in one process: `python bench.py ab`.

On a shared machine a step's time drifts by tens of percent within minutes, so two settings timed
in separate processes, even interleaved, cannot tell apart a change of a few percent
(notes/benchmarks.md). Here every variant's step is compiled in one worker with its own state,
and each round runs one step of every variant back to back (the order reversed every other
round). Each variant's figure is the median over rounds of its time divided by the baseline's in
the same round: drift slower than a round cancels.

A variant is `NAME` or `NAME:ITEM,ITEM,...`. An ITEM is a config override (`model.remat=full`) or
an XLA compile option (`xla_cpu_...=value`, passed to this variant's compile alone, which an
XLA_FLAGS setting could not do within one process). The first variant is the baseline. Every
variant holds its own training state, so memory grows with their number. Compute is float32 on a
CPU and bfloat16 on a GPU (--dtype), with cuDNN attention where it fits, as `bench.py train`.
"""
from __future__ import annotations

import statistics
import time

from benchmarks import common, train_step
from cli import format_table
from configs.base import ConfigError
from configs.load import apply_overrides, load_config, preset_path


def parse_variant(text: str) -> tuple[str, list[str], dict]:
    """"NAME:ITEM,..." -> (name, config overrides, XLA compile options)."""
    name, _, items = text.partition(":")
    if not name or "=" in name:
        raise ConfigError(f"--variant {text!r}: give NAME or NAME:ITEM,ITEM (e.g. remat_full:model.remat=full)")
    overrides, options = [], {}
    for item in filter(None, items.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"--variant {text!r}: item {item!r} needs KEY=VALUE (section.field=value or xla_...=value)")
        if key.startswith("xla_"):   # XLA parses the value's text, but takes booleans as True / False only
            options[key] = {"true": True, "false": False}.get(value.lower(), value)
        else:
            overrides.append(item)
    return name, overrides, options


def variants(args, gpu: bool) -> list[tuple[str, object, dict]]:
    """(name, config as measured, compile options) per --variant; every config error in one line
    before anything compiles."""
    base = load_config(args.config or str(preset_path("small_6x384")), args.overrides)
    parsed = [parse_variant(text) for text in args.variant or ["base"]]
    names = [name for name, _, _ in parsed]
    if len(set(names)) != len(names):
        raise ConfigError(f"--variant names must differ: {', '.join(names)}")
    out = []
    for name, overrides, options in parsed:
        cfg = train_step.bench_config(apply_overrides(base, overrides), args.batch, args.dtype, gpu)
        if args.seq > cfg.model.max_len:
            raise ConfigError(f"--seq {args.seq} exceeds {cfg.name}'s context of {cfg.model.max_len} tokens")
        out.append((name, cfg, options))
    return out


def check_options(specs) -> None:
    """Every variant's compile options, tried on a trivial program before any step compiles."""
    import jax
    for name, _, options in specs:
        try:
            jax.jit(lambda x: x + 1).lower(1.0).compile(options or None)
        except Exception as err:   # XLA's message names the option and the value it refused
            raise ConfigError(f"--variant {name}: {str(err).splitlines()[0]}") from None


def ab_worker(specs, batch: dict, rounds: int, warmup: int) -> list[dict]:
    """Compile every variant's step, warm each up, then time `rounds` rounds of one step each."""
    check_options(specs)
    runs = []
    for name, cfg, options in specs:
        state, step, data = train_step.jax_step(cfg, batch)
        start = time.perf_counter()
        compiled = step.lower(state, data).compile(options or None)
        compile_s = time.perf_counter() - start
        for _ in range(warmup + 1):
            state, metrics = compiled(state, data)
            metrics["loss"].block_until_ready()
        runs.append({"name": name, "step": compiled, "state": state, "data": data, "times": [],
                     "compile_s": compile_s, "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
                     "loss": float(metrics["loss"])})
    for r in range(rounds):
        for run in runs if r % 2 == 0 else runs[::-1]:
            start = time.perf_counter()
            run["state"], metrics = run["step"](run["state"], run["data"])
            metrics["loss"].block_until_ready()
            run["times"].append(time.perf_counter() - start)
    return [{k: run[k] for k in ("name", "times", "compile_s", "temp_bytes", "loss")} for run in runs]


def summarize(results: list[dict], flops_per_step: list[float], peak: float) -> list[dict]:
    """Per variant: median seconds, MFU, and its per-round ratio to the baseline: median and quartiles."""
    base = results[0]["times"]
    rows = []
    for result, flops in zip(results, flops_per_step):
        ratios = [t / b for t, b in zip(result["times"], base)]
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        seconds = statistics.median(result["times"])
        rows.append({**result, "seconds": seconds, "mfu": flops / seconds / peak, "ratio": statistics.median(ratios),
                     "ratio_q1": quartiles[0], "ratio_q3": quartiles[-1]})
    return rows


def table(rows: list[dict]) -> str:
    head = ("variant", "ms/step", "MFU", f"paired ratio to {rows[0]['name']}", "middle half of rounds",
            "temporaries", "compile s", "loss after warmup")
    body = [(row["name"], f"{1e3 * row['seconds']:,.1f}", f"{row['mfu']:.1%}", f"{row['ratio']:.3f}",
             f"{row['ratio_q1']:.3f}-{row['ratio_q3']:.3f}", f"{row['temp_bytes'] / 2**20:,.0f} MiB",
             f"{row['compile_s']:.1f}", f"{row['loss']:.5f}") for row in rows]
    return format_table([head, *body], right=(1, 2, 3, 4, 5, 6, 7))


def run(args) -> list[dict]:
    """`bench.py ab`: the variants' paired table."""
    import model
    variants(args, gpu=False)   # config errors fail before the matmul peak is measured
    hw = common.hardware(("jax",))
    specs = variants(args, hw["gpu"])
    cfg = specs[0][1]
    print(common.header("ab", hw, f"{cfg.name}: batch {args.batch} x seq {args.seq}, {cfg.model.compute_dtype}, "
                        f"malloc {common.malloc_label()}; {args.rounds} paired rounds after {args.warmup + 1} steps "
                        f"each; MFU over {hw['peak'] / 1e9:,.0f} GFLOP/s"))
    batch = common.make_batch(args.batch, args.seq, cfg.model.vocab_size)
    results = common.in_worker(ab_worker, specs, batch, args.rounds, args.warmup)
    if isinstance(results, dict):
        if results["error"].startswith("ConfigError: "):
            raise ConfigError(results["error"].removeprefix("ConfigError: "))
        raise SystemExit(f"error: the A/B worker failed: {results['error']}")
    tokens = args.batch * args.seq
    rows = summarize(results, [tokens * model.flops_per_token(c.model, args.seq) for _, c, _ in specs], hw["peak"])
    print("\n" + table(rows))
    return rows
