"""Train a GPT: python train.py --config configs/NAME.py [section.field=value ...]

Sections: command line, train state and step, evaluation, logging, the loop. The optimizer is in
optimizer.py, checkpoints in checkpoint.py. The step is one jit-compiled pure function of
(state, batch) with the state donated; metrics are read one step late so the host never waits on
the device.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

# Without PyTorch installed (it is only a dev requirement), the twin's folder torch/ would import as
# an empty namespace package named torch, which tensorboardX takes for PyTorch; None in sys.modules
# makes `import torch` fail as it should.
if getattr(importlib.util.find_spec("torch"), "origin", None) is None:
    sys.modules["torch"] = None
from tensorboardX import SummaryWriter  # noqa: E402

import checkpoint
import cli
import data
import layers
import model
import optimizer
import plot
import runs
import sharding
import tasks
from configs.base import Config, ConfigError
from configs.load import config_to_dict, load_config

# tensorboardX warns about every non-finite scalar; the non-finite guard reports it in one line.
logging.getLogger("tensorboardX").setLevel(logging.ERROR)

# --- Command line --------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = cli.Parser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="a preset, e.g. configs/quickstart.py")
    parser.add_argument("--init-from", help="start from another run's parameters (fine-tuning)")
    parser.add_argument("--stop-after", type=int, help="save and exit after this many steps of this "
                        "invocation (time-sliced jobs); the run resumes where it stopped")
    parser.add_argument("--coordinator", help="host:port of process 0, for multi-process runs")
    parser.add_argument("--num-processes", type=int, help="processes in a multi-process run")
    parser.add_argument("--process-id", type=int, help="this process's index in [0, num-processes)")
    parser.add_argument("overrides", nargs="*", help="section.field=value, e.g. train.steps=200")
    return parser.parse_args(argv)


def say(*parts) -> None:
    """Console output, from process 0 only."""
    if jax.process_index() == 0:
        print(*parts, flush=True)


def init_distributed(args) -> None:
    """Join the run's other processes. Flags or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
    JAX_PROCESS_ID name them (localhost, bare clusters); SLURM and TPU pods are detected by
    jax.distributed itself. A single process needs none of it."""
    env = os.environ
    address = args.coordinator or env.get("JAX_COORDINATOR_ADDRESS")
    if address:
        count = args.num_processes or int(env.get("JAX_NUM_PROCESSES", "0"))
        index = args.process_id if args.process_id is not None else int(env.get("JAX_PROCESS_ID", "-1"))
        if count < 1 or not 0 <= index < count:
            raise SystemExit(f"error: coordinator {address} needs --num-processes N >= 1 and --process-id in "
                             f"[0, N); got N={count}, id={index}")
        jax.distributed.initialize(address, count, index)
    elif int(env.get("SLURM_NTASKS", "1")) > 1:
        # jax gives each SLURM task the one GPU of its local rank; a task per node takes them all.
        gpus = int(env.get("SLURM_GPUS_ON_NODE", "0"))
        one_per_node = int(env.get("SLURM_NTASKS_PER_NODE", "1")) == 1
        jax.distributed.initialize(local_device_ids=list(range(gpus)) if one_per_node and gpus > 1 else None)
    elif "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize()


def run_dir(cfg: Config) -> Path:
    return Path(cfg.train.run_dir or f"runs/{cfg.name}")


# --- Train state and step ------------------------------------------------------------------------


def init_state(cfg: Config, tx: optax.GradientTransformation) -> dict:
    """Parameters, optimizer state and step. Nothing in the model draws random numbers while
    training, so the state holds no RNG key; a stochastic layer would fold one from
    (train.seed, step), which resumes exactly with no key saved."""
    key = jax.random.key(cfg.train.seed)
    return state_at_start(model.init_params(cfg.model, jax.random.fold_in(key, 0)), tx)


def state_at_start(params, tx: optax.GradientTransformation) -> dict:
    """The state at step 0 around `params`: fresh ones, or another run's (--init-from)."""
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}


def abstract_state(cfg: Config, tx) -> dict:
    """The state's shapes and dtypes, computed without allocating it."""
    return jax.eval_shape(lambda: init_state(cfg, tx))


