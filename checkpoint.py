"""Checkpoints, with Orbax: the manager train.py saves through, a finiteness check before every
save, shape checks before anything is restored, integrity checks with a fallback to the newest
intact step, and full-state restores for resuming; runs.py restores a run's parameters alone.
notes/training.md explains the choices.

A checkpoint step holds the items params, opt_state and meta ({"step"}), each a StandardSave, and
the run's config as JSON beside them; separate items let the parameters be restored alone,
whatever optimizer wrote them. Every error is one line naming the run, step or parameter at fault.

    python checkpoint.py verify runs/NAME      # each step: intact, or damaged and why
"""
from __future__ import annotations

import contextlib
import gc
import logging
import sys
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

import cli
from configs.base import Config, ConfigError
from configs.load import config_to_dict

ITEMS = ("params", "opt_state", "meta")
# Where a damaged step is moved. Orbax takes a directory for a step only if its name is digits or
# ends in "_" + digits, so it never lists these again.
DAMAGED = "damaged-{step}"
SANE_LR = 1.0    # no optimizer here trains with a peak learning rate above this


class CheckpointError(ConfigError):
    """A one-line checkpoint problem naming the step and directory (damage, a diverged state)."""


class Damaged(CheckpointError):
    """A checkpoint step that cannot be read back whole; `why` says what is wrong."""

    def __init__(self, step: int, directory, why: str):
        super().__init__(f"checkpoint step {step} in {directory} is damaged: {why}")
        self.step, self.why = step, why


def warn(line: str) -> None:
    """A one-line warning on stderr, from process 0 only."""
    if jax.process_index() == 0:
        print(line, file=sys.stderr, flush=True)


def _drop_orbax_leftovers() -> None:
    """After a read fails, Orbax abandons the others: they report themselves when collected, or
    later from its threads into the event loop it has closed, through sys.unraisablehook and the
    asyncio logger ("Task exception was never retrieved"). Filter those for good (installed once);
    anything else passes."""
    hook = sys.unraisablehook
    if getattr(hook, "drops_orbax_leftovers", False):
        return
    marks = ("_read_array_index", "async_deserialize", "event loop is closed", "ocdbt", "tensorstore")

    def leftover(text: str) -> bool:
        return any(mark in text.lower() for mark in marks)

    def filtered(unraisable):
        if not leftover(f"{unraisable.object!r} {unraisable.exc_value!r}"):
            hook(unraisable)
    filtered.drops_orbax_leftovers = True
    sys.unraisablehook = filtered
    logging.getLogger("asyncio").addFilter(lambda record: not leftover(record.getMessage()))


@contextlib.contextmanager
def quiet():
    """Mute what Orbax prints around a damaged checkpoint (absl warnings, leftovers of abandoned
    reads), so the caller reports it in one line."""
    _drop_orbax_leftovers()
    # An abandoned read that never started warns through `warnings` when collected, here or later.
    # Added on every call, since a test harness resets the warning filters between tests.
    warnings.filterwarnings("ignore", r"coroutine '[^']*_read_array_index", RuntimeWarning)
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        gc.collect()    # most leftovers come as the abandoned reads are collected
        absl.setLevel(level)


def describe(err: BaseException) -> str:
    """The innermost cause of an Orbax error, first line only (TensorStore appends a spec dump)."""
    while err.__cause__ or err.__context__:
        err = err.__cause__ or err.__context__
    text = str(err).strip().split(" See full TensorStore details")[0]
    return f"{type(err).__name__}: {text.splitlines()[0] if text else 'no message'}"[:400]


# --- Managers and the run directory ----------------------------------------------------------------


def checkpoint_manager(directory: Path, keep: int | None, read_only: bool = False) -> ocp.CheckpointManager:
    """The manager of a run's checkpoints/ folder, keeping the last `keep` steps it saves; a
    read-only one (for sampling, evaluation, verify) never writes, moves or deletes anything."""
    options = ocp.CheckpointManagerOptions(max_to_keep=None if read_only else keep, enable_async_checkpointing=True,
                                           read_only=read_only, create=not read_only,
                                           save_interval_steps=0 if read_only else 1)
    handlers = {name: ocp.StandardCheckpointHandler() for name in ITEMS}
    with quiet():
        return ocp.CheckpointManager(Path(directory).absolute(), options=options,
                                     item_handlers={**handlers, "config": ocp.JsonCheckpointHandler()})


