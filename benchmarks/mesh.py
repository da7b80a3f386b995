"""train.py's sharded step under each strategy on simulated CPU devices: time per step and the
parameter and optimizer bytes each device holds, against dp in the same run: `python bench.py mesh`.

The devices share the machine's cores, so collectives are memory copies competing with the
compute: the table measures the bookkeeping of each strategy, not its speed on real hardware.
"""
from __future__ import annotations

import os

from benchmarks import common
from benchmarks.train_step import jax_step
from cli import format_table
from configs.base import ConfigError
from configs.load import load_config, preset_path

DEVICES = 4
STRATEGIES = {"dp": ["mesh.data=4"], "fsdp": ["mesh.data=1", "mesh.fsdp=4"]}   # dp first: the baseline


def measure(config: str, overrides: list, strategy: str, batch: int, seq: int, steps: int, warmup: int) -> dict:
    """One strategy in a fresh worker: ms per step and bytes per device of the params and optimizer state."""
    os.environ["JAX_PLATFORMS"] = "cpu"  # this fresh worker has not started jax yet
    os.environ["JAX_NUM_CPU_DEVICES"] = str(DEVICES)
    import jax

    import sharding
    cfg = load_config(config, [*overrides, f"mesh.strategy={strategy}", *STRATEGIES[strategy],
                               f"train.batch_size={batch}", "train.grad_accum=1"])
    state, step, data = jax_step(cfg, common.make_batch(batch, seq, cfg.model.vocab_size), sharding.make_mesh(cfg.mesh))
    box = [state]

    def run():
        box[0], metrics = step(box[0], data)
        metrics["loss"].block_until_ready()
    compile_s, seconds = common.time_steps(run, steps, warmup)
    per_device = {item: sum(sharding.bytes_per_device(a.shape, a.dtype, a.sharding)
                            for a in jax.tree.leaves(box[0][item])) for item in ("params", "opt_state")}
    return {"config": cfg.name, "strategy": strategy, "devices": DEVICES, "batch": batch, "seq": seq,
            "ms_per_step": seconds * 1e3, "tokens_per_s": batch * seq / seconds, "compile_s": compile_s,
            "params_bytes_per_device": per_device["params"], "opt_bytes_per_device": per_device["opt_state"]}


def table(rows: list[dict]) -> str:
    base = rows[0]
    base_bytes = base["params_bytes_per_device"] + base["opt_bytes_per_device"]
    out = [("strategy", "ms/step", "tokens/s", "params / device", "optimizer state / device",
            "step time vs dp", "memory vs dp")]
    for r in rows:
        total = r["params_bytes_per_device"] + r["opt_bytes_per_device"]
        out.append((r["strategy"], f"{r['ms_per_step']:,.1f}", f"{r['tokens_per_s']:,.0f}",
                    f"{r['params_bytes_per_device'] / 2**20:,.2f} MiB", f"{r['opt_bytes_per_device'] / 2**20:,.2f} MiB",
                    f"{r['ms_per_step'] / base['ms_per_step']:.2f}x", f"{total / base_bytes:.2f}x"))
    return format_table(out, right=range(1, 7))


def run(args) -> list[dict]:
    """`bench.py mesh`: dp and fsdp over DEVICES simulated devices, each in its own worker."""
    config = args.config or str(preset_path("quickstart"))
    cfg = load_config(config, args.overrides)  # config errors fail before any worker starts
    if args.seq > cfg.model.max_len:
        raise ConfigError(f"--seq {args.seq} exceeds {cfg.name}'s context of {cfg.model.max_len} tokens")
    if args.batch % DEVICES:
        raise ConfigError(f"--batch {args.batch} must be a multiple of the {DEVICES} devices")
    hw = common.hardware(("jax",))
    rows = [common.in_worker(measure, config, args.overrides, strategy, args.batch, args.seq, args.steps,
                             args.warmup) for strategy in STRATEGIES]
    for row in rows:
        if "error" in row:
            raise SystemExit(f"error: {row['error']}")
    print(common.header("mesh", hw, f"{DEVICES} simulated CPU devices · {cfg.name}, batch {args.batch} x "
                        f"{args.seq}, {cfg.model.compute_dtype}, optim {cfg.optim.name} · median of {args.steps}"))
    print(table(rows))
    return rows