def state_layout(cfg: Config, tx, mesh) -> tuple[dict, dict]:
    """The abstract state and where each of its leaves lives on the mesh."""
    abstract = abstract_state(cfg, tx)
    params = sharding.param_shardings(cfg.model, cfg.mesh.strategy, mesh)
    return abstract, sharding.state_shardings(abstract, params, mesh)


def train_step(state, batch, cfg: Config, tx, schedule):
    """One optimizer update from train.grad_accum micro-batches, accumulated with lax.scan."""
    accum = cfg.train.grad_accum
    # Micro-batch i takes rows i, i + accum, ...: every device keeps its own rows in each one.
    micro = jax.tree.map(lambda x: x.reshape(-1, accum, *x.shape[1:]).swapaxes(0, 1), batch)
    grad_fn = jax.value_and_grad(model.loss_fn, has_aux=True)

    def accumulate(grads, micro_batch):
        (loss, model_metrics), micro_grads = grad_fn(state["params"], micro_batch, cfg.model)
        # The forward pass's own extras (auxiliary losses, router statistics) go to the logs.
        extras = {name: value for name, value in model_metrics.items() if name not in ("ce", "z", "tokens")}
        return jax.tree.map(jnp.add, grads, micro_grads), (loss, extras)
    zeros = jax.tree.map(jnp.zeros_like, state["params"])
    grads, (losses, extras) = jax.lax.scan(accumulate, zeros, micro)
    grads = jax.tree.map(lambda grad: grad / accum, grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": jnp.mean(losses), "lr": schedule(state["step"]),
               "grad_norm": optax.global_norm(grads), "update_norm": optax.global_norm(updates),
               **{name: jnp.mean(value, axis=0) for name, value in extras.items()}}
    return {**state, "params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics


def compile_step(cfg: Config, tx, schedule, mesh, shardings: dict):
    """The jitted step: the state donated and kept in its layout, the batch split over (data, fsdp)."""
    return jax.jit(lambda state, batch: train_step(state, batch, cfg, tx, schedule), donate_argnums=0,
                   in_shardings=(shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(shardings, sharding.replicated(mesh)))


def eval_step(params, batch, cfg: Config):
    """Summed (not mean) validation loss and token count of one batch, for exact means."""
    _, metrics = model.loss_fn(params, batch, cfg.model)
    return metrics["ce"] * metrics["tokens"], metrics["tokens"]


def initial_state(cfg: Config, tx, manager, init_from: str | None, shardings: dict) -> dict:
    """Resume from the run's latest checkpoint, else start from --init-from's parameters or from a
    fresh init; either way created directly in its sharded layout (restores reshard on load)."""
    abstract = jax.tree.map(lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where),
                            abstract_state(cfg, tx), shardings)
    resumed = checkpoint.resume(manager, abstract)    # the newest intact step; damaged ones moved aside
    if resumed is not None:
        step, got = resumed
        say(f"resuming from step {step} ({manager.directory})")
        return {"params": got["params"], "opt_state": got["opt_state"], **got["meta"]}
    if not init_from:
        return jax.jit(init_state, static_argnums=(0, 1), out_shardings=shardings)(cfg, tx)
    source = Path(init_from)
    source = source / "checkpoints" if (source / "checkpoints").is_dir() else source
    fix = "give a train.py run directory or its checkpoints/ folder"
    if not source.is_dir():   # checked here: nothing may be created where the flag points
        raise ConfigError(f"--init-from {init_from}: no checkpoint found in {source}; {fix}")
    try:
        source_step, params = runs.load_params(cfg, source, shardings=shardings["params"])
    except checkpoint.CheckpointError as err:
        raise ConfigError(f"--init-from {init_from}: {err}; {fix}") from None
    say(f"initialized parameters from {source} step {source_step}")
    start = jax.jit(state_at_start, static_argnums=1, out_shardings=shardings, donate_argnums=0)
    return start(params, tx)


# --- Evaluation ----------------------------------------------------------------------------------


def evaluate(eval_fn, params, val: list[dict]):
    """Validation loss summed over the fixed budget, left on the device (fetched with the logs)."""
    total, tokens = jnp.zeros(()), jnp.zeros(())
    for batch in val:
        nll, n = eval_fn(params, batch)
        total, tokens = total + nll, tokens + n
    return total, tokens


# --- Logging -------------------------------------------------------------------------------------

# Dense bf16 peak FLOP/s per device, matched against jax's device_kind.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 125e12,
              "V100": 125e12, "TPU v6": 918e12, "TPU v5p": 459e12, "TPU v5": 197e12, "TPU v4": 275e12}


