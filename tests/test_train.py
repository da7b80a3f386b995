"""train.py, optimizer.py and checkpoint.py: the optimizer groups and schedules, the step,
restoring checkpoints (the full state, the parameters alone), and whole runs in subprocesses
(bit-exact resume, SIGTERM, the non-finite guard, shape mismatch, logs and checkpoints).

Runs that only read a finished run share conftest's `tiny_run`; a test that must write to a run
with checkpoints works on a copy of it."""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import checkpoint
import data
import model
import optimizer
import runs
import sharding
import train
from configs.base import Config, ConfigError, DataConfig, ModelConfig, OptimConfig, TrainConfig
from configs.load import apply_overrides, run_config
from conftest import REPO, TINY, records, run_train

def tiny_config(corpus, *overrides) -> Config:
    cfg = Config(name="tiny", model=ModelConfig(vocab_size=257), data=DataConfig(path=str(corpus)),
                 optim=OptimConfig(lr=3e-3), train=TrainConfig(steps=10))
    return apply_overrides(cfg, [*TINY, *overrides])


def saved_steps(run_dir):
    return sorted(int(p.name) for p in (Path(run_dir) / "checkpoints").iterdir() if p.name.isdigit())


def restored_state(run_dir, step=None) -> dict:
    """The full state of a run's checkpoint (the latest by default), restored as train.py resumes."""
    cfg = run_config(run_dir)
    tx, _ = optimizer.make_optimizer(cfg)
    abstract = train.abstract_state(cfg, tx)
    with checkpoint.checkpoint_manager(Path(run_dir) / "checkpoints", keep=3) as manager:
        return checkpoint.restore(manager, step or manager.latest_step(), abstract)


def restored_params(run_dir):
    return restored_state(run_dir)["params"]


def copy_run(run_dir, to) -> Path:
    """A writable copy of a finished run (checkpoints, logs and config)."""
    shutil.copytree(run_dir, to)
    return Path(to)


def step_fn(cfg):
    tx, schedule = optimizer.make_optimizer(cfg)
    fn = jax.jit(lambda state, batch: train.train_step(state, batch, cfg, tx, schedule))
    return train.init_state(cfg, tx), fn


def assert_close(actual, expected, tol: float) -> None:
    """Per tensor, ||actual - expected|| <= tol x ||expected||: a tolerance scaled to the tensor,
    which float summation order (SIMD width, thread count) cannot break the way one element
    against an absolute atol can."""
    def check(path, a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        error, scale = np.linalg.norm(a - b), np.linalg.norm(b)
        assert error <= tol * scale, f"{jax.tree_util.keystr(path)}: ||a - b|| = {error:.3g} > {tol} x {scale:.3g}"
    jax.tree_util.tree_map_with_path(check, actual, expected)


# --- Optimizer and step --------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [
    [], ["model.tie_embeddings=false", "model.pos=learned", "model.attn_bias=true", "model.mlp_bias=true"],
    ["model.qk_norm=true", "model.norm=layernorm", "model.norm_bias=true", "model.mlp=gelu"],
    ["model.norm_scale=false"]])
def test_every_parameter_has_exactly_one_group(corpus, overrides):
    cfg = tiny_config(corpus, *overrides)
    groups = optimizer.param_groups(cfg)
    params = model.init_params(cfg.model, jax.random.key(0))
    assert jax.tree.structure(groups) == jax.tree.structure(params)
    flat = {jax.tree_util.keystr(p): g for p, g in jax.tree_util.tree_flatten_with_path(groups)[0]}
    assert set(flat.values()) <= set(optimizer.GROUPS)
    hidden = {k for k, g in flat.items() if g == "hidden"}
    assert hidden == {"['blocks']['attn']['wqkv']", "['blocks']['attn']['wo']",
                      "['blocks']['mlp']['w_in']", "['blocks']['mlp']['w_out']"}
    assert flat["['embed']"] == "embed"
    assert all(g == "scalar" for k, g in flat.items() if "norm" in k or k.split("'")[-2].startswith("b"))


