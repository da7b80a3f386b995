"""Train a GPT: python train.py --config configs/NAME.py [section.field=value ...]

Sections: command line, optimizer, train state and step, checkpoints, evaluation, logging, the
loop. The step is one jit-compiled pure function of (state, batch) with the state donated;
metrics are read one step late so the host never waits on the device.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from optax import contrib

# Without PyTorch installed (it is only a dev requirement), the twin's folder torch/ would import as
# an empty namespace package named torch, which tensorboardX takes for PyTorch; None in sys.modules
# makes `import torch` fail as it should.
if getattr(importlib.util.find_spec("torch"), "origin", None) is None:
    sys.modules["torch"] = None
from tensorboardX import SummaryWriter  # noqa: E402

import data
import model
import sharding
from configs.base import Config, ConfigError, OptimConfig, config_to_dict, load_config

# --- Command line --------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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


# --- Optimizer -----------------------------------------------------------------------------------

GROUPS = ("hidden", "embed", "unembed", "scalar")


def param_groups(cfg: Config) -> dict:
    """Each parameter's optimizer group: hidden matrices, embeddings, the output head, or
    scalars (norm gains and biases)."""
    def group(path, spec):
        name = getattr(path[-1], "key", None)
        if spec.matrix is not None:
            return "hidden"
        return {"embed": "embed", "pos_embed": "embed", "unembed": "unembed"}.get(name, "scalar")
    return jax.tree_util.tree_map_with_path(group, model.param_specs(cfg.model), is_leaf=model.is_spec)


def lr_schedule(o: OptimConfig, steps: int, peak: float) -> optax.Schedule:
    """Linear warmup to `peak`, then cosine, linear, constant or warmup-stable-decay down to
    min_lr_ratio x peak at the last step."""
    # The peak is reached at step warmup_steps - 1; decay runs from there (wsd: from the start of
    # its final decay_fraction) to the last step, steps - 1.
    decay_start = max(o.warmup_steps - 1, 0)
    if o.schedule == "wsd":
        decay_start = max(decay_start, int(steps * (1 - o.decay_fraction)) - 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warmup = jnp.minimum(1.0, (step + 1) / max(o.warmup_steps, 1))
        progress = jnp.clip((step - decay_start) / max(steps - 1 - decay_start, 1), 0.0, 1.0)
        shape = {"cosine": 0.5 * (1 + jnp.cos(jnp.pi * progress)), "linear": 1 - progress,
                 "wsd": 1 - progress, "constant": jnp.ones_like(progress)}[o.schedule]
        floor = 1.0 if o.schedule == "constant" else o.min_lr_ratio
        return peak * warmup * (floor + (1 - floor) * shape)
    return schedule


def make_optimizer(cfg: Config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """optax: AdamW for every group, or Muon on the hidden matrices; decay on matrices only."""
    o, steps = cfg.optim, cfg.train.steps
    specs = model.param_specs(cfg.model)

    def adamw(lr, decay):
        return optax.adamw(lr_schedule(o, steps, lr), o.b1, o.b2, o.eps, weight_decay=decay)
    if o.name == "muon":
        dims = jax.tree.map(lambda s: contrib.MuonDimensionNumbers(*s.matrix) if s.matrix else None,
                            specs, is_leaf=model.is_spec)
        hidden = contrib.muon(lr_schedule(o, steps, o.lr), beta=o.muon_momentum, weight_decay=o.weight_decay,
                              muon_weight_dimension_numbers=dims)
    else:
        hidden = adamw(o.lr, o.weight_decay)
    tx = optax.multi_transform({
        "hidden": hidden,
        "embed": adamw(o.embed_lr or o.lr, o.weight_decay),
        "unembed": adamw(o.unembed_lr or o.lr, o.weight_decay),
        "scalar": adamw(o.scalar_lr or o.lr, 0.0),
    }, param_groups(cfg))
    if o.clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(o.clip_norm), tx)
    return tx, lr_schedule(o, steps, o.lr)


# --- Train state and step ------------------------------------------------------------------------


def init_state(cfg: Config, tx: optax.GradientTransformation) -> dict:
    """Parameters, optimizer state and step. Nothing in the model draws random numbers while
    training, so the state holds no RNG key; a stochastic layer would fold one from
    (train.seed, step), which resumes exactly with no key saved."""
    key = jax.random.key(cfg.train.seed)
    params = model.init_params(cfg.model, jax.random.fold_in(key, 0))
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
        (loss, _), g = grad_fn(state["params"], micro_batch, cfg.model)
        return jax.tree.map(jnp.add, grads, g), loss
    zeros = jax.tree.map(jnp.zeros_like, state["params"])
    grads, losses = jax.lax.scan(accumulate, zeros, micro)
    grads = jax.tree.map(lambda g: g / accum, grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": jnp.mean(losses), "lr": schedule(state["step"]),
               "grad_norm": optax.global_norm(grads), "update_norm": optax.global_norm(updates)}
    return {**state, "params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics


def compile_step(cfg: Config, tx, schedule, mesh, shardings: dict):
    """The jitted step: the state donated and kept in its layout, the batch split over (data, fsdp)."""
    replicated = sharding.NamedSharding(mesh, sharding.PartitionSpec())
    return jax.jit(lambda s, b: train_step(s, b, cfg, tx, schedule), donate_argnums=0,
                   in_shardings=(shardings, sharding.batch_sharding(mesh)), out_shardings=(shardings, replicated))


def eval_step(params, batch, cfg: Config):
    """Summed (not mean) validation loss and token count of one batch, for exact means."""
    _, metrics = model.loss_fn(params, batch, cfg.model)
    return metrics["ce"] * metrics["tokens"], metrics["tokens"]


# --- Checkpoints ---------------------------------------------------------------------------------

ITEMS = ("params", "opt_state", "meta")


def checkpoint_manager(directory: Path, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True)
    handlers = {name: ocp.StandardCheckpointHandler() for name in ITEMS}
    return ocp.CheckpointManager(directory.absolute(), options=options,
                                 item_handlers={**handlers, "config": ocp.JsonCheckpointHandler()})


def save(manager: ocp.CheckpointManager, state: dict, cfg: Config) -> None:
    """Asynchronous save of parameters, optimizer state and step, with the config beside."""
    args = {"params": state["params"], "opt_state": state["opt_state"],
            "meta": {"step": state["step"]}}
    manager.save(int(state["step"]), args=ocp.args.Composite(
        config=ocp.args.JsonSave(config_to_dict(cfg)),
        **{name: ocp.args.StandardSave(item) for name, item in args.items()}))


def check_shapes(manager: ocp.CheckpointManager, step: int, abstract_params) -> None:
    """One line naming the first parameter whose saved shape differs from the config's."""
    saved = manager.item_metadata(step)["params"]
    saved_flat = dict(jax.tree_util.tree_flatten_with_path(saved)[0])
    for path, want in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
        name = jax.tree_util.keystr(path)
        got = saved_flat.get(path)
        if got is None or tuple(got.shape) != tuple(want.shape):
            got_text = "is missing" if got is None else f"has shape {tuple(got.shape)}"
            raise ConfigError(f"checkpoint step {step} in {manager.directory}: parameter {name} {got_text} "
                              f"but the config gives {tuple(want.shape)}; use another train.run_dir or "
                              f"the config that wrote it (nothing was deleted)")


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: dict, names=ITEMS) -> dict:
    """Restore the named items of checkpoint `step` onto the abstract state's shapes."""
    check_shapes(manager, step, abstract_state["params"])
    abstract = {"params": abstract_state["params"], "opt_state": abstract_state["opt_state"],
                "meta": {"step": abstract_state["step"]}}
    try:
        got = manager.restore(step, args=ocp.args.Composite(
            **{name: ocp.args.StandardRestore(abstract[name]) for name in names}))
    except ValueError:  # the parameters matched, so the optimizer state's layout differs
        raise ConfigError(f"checkpoint step {step} in {manager.directory}: its optimizer state does not fit "
                          f"this config's optim settings (optimizer, clipping); resume with "
                          f"the optim config that wrote it, or start a new run with --init-from") from None
    return {name: got[name] for name in names}


