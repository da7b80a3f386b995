"""Time the full training step (forward, loss, backward, AdamW update) of one model in JAX and in
PyTorch, on the same batch, dtype and device, against the device's measured matmul peak.

    python bench.py --config configs/design_40m.py [model.n_layers=8 ...] \
        [--batch 4 --seq 256 --steps 10 --dtype float32|bfloat16 --json rows.json]
    python bench.py --suite [key=value ...] [--steps N --json rows.json]   # the standard presets
    python bench.py --layouts [--config ...]            # JAX only: each attn_impl side by side

Every measurement runs in its own freshly spawned process: the two frameworks never share thread
pools (an OpenMP pool left spinning by PyTorch would slow JAX down), and each row's peak memory is
its own. On a CPU, peak memory is the rise of the resident set over the process's size before the
model was built, up to the last step; on a GPU it is the allocator's peak. Compile time is the first
step less a steady one, with no compilation cache in either framework. The workers run with glibc
malloc keeping freed memory mapped (MALLOC_REUSE; --default-malloc to compare). The run ends by
saying how busy other processes kept the machine: on a shared machine, rerun when that is ~0.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import multiprocessing
import os
import platform
import resource
import statistics
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from configs.base import Config, ConfigError, ModelConfig, OptimConfig, load_config

ROOT = Path(__file__).resolve().parent
# AdamW as train.py configures it by default (constant lr, no clipping), the same in both frameworks.
OPTIM = OptimConfig()
# (preset, batch, seq): CPU sizes keep the whole suite to a few minutes on two cores.
SUITE = {"cpu": [("quickstart", 8, 256), ("design_40m", 4, 256), ("gpt2_124m", 2, 256)],
         "gpu": [("quickstart", 64, 256), ("design_40m", 16, 1024), ("gpt2_124m", 16, 1024),
                 ("modern_160m", 8, 2048)]}
MODES = [("jax", "jit"), ("torch", "eager"), ("torch", "compile")]
# XLA:CPU allocates each step's temporaries afresh and glibc hands large blocks back to the OS, so
# every step page-faulted ~90K freshly zeroed pages (a quarter of a quickstart step in the kernel).
# One arena that never uses mmap or trims keeps them mapped. Both frameworks' workers get it.
MALLOC_REUSE = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776"


def decayed_names(cfg: ModelConfig) -> frozenset[str]:
    """Dotted paths of the parameters that get weight decay: train.py's rule, every group but
    the scalars (norm gains and biases)."""
    import jax

    import train
    groups = jax.tree_util.tree_flatten_with_path(train.param_groups(Config(model=cfg)))[0]
    return frozenset(".".join(k.key for k in path) for path, group in groups if group != "scalar")


def load_torch_model():
    """torch/model.py, loaded by path: the folder has no __init__.py so `import torch` is PyTorch."""
    spec = importlib.util.spec_from_file_location("torch_model", ROOT / "torch" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict:
    tokens = np.random.default_rng(seed).integers(0, vocab, (batch, seq + 1), dtype=np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


# --- Peak memory ---------------------------------------------------------------------------------


def _vm_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak_rss() -> None:
    """Reset the kernel's resident-set high-water mark to the current resident set."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss() -> int:
    return _vm_kb("VmHWM") * 1024


