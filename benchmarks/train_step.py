"""One training step (forward, loss, backward, clipping, AdamW update, next lr) in JAX and in
PyTorch, on the same model, batch, dtype and device, against the matmul peak measured in the same
run: `python bench.py train`.

The JAX side is train.py's own step (train.compile_step over optimizer.make_optimizer), built as
train.py builds it; the PyTorch side is the twin (torch/model.py) with its optimizer and step
(torch/train.py): the same parameter groups, per-group lr, schedule and clipping.

Every measurement runs in its own freshly spawned process: the two frameworks never share thread
pools (an OpenMP pool left spinning by PyTorch would slow JAX down), and each row's peak memory is
its own. On a CPU, peak memory is the worker's resident-set high-water mark (VmHWM) over the
steps after the first, less its resident set once the framework was imported and started but
before the model was built; before those steps, memory freed by compilation is handed back to
the OS (common.reset_peak_rss). On a GPU it is the allocator's peak since the worker began. Both
frameworks are measured the same way, under the malloc setting each row records (--malloc,
common.MALLOCS). Compile time is the first step less a steady one, with no compilation
cache in either framework.
"""
from __future__ import annotations

import dataclasses
import statistics
import warnings

from benchmarks import common
from cli import format_table
from configs.base import Config, ConfigError, MeshConfig
from configs.load import load_config, preset_path

# (preset, batch, seq): CPU sizes keep the whole suite to a few minutes on two cores.
SUITE = {"cpu": [("quickstart", 8, 256), ("small_6x384", 8, 256), ("design_40m", 4, 256), ("gpt2_124m", 2, 256)],
         "gpu": [("quickstart", 64, 256), ("design_40m", 16, 1024), ("gpt2_124m", 16, 1024),
                 ("modern_160m", 8, 2048)]}
MODES = ("jit", "eager", "compile")   # JAX's jit; PyTorch eager and torch.compile
ATTN_IMPLS = ("xla", "einsum", "cudnn")


def framework(mode: str) -> str:
    return "jax" if mode == "jit" else "torch"


# --- The two steps, each in its own worker -------------------------------------------------------


def jax_step(cfg: Config, batch: dict, mesh=None):
    """train.py's initial state and jitted step on `mesh` (default: one device), built as
    train.Trainer builds them, and `batch` placed as the step takes it: (state, step, batch)."""
    import jax

    import optimizer
    import sharding
    import train
    mesh = mesh or sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    tx, schedule = optimizer.make_optimizer(cfg)
    _, shardings = train.state_layout(cfg, tx, mesh)
    state = jax.jit(train.init_state, static_argnums=(0, 1), out_shardings=shardings)(cfg, tx)
    step = train.compile_step(cfg, tx, schedule, mesh, shardings)
    return state, step, jax.device_put(batch, sharding.batch_sharding(mesh))


def measure_jax(cfg: Config, batch: dict, steps: int, warmup: int) -> dict:
    import jax

    import train  # noqa: F401  (imported before the baseline: only the model's memory counts)
    gpu = jax.default_backend() == "gpu"   # starts the backend: framework memory, as `import torch`
    base = common.rss_bytes()
    state, step, data = jax_step(cfg, batch)
    box = [state]

    def run():
        box[0], metrics = step(box[0], data)
        metrics["loss"].block_until_ready()
    first, seconds = common.time_steps(run, steps, warmup, reset_peak=(lambda: None) if gpu else common.reset_peak_rss)
    peak = jax.devices()[0].memory_stats()["peak_bytes_in_use"] if gpu else common.peak_rss() - base
    return {"seconds": seconds, "compile_s": first - seconds, "peak_mem_bytes": peak}


def torch_step(cfg: Config, batch: dict, mode: str, device: str):
    """The twin's step as torch/train.py builds it (mode "compile": its loss under torch.compile),
    and `batch` on `device`: (step, inputs, targets)."""
    import torch
    twin, twin_train = common.load_twin("model"), common.load_twin("train")
    torch.manual_seed(0)
    module = twin.GPT(cfg.model).to(device)
    opt, schedule = twin_train.make_optimizer(module, cfg)
    loss_fn = torch.compile(module.loss) if mode == "compile" else module.loss
    step = twin_train.make_step(module, opt, schedule, cfg.optim.clip_norm, loss_fn)
    inputs, targets = (torch.as_tensor(batch[k], dtype=torch.long, device=device) for k in ("inputs", "targets"))
    return step, inputs, targets


