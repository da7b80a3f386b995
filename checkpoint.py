"""Checkpoints, with Orbax: the manager train.py saves through, shape checks before anything is
restored, full-state restores for resuming, and the parameters alone for sampling, evaluation and
--init-from (no optimizer built). notes/training.md explains the choices.

A checkpoint step holds the items params, opt_state and meta ({"step"}), each a StandardSave, and
the run's config as JSON beside them; separate items let the parameters be restored alone,
whatever optimizer wrote them. Every error is one line naming the run, step or parameter at fault.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp

import model
from configs.base import Config, ConfigError
from configs.load import config_from_dict, config_to_dict

ITEMS = ("params", "opt_state", "meta")


def checkpoint_manager(directory: Path, keep: int) -> ocp.CheckpointManager:
    """The manager of a run's checkpoints/ folder, keeping the last `keep` steps it saves."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True)
    handlers = {name: ocp.StandardCheckpointHandler() for name in ITEMS}
    return ocp.CheckpointManager(Path(directory).absolute(), options=options,
                                 item_handlers={**handlers, "config": ocp.JsonCheckpointHandler()})


def save(manager: ocp.CheckpointManager, state: dict, cfg: Config) -> None:
    """Asynchronous save of parameters, optimizer state and step, with the config beside."""
    items = {"params": state["params"], "opt_state": state["opt_state"], "meta": {"step": state["step"]}}
    manager.save(int(state["step"]), args=ocp.args.Composite(
        config=ocp.args.JsonSave(config_to_dict(cfg)),
        **{name: ocp.args.StandardSave(item) for name, item in items.items()}))


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
    """Restore the named items of checkpoint `step` onto the abstract state's shapes (and
    shardings, if its leaves carry them: Orbax reshards on load). The abstract state needs the
    entries the names read: params always, opt_state for "opt_state", step for "meta"."""
    check_shapes(manager, step, abstract_state["params"])
    abstract = {"params": abstract_state["params"], "opt_state": abstract_state.get("opt_state"),
                "meta": {"step": abstract_state.get("step")}}
    try:
        got = manager.restore(step, args=ocp.args.Composite(
            **{name: ocp.args.StandardRestore(abstract[name]) for name in names}))
    except ValueError:
        if "opt_state" not in names:
            raise
        # The parameters matched, so the optimizer state's layout differs.
        raise ConfigError(f"checkpoint step {step} in {manager.directory}: its optimizer state does not fit "
                          f"this config's optim settings (optimizer, clipping); resume with "
                          f"the optim config that wrote it, or start a new run with --init-from") from None
    return {name: got[name] for name in names}


def abstract_params(cfg: Config, shardings=None) -> dict:
    """The parameters' shapes and dtypes, computed without allocating them; with `shardings` (a
    tree like the parameters', e.g. sharding.param_shardings), each leaf carries its sharding."""
    abstract = jax.eval_shape(lambda: model.init_params(cfg.model, jax.random.key(0)))
    if shardings is None:
        return abstract
    return jax.tree.map(lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where),
                        abstract, shardings)


def restore_params(cfg: Config, directory: Path, step: int, shardings=None) -> dict:
    """The parameters alone of checkpoint `step` in `directory`, checked against cfg.model's shapes
    and placed by `shardings` if given (else as Orbax lays them out on this process's devices).
    No optimizer is built, so any optimizer may have written them."""
    with checkpoint_manager(directory, keep=cfg.train.keep_checkpoints) as manager:
        abstract = {"params": abstract_params(cfg, shardings)}
        return restore(manager, step, abstract, names=("params",))["params"]


def find_checkpoint(run: str, step: int | None) -> tuple[Config, Path, int]:
    """A train.py run directory's config, its checkpoint directory and the step to load (`step`,
    else the latest); errors name the --run or --step flag at fault."""
    run_dir = Path(run)
    if not (run_dir / "config.json").is_file():
        raise ConfigError(f"--run {run}: no train.py run there ({run_dir / 'config.json'} is missing)")
    cfg = config_from_dict(json.loads((run_dir / "config.json").read_text()))
    directory = run_dir / "checkpoints"
    if not directory.is_dir():
        raise ConfigError(f"--run {run}: no checkpoints yet ({directory} is missing)")
    with checkpoint_manager(directory, cfg.train.keep_checkpoints) as manager:
        steps = sorted(manager.all_steps())
    if not steps:
        raise ConfigError(f"--run {run}: no checkpoints yet in {directory}")
    if step is not None and step not in steps:
        raise ConfigError(f"--step {step}: {run} has checkpoints at steps {', '.join(map(str, steps))}")
    return cfg, directory, steps[-1] if step is None else step