def test_weight_decay_skips_gains_and_biases(corpus):
    cfg = tiny_config(corpus, "optim.weight_decay=0.5", "optim.clip_norm=none", "model.attn_bias=true")
    tx, _ = optimizer.make_optimizer(cfg)
    params = model.init_params(cfg.model, jax.random.key(0))
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    assert float(jnp.abs(updates["blocks"]["attn"]["wqkv"]).max()) > 0       # decayed
    assert float(jnp.abs(updates["embed"]).max()) > 0
    assert float(jnp.abs(updates["blocks"]["attn_norm"]["scale"]).max()) == 0
    assert float(jnp.abs(updates["blocks"]["attn"]["bo"]).max()) == 0


@pytest.mark.parametrize("schedule, expected", [
    ("cosine", {0: 0.25, 3: 1.0, 7: 0.55, 11: 0.1}),
    ("linear", {3: 1.0, 7: 0.55, 11: 0.1}),
    ("constant", {0: 0.25, 3: 1.0, 11: 1.0}),
    ("wsd", {3: 1.0, 7: 1.0, 8: 1.0, 9: 0.7, 11: 0.1}),
])
def test_schedule_values(schedule, expected):
    optim = OptimConfig(schedule=schedule, warmup_steps=4, min_lr_ratio=0.1, decay_fraction=0.25)
    fn = optimizer.lr_schedule(optim, steps=12, peak=2.0)
    for step, ratio in expected.items():
        assert float(fn(step)) == pytest.approx(2.0 * ratio, rel=1e-5), (schedule, step)


def test_one_step_lowers_the_loss_on_a_fixed_batch(corpus):
    cfg = tiny_config(corpus)
    state, fn = step_fn(cfg)
    batch = next(data.train_batches(cfg))
    state, before = fn(state, batch)
    _, after = fn(state, batch)
    assert float(after["loss"]) < float(before["loss"])


def test_accumulation_equals_one_larger_batch(corpus):
    batch = next(data.train_batches(tiny_config(corpus, "train.batch_size=8")))
    results = []
    for accum in (1, 4):
        state, fn = step_fn(tiny_config(corpus, "train.batch_size=8", f"train.grad_accum={accum}"))
        state, metrics = fn(state, batch)
        results.append((state["params"], float(metrics["loss"]), float(metrics["grad_norm"])))
    (p1, l1, g1), (p4, l4, g4) = results
    assert l1 == pytest.approx(l4, rel=1e-5) and g1 == pytest.approx(g4, rel=1e-4)
    assert_close(p4, p1, tol=1e-4)      # seen: <= 1e-6 (summation order)


@pytest.mark.parametrize("name, lr", [("adamw", 3e-3), ("muon", 0.02)])
def test_adamw_and_muon_train_a_tiny_model(corpus, name, lr):
    cfg = tiny_config(corpus, f"optim.name={name}", f"optim.lr={lr}", "optim.embed_lr=3e-3",
                      "optim.scalar_lr=3e-3", "train.steps=40", "optim.schedule=constant")
    state, fn = step_fn(cfg)
    batches = data.train_batches(cfg)
    losses = []
    for _ in range(40):
        state, metrics = fn(state, next(batches))
        losses.append(float(metrics["loss"]))
    assert np.mean(losses[-5:]) < losses[0] - 1.5, losses


def test_muon_orthogonalizes_each_layer_of_the_stacked_matrices(corpus):
    cfg = tiny_config(corpus, "optim.name=muon", "optim.lr=1.0", "optim.weight_decay=0",
                      "optim.clip_norm=none", "optim.muon_momentum=0", "optim.schedule=constant")
    tx, _ = optimizer.make_optimizer(cfg)
    params = model.init_params(cfg.model, jax.random.key(0))
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(1), x.shape), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    w = updates["blocks"]["mlp"]["w_out"][1]            # layer 1: [F, D], orthogonalized alone
    singular = np.linalg.svd(np.asarray(w), compute_uv=False)
    assert singular.max() / singular.min() < 1.6       # Newton-Schulz: near-equal singular values


# --- Checkpoints ---------------------------------------------------------------------------------