def measure_torch(cfg: Config, batch: dict, steps: int, warmup: int, mode: str, gpu: bool) -> dict:
    import torch
    if gpu and not torch.cuda.is_available():
        raise RuntimeError("JAX sees a GPU but this PyTorch build has no CUDA")
    # Compile from scratch, as JAX does (its persistent compilation cache is off by default).
    torch.compiler.config.force_disable_caches = True
    warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")
    for name in ("model", "train"):   # imported before the baseline: only the model's memory counts
        common.load_twin(name)
    base = common.rss_bytes()
    step, inputs, targets = torch_step(cfg, batch, mode, "cuda" if gpu else "cpu")
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    # JAX's allocator peak cannot be reset, so on a GPU neither is PyTorch's.
    reset = (lambda: None) if gpu else common.reset_peak_rss
    first, seconds = common.time_steps(lambda: (step(inputs, targets), sync()), steps, warmup, reset_peak=reset)
    peak = torch.cuda.max_memory_allocated() if gpu else common.peak_rss() - base
    return {"seconds": seconds, "compile_s": first - seconds if mode == "compile" else None, "peak_mem_bytes": peak}


# --- Cases ---------------------------------------------------------------------------------------


def bench_config(cfg: Config, batch: int, dtype: str | None, gpu: bool) -> Config:
    """The preset as measured: `dtype` compute (None: bfloat16 on a GPU, float32 on a CPU), the
    attention backend it runs there (layers.attention_backend: "auto" named as resolved), one
    micro-batch of `batch` sequences, one device. Optimizer settings stay the preset's."""
    import layers  # here, not at the top: a worker sets its device count before JAX is imported
    model_cfg = dataclasses.replace(cfg.model, compute_dtype=dtype or ("bfloat16" if gpu else "float32"))
    model_cfg = dataclasses.replace(model_cfg, attn_impl=layers.attention_backend(model_cfg, "gpu" if gpu else "cpu"))
    return dataclasses.replace(cfg, model=model_cfg, mesh=MeshConfig(),
                               train=dataclasses.replace(cfg.train, batch_size=batch, grad_accum=1))


def check_twin(cfg: Config) -> None:
    """A ConfigError, before anything is built, where the PyTorch twin cannot run `cfg`'s step."""
    if cfg.optim.name != "adamw":
        raise ConfigError(f"{cfg.name}: optim.name={cfg.optim.name!r}, but the PyTorch twin has AdamW "
                          f"only; add optim.name=adamw")


def cases(args, gpu: bool) -> list[tuple[Config, int]]:
    """(config as measured, seq) for --config or the suite; config errors fail in one line."""
    if args.config:
        config = load_config(args.config, args.overrides)
        specs = [(config, args.batch or 4, args.seq or min(256, config.model.max_len))]
    else:
        specs = [(load_config(preset_path(name), args.overrides), batch, seq)
                 for name, batch, seq in SUITE["gpu" if gpu else "cpu"]]
    out = []
    for cfg, batch, seq in specs:
        if seq > cfg.model.max_len:
            raise ConfigError(f"--seq {seq} exceeds {cfg.name}'s context of {cfg.model.max_len} tokens "
                              f"(model.seq_len)")
        if not args.layouts and set(args.modes) != {"jit"}:
            check_twin(cfg)
        out.append((bench_config(cfg, batch, args.dtype, gpu), seq))
    return out


def measure(cfg: Config, data: dict, args, mode: str, gpu: bool) -> dict:
    """One mode's step measured in a fresh worker (run_case calls it --repeats times per mode,
    the modes interleaved, so that a shared machine's drift falls on every mode alike)."""
    if mode == "jit":
        return common.in_worker(measure_jax, cfg, data, args.steps, args.warmup)
    return common.in_worker(measure_torch, cfg, data, args.steps, args.warmup, mode, gpu)


def median_result(results: list[dict]) -> dict:
    """The median of each measured figure over repeats; the first error if any repeat failed."""
    failed = [r for r in results if "error" in r]
    if failed:
        return failed[0]
    return {key: None if results[0][key] is None else statistics.median(r[key] for r in results)
            for key in results[0]}


def run_case(cfg: Config, seq: int, args, hw: dict, modes) -> list[dict]:
    """One row per mode: the median of --repeats workers, the modes interleaved."""
    import model
    batch = cfg.train.batch_size
    data = common.make_batch(batch, seq, cfg.model.vocab_size)
    flops = model.flops_per_token(cfg.model, seq)
    results = {mode: [] for mode in modes}
    for _ in range(args.repeats):
        for mode in modes:
            results[mode].append(measure(cfg, data, args, mode, hw["gpu"]))
    rows = []
    for mode in modes:
        result = median_result(results[mode])
        row = {"framework": framework(mode), "mode": mode, "config": cfg.name, "batch": batch, "seq": seq,
               "dtype": cfg.model.compute_dtype, "attn_impl": cfg.model.attn_impl,
               "malloc": common.malloc_label(), "repeats": args.repeats}   # the workers' environment
        if "error" in result:
            rows.append(row | {"error": result["error"]})
            continue
        tokens_per_s = batch * seq / result["seconds"]
        rows.append(row | {"ms_per_step": 1e3 * result["seconds"], "tokens_per_s": tokens_per_s,
                           "mfu": tokens_per_s * flops / hw["peak"], "peak_mem_bytes": result["peak_mem_bytes"],
                           "compile_s": result["compile_s"]})
    return rows