def cpu_seconds() -> tuple[float, float]:
    """(CPU-seconds the whole machine has been busy, of which this process and its ended workers)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:9]]
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    own = sum(getattr(resource.getrusage(who), field) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for field in ("ru_utime", "ru_stime"))
    return busy, own


# --- Timing --------------------------------------------------------------------------------------


def time_steps(run, steps: int, warmup: int, reset_peak=lambda: None) -> tuple[float, float]:
    """(seconds of the first call, median seconds of `steps` calls after `warmup` more).
    `reset_peak` runs just before the timed calls, so peak memory covers the steady state."""
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    for _ in range(warmup):
        run()
    reset_peak()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def matmul_peak(framework: str, gpu: bool, reps: int = 10) -> float:
    """FLOP/s of a large square matmul: fp32 on a CPU, bf16 on a GPU (run in a worker)."""
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


# --- The two training steps ----------------------------------------------------------------------


def jax_optimizer(decayed: frozenset[str]):
    import jax
    import optax
    mask = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: ".".join(k.key for k in path) in decayed, params)
    return optax.adamw(OPTIM.lr, OPTIM.b1, OPTIM.b2, OPTIM.eps, weight_decay=OPTIM.weight_decay, mask=mask)


def jax_train_step(cfg: ModelConfig, opt):
    """jit(params, opt_state, batch) -> (params, opt_state, loss), the state donated."""
    import jax
    import optax

    import model

    def step(params, opt_state, batch):
        (loss, _), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(params, batch, cfg)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss
    return jax.jit(step, donate_argnums=(0, 1))


def torch_optimizer(module, decayed: frozenset[str]):
    import torch
    named = list(module.named_parameters())
    groups = [{"params": [p for name, p in named if name in decayed], "weight_decay": OPTIM.weight_decay},
              {"params": [p for name, p in named if name not in decayed], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=OPTIM.lr, betas=(OPTIM.b1, OPTIM.b2), eps=OPTIM.eps)


def torch_train_step(loss_fn, opt):
    """step(inputs, targets) -> loss: forward, loss, backward, AdamW update."""
    def step(inputs, targets):
        loss, _ = loss_fn(inputs, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


# --- Workers: one measurement per fresh process --------------------------------------------------


def measure_jax(cfg: ModelConfig, batch: dict, steps: int, warmup: int, decayed: frozenset[str]) -> dict:
    import jax

    import model
    gpu = jax.default_backend() == "gpu"
    base = _vm_kb("VmRSS") * 1024
    params = model.init_params(cfg, jax.random.key(0))
    opt = jax_optimizer(decayed)
    state = [params, opt.init(params)]
    data = jax.device_put({k: np.asarray(v) for k, v in batch.items()})
    step = jax_train_step(cfg, opt)

    def run():
        state[0], state[1], loss = step(state[0], state[1], data)
        loss.block_until_ready()
    first, seconds = time_steps(run, steps, warmup, reset_peak=(lambda: None) if gpu else reset_peak_rss)
    peak = jax.devices()[0].memory_stats()["peak_bytes_in_use"] if gpu else peak_rss() - base
    return {"seconds": seconds, "compile_s": first - seconds, "peak_mem_bytes": peak}


def measure_torch(cfg: ModelConfig, batch: dict, steps: int, warmup: int, decayed: frozenset[str],
                  mode: str, gpu: bool) -> dict:
    import torch
    if gpu and not torch.cuda.is_available():
        raise RuntimeError("JAX sees a GPU but this PyTorch build has no CUDA")
    device = "cuda" if gpu else "cpu"
    # Compile from scratch, as JAX does (its persistent compilation cache is off by default).
    torch.compiler.config.force_disable_caches = True
    warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")
    base = _vm_kb("VmRSS") * 1024
    torch.manual_seed(0)
    module = load_torch_model().GPT(cfg).to(device)
    opt = torch_optimizer(module, decayed)
    step = torch_train_step(torch.compile(module.loss) if mode == "compile" else module.loss, opt)
    inputs, targets = (torch.as_tensor(batch[k], dtype=torch.long, device=device) for k in ("inputs", "targets"))
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    reset = torch.cuda.reset_peak_memory_stats if gpu else reset_peak_rss
    first, seconds = time_steps(lambda: (step(inputs, targets), sync()), steps, warmup, reset_peak=reset)
    peak = torch.cuda.max_memory_allocated() if gpu else peak_rss() - base
    return {"seconds": seconds, "compile_s": first - seconds if mode == "compile" else None, "peak_mem_bytes": peak}


def device_info(framework: str) -> dict:
    """The framework's version, whether JAX sees a GPU, the device's name and its matmul peak."""
    if framework == "jax":
        import jax
        gpu = jax.default_backend() == "gpu"
        name = jax.devices()[0].device_kind if gpu else cpu_name()
        return {"version": jax.__version__, "gpu": gpu, "name": name, "peak": matmul_peak("jax", gpu)}
    import torch
    gpu = torch.cuda.is_available()
    return {"version": torch.__version__, "gpu": gpu, "peak": matmul_peak("torch", gpu)}


def cpu_name() -> str:
    """The CPU's model name and core count, for benchmark headers (bench.py, data.py, sample.py)."""
    with open("/proc/cpuinfo") as f:
        model_name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                          platform.processor())
    return f"{model_name}, {multiprocessing.cpu_count()} cores"