def prepare_run_dir(directory: Path) -> None:
    """Create the run directory and probe, by writing (permission bits do not bind root), that this
    process can write where a run writes: a bad train.run_dir is one line before anything is built."""
    fix = "give train.run_dir a directory this user can write"
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"train.run_dir={directory} is a file, not a directory; {fix}")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"train.run_dir={directory}: cannot create it ({err.strerror or err}); {fix}") from None
    try:
        for where in (directory, directory / "checkpoints", directory / "tb"):
            if where.is_dir():
                tempfile.TemporaryFile(dir=where).close()
        for where in (directory / "metrics.jsonl", directory / "config.json"):
            if where.exists():
                open(where, "a").close()
    except OSError as err:
        raise ConfigError(f"train.run_dir={directory}: cannot write in {where} ({err.strerror or err}); "
                          f"{fix}") from None


# --- Saving ---------------------------------------------------------------------------------------


@jax.jit
def _finite_leaves(tree):
    """One flag per leaf: are all its values finite (integer leaves always are)."""
    return jnp.stack([jnp.all(jnp.isfinite(leaf)) if jnp.issubdtype(leaf.dtype, jnp.inexact) else jnp.bool_(True)
                      for leaf in jax.tree.leaves(tree)])


def divergence_hint(cfg: Config) -> str:
    """"; <the config value that obviously made training diverge>", or "" if none obviously did."""
    for name in ("lr", "embed_lr", "unembed_lr", "scalar_lr"):
        value = getattr(cfg.optim, name)
        if value is not None and value > SANE_LR:
            return f"; likely culprit: optim.{name}={value:g}, far above any sane learning rate (< {SANE_LR:g})"
    return ""


def newest_text(manager: ocp.CheckpointManager) -> str:
    """Where a stopped run resumes: every checkpoint this code wrote passed the finiteness check."""
    step = manager.latest_step()
    return (f"the last good checkpoint is step {step} in {manager.directory}" if step is not None
            else f"no checkpoint was written before it in {manager.directory}")


def save(manager: ocp.CheckpointManager, state: dict, cfg: Config) -> None:
    """Asynchronous save of parameters, optimizer state and step, with the config beside; refused
    in one line if any value is NaN or inf, before Orbax writes (or evicts an older step) at all."""
    checked = (state["params"], state["opt_state"])
    step, finite = jax.device_get((state["step"], _finite_leaves(checked)))
    if not finite.all():
        manager.wait_until_finished()
        raise CheckpointError(f"non-finite state at step {step}: {_non_finite(checked, finite)}; nothing saved "
                              f"for it, {newest_text(manager)}{divergence_hint(cfg)}")
    items = {"params": state["params"], "opt_state": state["opt_state"], "meta": {"step": state["step"]}}
    manager.save(int(step), args=ocp.args.Composite(
        config=ocp.args.JsonSave(config_to_dict(cfg)),
        **{name: ocp.args.StandardSave(item) for name, item in items.items()}))


def _non_finite(checked: tuple, finite: np.ndarray) -> str:
    """Which tensors of (params, opt_state) hold NaN or inf, naming the first parameter among them."""
    flags = iter(finite)
    bad = [[jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
            if not next(flags)] for tree in checked]
    return (f"NaN or inf in {len(bad[0])} of {len(jax.tree.leaves(checked[0]))} parameter tensors and "
            f"{len(bad[1])} optimizer-state tensors (first: {(bad[0] or bad[1])[0]})")


# --- Integrity ------------------------------------------------------------------------------------


def item_metadata(manager: ocp.CheckpointManager, step: int, name: str):
    """Orbax's metadata tree of one item of a step; Damaged if it is missing or unreadable."""
    try:
        with quiet():
            items = manager.item_metadata(step)
    except Exception as err:    # Orbax raises anything from KeyError to UnicodeDecodeError here
        raise Damaged(step, manager.directory, f"its metadata cannot be read ({describe(err)})") from None
    if items.get(name) is None:
        why = f"item {name} has no _METADATA" if name in items.keys() else "it holds no checkpoint items"
        raise Damaged(step, manager.directory, why)
    return items.get(name)


def check_step(manager: ocp.CheckpointManager, step: int, names=ITEMS) -> str | None:
    """Why checkpoint `step` cannot be read back whole, or None if it can. Every array of the named
    items is read onto one local device (the host's, if jax has the CPU backend), shaped as its own
    metadata says: the verdict needs no config or device layout, and is the same on every process.
    Arrays, not numpy: only an array restore reads each item's array_metadatas, as resuming does."""
    place = jax.sharding.SingleDeviceSharding(_host_device())
    try:
        for name in names:
            target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=place),
                                  item_metadata(manager, step, name))
            with quiet():
                got = manager.restore(step, args=ocp.args.Composite(**{name: ocp.args.StandardRestore(target)}))
            if name == "meta" and int(got["meta"]["step"]) != step:
                return f"meta holds step {int(got['meta']['step'])}, not {step}"
    except Damaged as err:
        return err.why
    except Exception as err:    # Orbax raises plain Exception, ValueError, OSError, ... for bad files
        return f"{name}: {describe(err)}"
    return None