def test_restore_params_gives_the_full_restores_parameters_without_an_optimizer(tiny_run, monkeypatch):
    full = restored_state(tiny_run, step=4)
    cfg, directory, step = runs.find_checkpoint(str(tiny_run), 4)
    assert (directory, step) == (tiny_run / "checkpoints", 4)

    def refuse(*args, **kwargs):
        raise AssertionError("an optimizer or a train state was built to restore the parameters")
    monkeypatch.setattr(optimizer, "make_optimizer", refuse)
    monkeypatch.setattr(train, "init_state", refuse)
    params = runs.restore_params(cfg, directory, step)
    jax.tree.map(np.testing.assert_array_equal, params, full["params"])
    # Placed where the given shardings say, with the same values.
    mesh = sharding.make_mesh(cfg.mesh)
    shardings = sharding.param_shardings(cfg.model, cfg.mesh.strategy, mesh)
    placed = runs.restore_params(cfg, directory, step, shardings)
    for leaf, where in zip(jax.tree.leaves(placed), jax.tree.leaves(shardings)):
        assert leaf.sharding.is_equivalent_to(where, leaf.ndim), (leaf.sharding, where)
    jax.tree.map(np.testing.assert_array_equal, placed, full["params"])


def test_find_checkpoint_names_the_run_or_step_at_fault(tiny_run, tmp_path):
    assert runs.find_checkpoint(str(tiny_run), None)[2] == 8
    with pytest.raises(ConfigError, match="no train.py run there"):
        runs.find_checkpoint(str(tmp_path), None)
    with pytest.raises(ConfigError, match=r"^--step 5: .* has checkpoints at steps 4, 8$"):
        runs.find_checkpoint(str(tiny_run), 5)


# --- Whole runs ----------------------------------------------------------------------------------


def test_a_finished_run_leaves_logs_and_restorable_checkpoints(tiny_run):
    recs = records(tiny_run)
    assert [r["step"] for r in recs] == list(range(1, 9))
    assert {"loss", "lr", "grad_norm", "update_norm", "tokens", "tokens_per_s", "step_time"} <= set(recs[0])
    assert "val_loss" in recs[3] and "val_bpb" in recs[7] and "val_loss" not in recs[4]
    assert recs[-1]["loss"] < recs[0]["loss"]
    assert list((tiny_run / "tb").glob("events.out.tfevents.*"))
    assert saved_steps(tiny_run) == [4, 8]
    cfg = run_config(tiny_run)
    assert cfg.train.steps == 8 and cfg.model.d_model == 32 and cfg.name == "quickstart"
    state = restored_state(tiny_run)
    assert int(state["meta"]["step"]) == 8
    assert state["params"]["blocks"]["attn"]["wqkv"].shape == (2, 32, 2, 3, 16)


def test_resume_is_bit_exact(corpus, tiny_run, tmp_path):
    """tiny_run trained 8 steps in one go; this run stops after 4 and resumes."""
    split = tmp_path / "split"
    args = ("train.steps=8", "train.ckpt_every=4")
    first = run_train(corpus, split, *args, extra=["--stop-after", "4"])
    assert "stopped after step 4" in first.stdout and saved_steps(split) == [4]
    second = run_train(corpus, split, *args)
    assert "resuming from step 4" in second.stdout
    assert "step 8/8" in second.stdout and "done: 8 steps" in second.stdout
    whole = records(tiny_run)
    assert whole == [{**a, **{k: b[k] for k in ("tokens_per_s", "step_time")}}
                     for a, b in zip(records(split), whole)]
    jax.tree.map(np.testing.assert_array_equal, restored_params(tiny_run), restored_params(split))