# --- Tables --------------------------------------------------------------------------------------


def case_title(cfg: Config, row: dict, args) -> str:
    import model
    m = cfg.model
    return (f"\n{cfg.name}: batch {row['batch']} x seq {row['seq']} = {row['batch'] * row['seq']:,} tokens/step, "
            f"{m.compute_dtype}, attn_impl {m.attn_impl}, {model.count_params(m) / 1e6:.1f}M params, "
            f"{model.flops_per_token(m, row['seq']) / 1e6:.1f} MFLOP/token; optim {cfg.optim.name}, "
            f"clip_norm {cfg.optim.clip_norm}, schedule {cfg.optim.schedule}; "
            f"median of {args.steps} steps after {args.warmup + 1} warmup steps"
            + (f", median of {args.repeats} workers per mode, interleaved" if args.repeats > 1 else ""))


def speed_cells(row: dict) -> list[str]:
    """ms/step, tokens/s and MFU, or "failed" (the reason is listed under the table)."""
    if "error" in row:
        return ["failed", "-", "-"]
    return [f"{row['ms_per_step']:,.1f}", f"{row['tokens_per_s']:,.0f}", f"{row['mfu']:.1%}"]


def failures(rows: list[dict]) -> str:
    return "".join(f"\n{r['mode']} on {r['config']} ({r['attn_impl']}) failed: {r['error'][:200]}"
                   for r in rows if "error" in r)


def case_table(rows: list[dict]) -> str:
    """framework, mode, ms/step, tokens/s, MFU, peak memory, compile seconds; then JAX's ratios."""
    table = [("framework", "mode", "ms/step", "tokens/s", "MFU", "peak mem", "compile s")]
    for r in rows:
        memory = "-" if "error" in r else f"{r['peak_mem_bytes'] / 2**20:,.0f} MiB"
        compile_s = "-" if r.get("compile_s") is None else f"{r['compile_s']:.1f}"
        table.append((r["framework"], r["mode"], *speed_cells(r), memory, compile_s))
    ok = [r for r in rows if "error" not in r]
    jax_row = next((r for r in ok if r["framework"] == "jax"), None)
    ratios = [f"{jax_row['tokens_per_s'] / r['tokens_per_s']:.2f}x vs torch {r['mode']}"
              for r in ok if jax_row and r["framework"] == "torch"]
    return (format_table(table, right=range(2, 7)) + failures(rows)
            + ("\nJAX/PyTorch throughput: " + ", ".join(ratios) if ratios else ""))


def layouts_table(rows: list[dict]) -> str:
    table = [("config", "attn_impl", "tokens", "ms/step", "tokens/s", "MFU")]
    table += [(r["config"], r["attn_impl"], f"{r['batch'] * r['seq']:,}", *speed_cells(r)) for r in rows]
    return format_table(table, right=range(2, 6)) + failures(rows)


# --- The subcommand ------------------------------------------------------------------------------


def memory_note(gpu: bool) -> str:
    """The header's line on what "peak mem" is and the malloc the workers run with (its
    tunables are on the header's environment line)."""
    peak = ("the device allocator's peak since the worker began" if gpu else "the worker's resident-set "
            "high-water mark after its first step, above its size with the framework started")
    return f"malloc {common.malloc_label()}; peak mem: {peak} (benchmarks/train_step.py)"


def run(args) -> list[dict]:
    """`bench.py train`: the --config model or the suite, each mode; with --layouts, JAX alone
    under each attention backend."""
    import layers
    cases(args, gpu=False)  # config errors fail before minutes are spent on workers
    hw = common.hardware(("jax", "torch") if not args.layouts else ("jax",))
    print(common.header("train", hw, f"MFU is over the highest matmul peak, {hw['peak'] / 1e9:,.0f} GFLOP/s\n"
                        + memory_note(hw["gpu"])))
    rows = []
    for cfg, seq in cases(args, hw["gpu"]):
        if args.layouts:
            for impl in ATTN_IMPLS:
                if impl != "cudnn" or layers.cudnn_fits(cfg.model, "gpu" if hw["gpu"] else "cpu"):
                    layout = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attn_impl=impl))
                    rows += run_case(layout, seq, args, hw, modes=("jit",))
            continue
        case_rows = run_case(cfg, seq, args, hw, args.modes)
        print(case_title(cfg, case_rows[0], args))
        print(case_table(case_rows), flush=True)
        rows += case_rows
    if args.layouts:
        print("\n" + layouts_table(rows))
    return rows