def in_worker(fn, *args):
    """fn(*args) in a freshly spawned process; an exception there comes back as {"error": ...}."""
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(fn, *args).result()
    except Exception as err:  # a failed torch.compile is a result to report, not a crash
        return {"error": f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"}


# --- Sharding strategies on simulated devices (--mesh) -------------------------------------------

MESH_DEVICES = 4
MESH_LAYOUTS = {"dp": ["mesh.data=4"], "fsdp": ["mesh.data=1", "mesh.fsdp=4"]}


def measure_mesh(config: str, overrides: list, strategy: str, batch: int, seq: int, steps: int,
                 warmup: int) -> dict:
    """train.py's sharded step on MESH_DEVICES simulated CPU devices: time and bytes per device."""
    os.environ["JAX_NUM_CPU_DEVICES"] = str(MESH_DEVICES)  # this fresh worker has not started jax yet
    import jax

    import sharding
    import train
    cfg = load_config(config, [*overrides, f"mesh.strategy={strategy}", *MESH_LAYOUTS[strategy],
                               f"model.seq_len={seq}", f"train.batch_size={batch}"])
    mesh = sharding.make_mesh(cfg.mesh)
    tx, schedule = train.make_optimizer(cfg)
    _, shardings = train.state_layout(cfg, tx, mesh)
    state = [jax.jit(train.init_state, static_argnums=(0, 1), out_shardings=shardings)(cfg, tx)]
    step = train.compile_step(cfg, tx, schedule, mesh, shardings)
    data = jax.device_put(make_batch(batch, seq, cfg.model.vocab_size), sharding.batch_sharding(mesh))

    def run():
        state[0], metrics = step(state[0], data)
        metrics["loss"].block_until_ready()
    compile_s, seconds = time_steps(run, steps, warmup)
    per_device = {item: sum(sharding.bytes_per_device(a.shape, a.dtype, a.sharding)
                            for a in jax.tree.leaves(state[0][item])) for item in ("params", "opt_state")}
    return {"config": cfg.name, "strategy": strategy, "devices": MESH_DEVICES, "batch": batch, "seq": seq,
            "ms_per_step": seconds * 1e3, "tokens_per_s": batch * seq / seconds, "compile_s": compile_s,
            "params_bytes_per_device": per_device["params"], "opt_bytes_per_device": per_device["opt_state"]}


def mesh_main(args) -> list[dict]:
    config = args.config or str(ROOT / "configs" / "quickstart.py")
    batch, seq, steps = args.batch or 8, args.seq or 256, args.steps or 5
    rows = [in_worker(measure_mesh, config, args.overrides, s, batch, seq, steps, args.warmup)
            for s in MESH_LAYOUTS]
    for row in rows:
        if "error" in row:
            raise SystemExit(f"error: {row['error']}")
    print(f"bench.py --mesh  {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  |  {cpu_name()}, "
          f"{MESH_DEVICES} simulated devices  |  {rows[0]['config']}, batch {batch} x {seq}, median of {steps}")
    print("| strategy | ms/step | tokens/s | params / device | optimizer state / device | step time vs dp | memory vs dp |")
    print("|---|---|---|---|---|---|---|")
    base = rows[0]
    for r in rows:
        total = r["params_bytes_per_device"] + r["opt_bytes_per_device"]
        base_total = base["params_bytes_per_device"] + base["opt_bytes_per_device"]
        print(f"| {r['strategy']} | {r['ms_per_step']:,.1f} | {r['tokens_per_s']:,.0f} | "
              f"{r['params_bytes_per_device'] / 2**20:,.2f} MiB | {r['opt_bytes_per_device'] / 2**20:,.2f} MiB | "
              f"{r['ms_per_step'] / base['ms_per_step']:.2f}x | {total / base_total:.2f}x |")
    return rows


# --- Cases and tables ----------------------------------------------------------------------------


def cudnn_fits(cfg: ModelConfig, gpu: bool) -> bool:
    """cuDNN flash attention's shape rules: a GPU, 16-bit compute, head_dim a multiple of 8 up to 128."""
    return gpu and cfg.compute_dtype in ("bfloat16", "float16") and cfg.head_size % 8 == 0 and cfg.head_size <= 128


def for_device(cfg: ModelConfig, gpu: bool) -> ModelConfig:
    return dataclasses.replace(cfg, attn_impl="cudnn") if cudnn_fits(cfg, gpu) else cfg


def run_case(name: str, cfg: ModelConfig, batch: int, seq: int, steps: int, warmup: int, dev: dict,
             modes=MODES) -> list[dict]:
    """One row per (framework, mode), each measured in its own process."""
    import model
    data, decayed = make_batch(batch, seq, cfg.vocab_size), decayed_names(cfg)
    tokens, flops = batch * seq, model.flops_per_token(cfg, seq)
    rows = []
    for framework, mode in modes:
        if framework == "jax":
            result = in_worker(measure_jax, cfg, data, steps, warmup, decayed)
        else:
            result = in_worker(measure_torch, cfg, data, steps, warmup, decayed, mode, dev["gpu"])
        row = {"framework": framework, "mode": mode, "config": name, "batch": batch, "seq": seq,
               "dtype": cfg.compute_dtype, "attn_impl": cfg.attn_impl}
        if "error" in result:
            rows.append(row | {"error": result["error"]})
            continue
        tokens_per_s = tokens / result["seconds"]
        rows.append(row | {"ms_per_step": 1e3 * result["seconds"], "tokens_per_s": tokens_per_s,
                           "mfu": tokens_per_s * flops / dev["peak"], "peak_mem_bytes": result["peak_mem_bytes"],
                           "compile_s": result["compile_s"]})
    return rows


def devices() -> dict:
    """The device both frameworks see, their versions and matmul peaks; MFU uses the higher peak."""
    jax_dev, torch_dev = in_worker(device_info, "jax"), in_worker(device_info, "torch")
    for dev in (jax_dev, torch_dev):
        if "error" in dev:
            raise SystemExit(f"error: cannot measure the device: {dev['error']}")
    return jax_dev | {"torch_version": torch_dev["version"], "jax_peak": jax_dev["peak"],
                      "torch_peak": torch_dev["peak"], "peak": max(jax_dev["peak"], torch_dev["peak"])}


def print_header(dev: dict) -> None:
    unit = "bf16 8192^3" if dev["gpu"] else "fp32 2048^3"
    print(f"bench.py  {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  |  {dev['name']}  |  "
          f"jax {dev['version']}, torch {dev['torch_version']}, python {platform.python_version()}")
    print(f"matmul peak ({unit}, median): jax {dev['jax_peak'] / 1e9:,.0f} GFLOP/s, torch "
          f"{dev['torch_peak'] / 1e9:,.0f} GFLOP/s; MFU is over the higher, {dev['peak'] / 1e9:,.0f} GFLOP/s")


def print_case(name: str, cfg: ModelConfig, rows: list[dict], steps: int, warmup: int) -> None:
    import model
    r = rows[0]
    print(f"\n{name}: batch {r['batch']} x seq {r['seq']} = {r['batch'] * r['seq']:,} tokens/step, "
          f"{cfg.compute_dtype}, attn_impl {cfg.attn_impl}, {model.count_params(cfg) / 1e6:.1f}M params, "
          f"{model.flops_per_token(cfg, r['seq']) / 1e6:.1f} MFLOP/token; "
          f"median of {steps} steps after {warmup + 1} warmup steps")
    print(f"{'framework':<10}{'mode':<9}{'ms/step':>9}{'tokens/s':>10}{'MFU':>7}{'peak mem':>11}{'compile s':>11}")
    for r in rows:
        if "error" in r:
            print(f"{r['framework']:<10}{r['mode']:<9}  failed: {r['error'][:100]}")
            continue
        compile_s = "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}"
        print(f"{r['framework']:<10}{r['mode']:<9}{r['ms_per_step']:>9.1f}{r['tokens_per_s']:>10,.0f}"
              f"{r['mfu']:>7.1%}{r['peak_mem_bytes'] / 2**20:>8,.0f} MiB{compile_s:>11}")
    jax_row = next((r for r in rows if r["framework"] == "jax" and "error" not in r), None)
    ratios = [f"{jax_row['tokens_per_s'] / r['tokens_per_s']:.2f}x vs torch {r['mode']}"
              for r in rows if jax_row and r["framework"] == "torch" and "error" not in r]
    if ratios:
        print("JAX/PyTorch throughput: " + ", ".join(ratios))


def print_layouts(rows: list[dict]) -> None:
    print(f"\n{'config':<13}{'attn_impl':<11}{'tokens':>8}{'ms/step':>9}{'tokens/s':>10}{'MFU':>7}")
    for r in rows:
        if "error" in r:
            print(f"{r['config']:<13}{r['attn_impl']:<11}  failed: {r['error'][:100]}")
            continue
        print(f"{r['config']:<13}{r['attn_impl']:<11}{r['batch'] * r['seq']:>8,}{r['ms_per_step']:>9.1f}"
              f"{r['tokens_per_s']:>10,.0f}{r['mfu']:>7.1%}")


# --- Command line --------------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise SystemExit(f"error: {message}")


def parse_args(argv):
    parser = Parser(description="Time a training step in JAX and PyTorch on the same model and batch.")
    parser.add_argument("--config", help="a preset file, e.g. configs/design_40m.py")
    parser.add_argument("overrides", nargs="*", help="section.field=value, e.g. model.n_layers=8 (with --suite: "
                        "applied to every preset)")
    parser.add_argument("--batch", type=int, help="sequences per step (default 4)")
    parser.add_argument("--seq", type=int, help="tokens per sequence (default 256, or the context if shorter)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10; 5 in --suite)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (default 2)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                        help="compute dtype (default float32 on a CPU, bfloat16 on a GPU)")
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--suite", action="store_true", help="the standard presets at sizes fitting the device")
    parser.add_argument("--layouts", action="store_true",
                        help="JAX only, each attention backend (attn_impl) on the --config or suite models")
    parser.add_argument("--mesh", action="store_true", help=f"JAX only: train.py's step under dp and fsdp on "
                        f"{MESH_DEVICES} simulated CPU devices (default configs/quickstart.py)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc malloc at its defaults (see MALLOC_REUSE)")
    args = parser.parse_args(argv)
    if args.suite and args.config:
        parser.error("give --config or --suite, not both")
    if not (args.config or args.suite or args.layouts or args.mesh):
        parser.error("give --config configs/NAME.py, --suite, --layouts or --mesh")
    if not args.config and not args.mesh and (args.batch or args.seq):
        parser.error("--batch and --seq go with --config; the suite's sizes are fixed (SUITE in bench.py)")
    for name in ("batch", "seq", "steps"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        parser.error(f"--json {args.json}: its folder does not exist")
    return args


def cases(args, gpu: bool) -> list[tuple[str, ModelConfig, int, int]]:
    """(name, model config, batch, seq) to run; config errors fail in one line."""
    if args.config:
        config = load_config(args.config, args.overrides)
        specs = [(config.name, config.model, args.batch or 4, args.seq or min(256, config.model.max_len))]
    else:
        specs = [(name, load_config(ROOT / "configs" / f"{name}.py", args.overrides).model, b, t)
                 for name, b, t in SUITE["gpu" if gpu else "cpu"]]
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    out = []
    for name, cfg, batch, seq in specs:
        if seq > cfg.max_len:
            raise ConfigError(f"--seq {seq} exceeds {name}'s context of {cfg.max_len} tokens (model.seq_len)")
        out.append((name, for_device(dataclasses.replace(cfg, compute_dtype=dtype), gpu), batch, seq))
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        cases(args, gpu=False)  # validate before spending minutes on workers
    except ConfigError as err:
        raise SystemExit(f"error: {err}")
    if not args.default_malloc:
        os.environ["GLIBC_TUNABLES"] = MALLOC_REUSE  # read by each spawned worker at startup
    if args.mesh:
        rows = mesh_main(args)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
        return
    start_busy, start_own, start = *cpu_seconds(), time.perf_counter()
    dev = devices()
    steps = args.steps or (5 if args.suite or not args.config else 10)
    print_header(dev)
    rows = []
    for name, cfg, batch, seq in cases(args, dev["gpu"]):
        if args.layouts:
            for impl in ("xla", "einsum") + (("cudnn",) if cudnn_fits(cfg, dev["gpu"]) else ()):
                rows += run_case(name, dataclasses.replace(cfg, attn_impl=impl), batch, seq, steps,
                                 args.warmup, dev, modes=MODES[:1])
            continue
        case_rows = run_case(name, cfg, batch, seq, steps, args.warmup, dev)
        print_case(name, cfg, case_rows, steps, args.warmup)
        rows += case_rows
    if args.layouts:
        print_layouts(rows)
    busy, own = cpu_seconds()
    others = (busy - start_busy - (own - start_own)) / (time.perf_counter() - start)
    print(f"\nother processes kept {max(others, 0):.1f} of {multiprocessing.cpu_count()} cores busy during this run"
          + ("; the timings above are contended" if others > 0.1 else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
        print(f"\nwrote {len(rows)} rows to {args.json}")


if __name__ == "__main__":
    main()