def device_peak_flops(cfg: Config) -> float | None:
    if cfg.train.peak_flops:
        return cfg.train.peak_flops
    kind = jax.devices()[0].device_kind
    return next((peak for name, peak in PEAK_FLOPS.items() if name.lower() in kind.lower()), None)


class Logger:
    """One record per logged step to the console, tensorboardX and metrics.jsonl (floats at full
    precision, so runs compare bit for bit)."""

    def __init__(self, cfg: Config, directory: Path, start_step: int):
        self.cfg, self.total = cfg, cfg.train.steps
        self.tokens_per_step = cfg.train.batch_size * cfg.model.seq_len
        self.flops_per_token = model.flops_per_token(cfg.model, cfg.model.seq_len)
        self.peak = device_peak_flops(cfg)
        self.writer = SummaryWriter(str(directory / "tb"))
        self.jsonl = open(directory / "metrics.jsonl", "a")
        self.last_step, self.last_time = start_step, time.perf_counter()

    def log(self, step: int, metrics: dict, val: dict | None) -> None:
        now = time.perf_counter()
        dt = (now - self.last_time) / max(step - self.last_step, 1)
        self.last_step, self.last_time = step, now
        record = {"step": step, **metrics, "tokens": step * self.tokens_per_step,
                  "tokens_per_s": self.tokens_per_step / dt, "step_time": dt, **(val or {})}
        if self.peak:
            record["mfu"] = record["tokens_per_s"] * self.flops_per_token / (self.peak * jax.device_count())
        for name, value in record.items():
            if isinstance(value, list):   # a per-layer metric (MoE load, drops): one curve per layer
                for layer, item in enumerate(value):
                    self.writer.add_scalar(f"{name}/{layer}", item, step)
            elif name != "step":
                self.writer.add_scalar(name, value, step)
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        print(self.line(record), flush=True)

    def line(self, record: dict) -> str:
        eta = (self.total - record["step"]) * record["step_time"]
        mfu = f"{record['mfu']:.1%}" if "mfu" in record else "n/a"
        val = f" | val {record['val_loss']:.4f}" if "val_loss" in record else ""
        return (f"step {record['step']:>{len(str(self.total))}}/{self.total} | loss {record['loss']:.4f}{val} | "
                f"lr {record['lr']:.2e} | {record['tokens_per_s']:,.0f} tok/s | MFU {mfu} | "
                f"ETA {int(eta // 60)}m{int(eta % 60):02d}s")

    def close(self) -> None:
        self.writer.close()
        self.jsonl.close()


# --- The loop ------------------------------------------------------------------------------------


class StopSignal:
    """SIGTERM / SIGINT (preemption, Ctrl-C) set a flag; the loop finishes the step and saves."""

    def __init__(self):
        self.name = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.catch)

    def catch(self, signum, frame):
        self.name = signal.Signals(signum).name