def initial_state(cfg: Config, tx, manager, init_from: str | None, shardings: dict) -> dict:
    """Resume from the run's latest checkpoint, else start from --init-from's parameters or from a
    fresh init; either way created directly in its sharded layout (restores reshard on load)."""
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract_state(cfg, tx), shardings)
    step = manager.latest_step()
    if step is not None:
        got = restore(manager, step, abstract)
        say(f"resuming from step {step} ({manager.directory})")
        return {"params": got["params"], "opt_state": got["opt_state"], **got["meta"]}
    state = jax.jit(init_state, static_argnums=(0, 1), out_shardings=shardings)(cfg, tx)
    if init_from:
        source = Path(init_from)
        source = source / "checkpoints" if (source / "checkpoints").is_dir() else source
        with checkpoint_manager(source, keep=1) as other:
            other_step = other.latest_step()
            if other_step is None:
                raise ConfigError(f"--init-from {init_from}: no checkpoint found in {source}")
            params = restore(other, other_step, abstract, names=("params",))["params"]
        say(f"initialized parameters from {source} step {other_step}")
        opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
        state = {**state, "params": params, "opt_state": opt_state}
    return state


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
            if name != "step":
                self.writer.add_scalar(name, value, step)
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        print(self.line(record), flush=True)

    def line(self, r: dict) -> str:
        eta = (self.total - r["step"]) * r["step_time"]
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "n/a"
        val = f" | val {r['val_loss']:.4f}" if "val_loss" in r else ""
        return (f"step {r['step']:>{len(str(self.total))}}/{self.total} | loss {r['loss']:.4f}{val} | "
                f"lr {r['lr']:.2e} | {r['tokens_per_s']:,.0f} tok/s | MFU {mfu} | "
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
        self.mesh = sharding.make_mesh(cfg.mesh)
        sharding.check_batch(cfg.train.batch_size, cfg.train.grad_accum, self.mesh)
        self.tx, schedule = make_optimizer(cfg)
        abstract, shardings = state_layout(cfg, self.tx, self.mesh)
        say(sharding.table(cfg.model, cfg.mesh.strategy, self.mesh, abstract, shardings))
        self.manager = checkpoint_manager(self.dir / "checkpoints", cfg.train.keep_checkpoints)
        self.state = initial_state(cfg, self.tx, self.manager, args.init_from, shardings)
        self.start = int(self.state["step"])
        process = (jax.process_index(), jax.process_count())
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        self.batches = data.train_batches(cfg, self.start, *process)
        self.val = [self.to_global(b) for b in data.val_batches(cfg, *process)]
        self.val_bytes = data.val_bytes(cfg)
        self.step_fn = compile_step(cfg, self.tx, schedule, self.mesh, shardings)
        replicated = sharding.NamedSharding(self.mesh, sharding.PartitionSpec())
        self.eval_fn = jax.jit(lambda p, b: eval_step(p, b, cfg), out_shardings=replicated)
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
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, x, (rows, *x.shape[1:]))
                for k, x in local.items()}

    def flush(self) -> None:
        if self.pending is None:
            return
        step, metrics, val = jax.device_get(self.pending)
        self.pending = None
        metrics = {k: float(v) for k, v in metrics.items()}
        if not math.isfinite(metrics["loss"]):
            last = self.manager.latest_step()
            self.manager.wait_until_finished()
            raise SystemExit(f"error: non-finite loss {metrics['loss']} at step {step}; nothing saved "
                             f"for it, the last good checkpoint is step {last} in {self.manager.directory}")
        if val is not None:
            total, tokens = float(val[0]), float(val[1])
            val = {"val_loss": total / tokens}
            if self.val_bytes:
                val["val_bpb"] = total / (math.log(2) * self.val_bytes)
        t = self.cfg.train
        logged = step % t.log_every == 0 or step in (self.start + 1, t.steps) or val is not None
        if logged and self.logger:
            self.logger.log(step, metrics, val)

    def run(self, stop_after: int | None) -> None:
        t = self.cfg.train
        stop = StopSignal()
        end = t.steps if stop_after is None else min(t.steps, self.start + stop_after)
        done = self.start
        for done in range(self.start + 1, end + 1):
            self.state, metrics = self.step_fn(self.state, self.to_global(next(self.batches)))
            val = None
            if done % t.eval_every == 0 or done == t.steps:
                val = evaluate(self.eval_fn, self.state["params"], self.val)
            self.flush()  # the previous step's metrics: this step is already queued
            self.pending = (done, metrics, val)
            if done % t.ckpt_every == 0 or done == end or stop.name:
                self.flush()
                save(self.manager, self.state, self.cfg)
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
        elif done < t.steps:
            say(f"stopped after step {done} (--stop-after): checkpoint saved to {where}")
        else:
            say(f"done: {t.steps} steps; checkpoints in {where}, logs in {self.dir}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.stop_after is not None and args.stop_after < 1:
        raise SystemExit(f"error: --stop-after={args.stop_after} must be a positive number of steps")
    init_distributed(args)
    try:
        trainer = Trainer(load_config(args.config, args.overrides), args)
    except ConfigError as err:
        raise SystemExit(f"error: {err}")
    trainer.run(args.stop_after)


if __name__ == "__main__":
    main()