def _host_device():
    """The CPU device (host memory); the first local one if JAX_PLATFORMS names accelerators only."""
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:
        return jax.local_devices()[0]


def move_aside(manager: ocp.CheckpointManager, step: int) -> Path:
    """Rename a damaged step to damaged-STEP (never deleted: kept for inspection)."""
    source = Path(manager.directory) / str(step)
    target, n = source.with_name(DAMAGED.format(step=step)), 1
    while target.exists():
        n += 1
        target = source.with_name(f"{DAMAGED.format(step=step)}.{n}")
    source.rename(target)
    return target


# --- Restoring ------------------------------------------------------------------------------------


def check_shapes(manager: ocp.CheckpointManager, step: int, abstract_params) -> None:
    """One line naming the first parameter whose saved shape differs from the config's."""
    saved = item_metadata(manager, step, "params")
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
    entries the names read: params always, opt_state for "opt_state", step for "meta".
    A step that cannot be read whole raises Damaged."""
    check_shapes(manager, step, abstract_state["params"])
    abstract = {"params": abstract_state["params"], "opt_state": abstract_state.get("opt_state"),
                "meta": {"step": abstract_state.get("step")}}
    try:
        with quiet():
            got = manager.restore(step, args=ocp.args.Composite(
                **{name: ocp.args.StandardRestore(abstract[name]) for name in names}))
    except Exception as err:
        if why := check_step(manager, step, names):
            raise Damaged(step, manager.directory, why) from None
        if not isinstance(err, ValueError) or "opt_state" not in names:
            raise
        # The files are whole and the parameters matched, so the optimizer state's layout differs.
        raise ConfigError(f"checkpoint step {step} in {manager.directory}: its optimizer state does not fit "
                          f"this config's optim settings (optimizer, clipping); resume with "
                          f"the optim config that wrote it, or start a new run with --init-from") from None
    return {name: got[name] for name in names}


def resume(manager: ocp.CheckpointManager, abstract_state: dict, say=warn) -> tuple[int, dict] | None:
    """(step, state) of the newest intact checkpoint, or None if there is none at all. Damaged
    steps newer than it are moved aside, one line each through `say`, never deleted; if no step
    is intact, a one-line error and nothing is moved."""
    damaged = {}
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            # With several processes, Orbax's restore waits at a barrier that a process which read a
            # damaged shard never reaches: agree on the verdict first, reading everything everywhere.
            if jax.process_count() > 1 and (why := check_step(manager, step)):
                raise Damaged(step, manager.directory, why)
            state = restore(manager, step, abstract_state)
        except Damaged as err:
            damaged[step] = err.why
            continue
        for bad, why in damaged.items():
            if jax.process_index() == 0:
                say(f"warning: checkpoint step {bad} is damaged ({why}); moved to "
                    f"{move_aside(manager, bad)}, resuming from step {step}")
        if damaged:
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils
                multihost_utils.sync_global_devices("checkpoint: damaged steps moved aside")
            manager.reload()
        return step, state
    if damaged:
        listed = "; ".join(f"step {step}: {why}" for step, why in damaged.items())
        raise CheckpointError(f"no intact checkpoint in {manager.directory} ({listed}); nothing was moved or "
                              f"deleted: move the damaged steps elsewhere to start afresh")
    return None


# --- The command line ------------------------------------------------------------------------------


def verify(run: str) -> bool:
    """Print each step of a run (or a checkpoints/ folder) as intact, or damaged and why; and the
    steps moved aside earlier. True if every step is intact."""
    directory = Path(run) / "checkpoints" if (Path(run) / "checkpoints").is_dir() else Path(run)
    if not directory.is_dir():
        raise ConfigError(f"{run}: no such run directory or checkpoints folder")
    with checkpoint_manager(directory, None, read_only=True) as manager:
        verdicts = {step: check_step(manager, step) for step in sorted(manager.all_steps())}
    rows = [("step", "state", "why")] + [(step, "damaged" if why else "intact", why or "")
                                         for step, why in verdicts.items()]
    rows += [(path.name, "moved aside", "") for path in sorted(directory.glob(DAMAGED.format(step="*")))]
    print(f"{directory}: {len(verdicts)} checkpoint steps" + ("" if verdicts else " (none)"))
    if len(rows) > 1:
        print(cli.format_table(rows))
    return not any(verdicts.values())


def main(argv=None) -> None:
    parser = cli.Parser(description="Check a run's checkpoints: every item and array read back whole.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("verify", help="report each step as intact or damaged").add_argument(
        "run", help="a train.py run directory (or its checkpoints/ folder)")
    args = parser.parse_args(argv)
    try:
        intact = verify(args.run)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    raise SystemExit(0 if intact else 1)


if __name__ == "__main__":
    main()
