"""A trained run, for sampling, evaluation, export and --init-from: its config, the checkpoint
step to load, and its parameters alone, restored through checkpoint.py with no optimizer built
(so any optimizer may have written them). Every error names the --run or --step at fault."""
from __future__ import annotations

from pathlib import Path

import jax

import checkpoint
import model
from configs.base import Config, ConfigError
from configs.load import run_config


def abstract_params(cfg: Config, shardings=None) -> dict:
    """The parameters' shapes and dtypes, computed without allocating them; with `shardings` (a
    tree like the parameters', e.g. sharding.param_shardings), each leaf carries its sharding."""
    abstract = jax.eval_shape(lambda: model.init_params(cfg.model, jax.random.key(0)))
    if shardings is None:
        return abstract
    return jax.tree.map(lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where),
                        abstract, shardings)


def _restore(manager, step: int, abstract: dict) -> dict:
    return checkpoint.restore(manager, step, {"params": abstract}, names=("params",))["params"]


def restore_params(cfg: Config, directory: Path, step: int, shardings=None) -> dict:
    """The parameters alone of checkpoint `step` in `directory`, checked against cfg.model's shapes
    and placed by `shardings` if given (else as Orbax lays them out on this process's devices).
    No optimizer is built, so any optimizer may have written them."""
    with checkpoint.checkpoint_manager(directory, None, read_only=True) as manager:
        return _restore(manager, step, abstract_params(cfg, shardings))


def load_params(cfg: Config, directory: Path, step: int | None = None, shardings=None,
                say=checkpoint.warn) -> tuple[int, dict]:
    """(step, parameters) of checkpoint `step`, or by default of the newest step whose parameters
    read back whole, for sampling and evaluation: newer damaged steps are reported through `say`,
    one line each, and left where they are (the run may still be training)."""
    abstract = abstract_params(cfg, shardings)
    with checkpoint.checkpoint_manager(directory, None, read_only=True) as manager:
        if step is not None:
            return step, _restore(manager, step, abstract)
        steps = sorted(manager.all_steps(), reverse=True)
        if not steps:
            raise checkpoint.CheckpointError(f"no checkpoint found in {directory}")
        damaged = []
        for candidate in steps:
            try:
                params = _restore(manager, candidate, abstract)
            except checkpoint.Damaged as err:
                damaged.append(err)
                continue
            for err in damaged:
                say(f"warning: {err}; using step {candidate}")
            return candidate, params
    raise checkpoint.CheckpointError(f"no checkpoint in {directory} has readable parameters"
                                     + "".join(f"; step {err.step}: {err.why}" for err in damaged))


def find_checkpoint(run: str, step: int | None) -> tuple[Config, Path, int]:
    """A train.py run directory's config, its checkpoint directory and the step to load (`step`,
    else the latest); errors name the --run or --step flag at fault."""
    cfg = run_config(run)
    directory = Path(run) / "checkpoints"
    if not directory.is_dir():
        raise ConfigError(f"--run {run}: no checkpoints yet ({directory} is missing)")
    with checkpoint.checkpoint_manager(directory, None, read_only=True) as manager:
        steps = sorted(manager.all_steps())
    if not steps:
        raise ConfigError(f"--run {run}: no checkpoints yet in {directory}")
    if step is not None and step not in steps:
        raise ConfigError(f"--step {step}: {run} has checkpoints at steps {', '.join(map(str, steps))}")
    return cfg, directory, steps[-1] if step is None else step