def test_sigterm_saves_then_resumes(corpus, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "train.py", "--config", "configs/quickstart.py", *TINY, f"data.path={corpus}",
           f"train.run_dir={run}", "train.steps=100000", "train.ckpt_every=100000"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    for line in proc.stdout:                    # wait until training is under way
        if line.startswith("step") and "/100000" in line and int(line.split()[1].split("/")[0]) >= 3:
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "stopped by SIGTERM after step" in out
    stopped = int(out.split("stopped by SIGTERM after step ")[1].split(":")[0])
    assert saved_steps(run) == [stopped]
    resumed = run_train(corpus, run, "train.steps=100000", "train.ckpt_every=100000", extra=["--stop-after", "2"])
    assert f"resuming from step {stopped}" in resumed.stdout and saved_steps(run)[-1] == stopped + 2


@pytest.mark.parametrize("every, check", [(1, "non-finite state"), (100, "non-finite loss")])
def test_divergence_stops_and_keeps_the_last_good_checkpoint(corpus, tiny_run, tmp_path, every, check):
    """The state is checked before each save, the loss at every step: either stops the run in one
    line naming the step, the last good checkpoint and the config value to blame."""
    run = copy_run(tiny_run, tmp_path / "run")
    proc = run_train(corpus, run, "train.steps=30", f"train.ckpt_every={every}", "optim.lr=1e30",
                     "optim.schedule=constant", check=False)
    assert proc.returncode == 1
    message = proc.stderr.strip()
    assert message.startswith(f"error: {check}") and "\n" not in message
    bad = int(message.split("at step ")[1].split(":")[0].split(";")[0])
    assert saved_steps(run) and all(step < bad for step in saved_steps(run))
    assert f"the last good checkpoint is step {max(saved_steps(run))}" in message
    assert message.endswith("likely culprit: optim.lr=1e+30, far above any sane learning rate (< 1)")


def test_checkpoint_of_another_shape_fails_in_one_line(corpus, tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    proc = run_train(corpus, run, "train.steps=12", "model.d_model=64", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: checkpoint step 8 in {run / 'checkpoints'}: parameter ['blocks']['attn']['wo'] has "
        f"shape (2, 2, 16, 32) but the config gives (2, 2, 32, 64); use another train.run_dir or the "
        f"config that wrote it (nothing was deleted)")
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    assert json.loads((run / "config.json").read_text())["model"]["d_model"] == 32


def test_init_from_takes_parameters_only(tiny_run, tmp_path):
    cfg = dataclasses.replace(run_config(tiny_run), optim=OptimConfig(name="muon", lr=0.01))
    tx, _ = optimizer.make_optimizer(cfg)
    _, shardings = train.state_layout(cfg, tx, sharding.make_mesh(cfg.mesh))
    with checkpoint.checkpoint_manager(tmp_path / "fresh", keep=1) as manager:
        state = train.initial_state(cfg, tx, manager, str(tiny_run), shardings)
    assert int(state["step"]) == 0
    jax.tree.map(np.testing.assert_array_equal, state["params"], restored_params(tiny_run))
    jax.tree.map(np.testing.assert_array_equal, state["opt_state"], tx.init(state["params"]))  # muon's, fresh
    placed = jax.tree.leaves(state)
    assert len(placed) == len(jax.tree.leaves(shardings))
    assert all(a.sharding.is_equivalent_to(s, a.ndim) for a, s in zip(placed, jax.tree.leaves(shardings)))


def test_resume_with_another_optimizer_fails_in_one_line(corpus, tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    proc = run_train(corpus, run, "train.steps=12", "optim.clip_norm=none", check=False)
    assert proc.returncode == 1
    assert "its optimizer state does not fit this config's optim settings" in proc.stderr.strip().splitlines()[-1]
    assert saved_steps(run) == [4, 8]


def test_bad_command_lines(corpus, tmp_path):
    proc = run_train(corpus, tmp_path / "r", "train.stepz=3", check=False)
    assert proc.returncode == 1 and proc.stderr.strip().endswith("did you mean 'steps'?")
    proc = run_train(corpus, tmp_path / "r", extra=["--stop-after", "0"], check=False)
    assert "error: --stop-after=0 must be a positive number of steps" in proc.stderr
    proc = run_train(corpus, tmp_path / "r", extra=["--init-from", str(tmp_path / "none")], check=False)
    assert proc.returncode == 1 and "--init-from" in proc.stderr and "no checkpoint found" in proc.stderr
    assert not (tmp_path / "none").exists()   # nothing is created where the flag points
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_train(corpus, tmp_path / "r", extra=["--init-from", str(empty)], check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
        f"error: --init-from {empty}: no checkpoint found in {empty}; "
        "give a train.py run directory or its checkpoints/ folder")
    proc = run_train(corpus, tmp_path / "r", extra=["--stop-after", "x"], check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "error: argument --stop-after: invalid int value: 'x'"]