class Trainer:
    """Holds the run's pieces; `flush` logs the pending step and guards against non-finite loss."""

    def __init__(self, cfg: Config, args):
        self.cfg, self.dir = cfg, run_dir(cfg)
        data.check_dataset(cfg)    # missing data or an unwritable run_dir: one line before anything is built
        attention = layers.attention_backend(cfg.model, jax.default_backend())   # cuDNN off a GPU: here too
        checkpoint.prepare_run_dir(self.dir)
        self.mesh = sharding.make_mesh(cfg.mesh)
        sharding.check_batch(cfg.train.batch_size, cfg.train.grad_accum, self.mesh)
        self.tx, schedule = optimizer.make_optimizer(cfg)
        abstract, shardings = state_layout(cfg, self.tx, self.mesh)
        say(sharding.table(cfg.model, cfg.mesh.strategy, self.mesh, abstract, shardings))
        say(f"attention: {attention}")
        self.manager = checkpoint.checkpoint_manager(self.dir / "checkpoints", cfg.train.keep_checkpoints)
        self.state = initial_state(cfg, self.tx, self.manager, args.init_from, shardings)
        self.start = int(self.state["step"])
        process = (jax.process_index(), jax.process_count())
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        self.batches = data.train_batches(cfg, self.start, *process)
        self.val = [self.to_global(b) for b in data.val_batches(cfg, *process)]
        self.val_bytes = data.val_bytes(cfg)
        self.tasks = tasks.TaskRunner(cfg, self.mesh)    # eval.tasks, read and checked before training
        self.step_fn = compile_step(cfg, self.tx, schedule, self.mesh, shardings)
        self.eval_fn = jax.jit(lambda params, batch: eval_step(params, batch, cfg),
                               out_shardings=sharding.replicated(self.mesh))
        self.pending = None
        self.logger = None
        if jax.process_index() == 0:  # one writer: process 0 logs and writes the config
            self.dir.mkdir(parents=True, exist_ok=True)
            self.logger = Logger(cfg, self.dir, self.start)
            # Written only once the checkpoint's shapes and the data have been checked.
            (self.dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))

    def to_global(self, local: dict) -> dict:
        """This process's rows of a batch -> one global array sharded over (data, fsdp)."""
        rows = self.cfg.train.batch_size
        return {name: jax.make_array_from_process_local_data(self.batch_sharding, part, (rows, *part.shape[1:]))
                for name, part in local.items()}

    def flush(self) -> None:
        if self.pending is None:
            return
        step, metrics, val = jax.device_get(self.pending)
        self.pending = None
        metrics = {name: value.tolist() for name, value in metrics.items()}   # floats, or per-layer lists
        if not math.isfinite(metrics["loss"]):
            self.manager.wait_until_finished()
            raise SystemExit(f"error: non-finite loss {metrics['loss']} at step {step}; nothing saved for it, "
                             f"{checkpoint.newest_text(self.manager)}"
                             f"{checkpoint.divergence_hint(self.cfg)}")
        if val is not None:
            total, tokens = float(val[0]), float(val[1])
            val = {"val_loss": total / tokens, **val[2]}    # and each eval.tasks NAME/acc_norm, NAME/acc
            if self.val_bytes:
                val["val_bpb"] = total / (math.log(2) * self.val_bytes)
        train_cfg = self.cfg.train
        logged = (step % train_cfg.log_every == 0 or step in (self.start + 1, train_cfg.steps)
                  or val is not None)
        if logged and self.logger:
            self.logger.log(step, metrics, val)

    def run(self, stop_after: int | None) -> None:
        train_cfg = self.cfg.train
        stop = StopSignal()
        end = train_cfg.steps if stop_after is None else min(train_cfg.steps, self.start + stop_after)
        done = self.start
        for done in range(self.start + 1, end + 1):
            self.state, metrics = self.step_fn(self.state, self.to_global(next(self.batches)))
            val = None
            if done % self.cfg.eval.every == 0 or done == train_cfg.steps:
                val = (*evaluate(self.eval_fn, self.state["params"], self.val), self.tasks(self.state["params"]))
            self.flush()  # the previous step's metrics: this step is already queued
            self.pending = (done, metrics, val)
            if done % train_cfg.ckpt_every == 0 or done == end or stop.name:
                self.flush()
                checkpoint.save(self.manager, self.state, self.cfg)
                draw_curves(self.dir)
            if stop.name:
                break
        self.flush()
        self.manager.wait_until_finished()
        if self.logger:
            self.logger.close()
        where = self.manager.directory
        if stop.name:
            say(f"stopped by {stop.name} after step {done}: checkpoint saved to {where}; "
                f"run the same command to resume")
        elif done < train_cfg.steps:
            say(f"stopped after step {done} (--stop-after): checkpoint saved to {where}")
        else:
            say(f"done: {train_cfg.steps} steps; checkpoints in {where}, logs in {self.dir}")


def draw_curves(directory: Path) -> None:
    """loss.png in the run directory, redrawn at each checkpoint: a picture of the run without
    tensorboard (process 0 only; nothing to draw before the first logged step)."""
    if jax.process_index() == 0 and (directory / "metrics.jsonl").is_file():
        plot.plot_runs([directory], directory / "loss.png", title=directory.name)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.stop_after is not None and args.stop_after < 1:
        raise SystemExit(f"error: --stop-after={args.stop_after} must be a positive number of steps")
    init_distributed(args)
    try:
        trainer = Trainer(load_config(args.config, args.overrides), args)
    except ConfigError as err:
        raise SystemExit(f"error: {err}")
    try:
        trainer.run(args.stop_after)
    except ConfigError as err:    # a bad batch, a non-finite state: the checkpoints saved so far stay
        trainer.manager.wait_until_finished()
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
