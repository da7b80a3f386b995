"""Mixture of experts (moe.py and its place in model.py): both dispatch paths and Soft MoE against
the float64 reference and the PyTorch twin, the router and its losses, causality, KV-cache
decoding, counts, the optimizer group, one-line errors, and expert parallelism over simulated
devices."""
import dataclasses
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import model
import moe
import np_reference as ref
import optimizer
import sharding
from benchmarks.common import load_twin
from configs.base import Config, ConfigError, OptimConfig, TrainConfig
from configs.load import load_config
from conftest import records, run_train
from numerics import assert_close, assert_trees_close
from test_model import B, T, params_for, tokens, tiny

tm = load_twin("model")
MOE = dict(n_experts=4, top_k=2, expert_ff=24)
GRID = {
    "dropless": MOE,
    "capacity-drops-shared-bias-gelu": {**MOE, "capacity_factor": 0.75, "n_shared_experts": 1, "mlp": "gelu",
                                        "mlp_bias": True},
    "mixed-top1-gqa-postnorm": {**MOE, "n_layers": 4, "moe_every": 2, "top_k": 1, "capacity_factor": 1.0,
                                "n_kv_heads": 2, "norm_position": "post"},
    "soft-geglu-shared": {**MOE, "router": "soft", "top_k": 1, "mlp": "geglu", "n_shared_experts": 1},
}


def forward(params, toks, cfg):
    return jax.jit(model.forward, static_argnums=2)(params, toks, cfg)


# --- Against the float64 reference ---------------------------------------------------------------


@pytest.mark.parametrize("name", GRID)
def test_forward_losses_and_statistics_match_float64_reference(name):
    cfg = tiny(**GRID[name])
    params, toks = params_for(cfg), tokens(cfg)
    logits, aux = forward(params, toks, cfg)
    want = {}
    assert_close(logits, ref.forward(ref.to_float64(params), toks, cfg, want), rel=1e-5)
    if cfg.router == "soft":
        assert "moe" not in aux and aux["losses"] == {}
        return
    assert_close([aux["losses"]["moe_aux"], aux["losses"]["moe_z"]], [want["moe_aux"], want["moe_z"]], rel=1e-5)
    np.testing.assert_allclose(aux["moe"]["load"], want["load"], atol=1e-6)      # fractions of 24 or 48
    np.testing.assert_allclose(aux["moe"]["dropped"], want["dropped"], atol=1e-6)
    assert (max(want["dropped"]) > 0) == (cfg.capacity_factor is not None)    # the capacity rows do drop


def test_dispatch_paths_agree_when_capacity_suffices():
    # Capacity c = X / top_k gives every expert T slots per sequence: nothing can be dropped.
    cfg = tiny(**MOE, n_shared_experts=1)
    roomy = dataclasses.replace(cfg, capacity_factor=cfg.n_experts / cfg.top_k)
    params, batch = params_for(cfg), {"inputs": tokens(cfg), "targets": tokens(cfg, 1)}
    grad = jax.jit(jax.value_and_grad(model.loss_fn, has_aux=True), static_argnums=2)
    (loss, metrics), grads = grad(params, batch, cfg)
    (roomy_loss, roomy_metrics), roomy_grads = grad(params, batch, roomy)
    assert float(jnp.max(roomy_metrics["moe_dropped"])) == 0.0
    assert_close(roomy_loss, loss, rel=1e-6)
    assert_trees_close(roomy_grads, grads, rel=1e-5)


def test_dropped_assignments_pass_on_the_residual_and_are_counted():
    # Every token of one sequence of 8 picks experts 0 and 1; C = ceil(1.0 * 2 * 8 / 4) = 4 slots.
    cfg = tiny(**MOE, capacity_factor=1.0)
    p = jax.tree.map(lambda w: w[0], params_for(cfg)["moe_blocks"]["mlp"])
    x_ND = jax.random.normal(jax.random.key(0), (8, cfg.d_model))
    expert_NA = jnp.tile(jnp.array([[0, 1]]), (8, 1))
    gate_NA = jnp.full((8, 2), 0.5)
    y_ND, dropped = moe.capacity_limited(p, x_ND, gate_NA, expert_NA, cfg, batch=1)
    full_ND, none = moe.dropless(p, x_ND, gate_NA, expert_NA, cfg)
    assert float(dropped) == 0.5 and float(none) == 0.0
    assert_close(y_ND[:4], full_ND[:4], rel=1e-6)                  # the first 4 tokens fill the slots
    np.testing.assert_array_equal(y_ND[4:], 0.0)                   # the rest add nothing


def test_top_k_gates_are_a_softmax_over_the_chosen_logits():
    cfg = tiny(**{**MOE, "n_experts": 8, "top_k": 3})
    w_DX = jax.random.normal(jax.random.key(0), (cfg.d_model, 8))
    x_ND = jax.random.normal(jax.random.key(1), (10, cfg.d_model))
    logits_NX, gate_NA, expert_NA = moe.route(w_DX, x_ND, cfg)
    assert logits_NX.dtype == jnp.float32
    chosen_logits = jnp.take_along_axis(logits_NX, expert_NA, axis=1)
    assert_close(gate_NA, jax.nn.softmax(chosen_logits, axis=-1), rel=1e-6)
    np.testing.assert_array_equal(jnp.argsort(-logits_NX, axis=1)[:, :3], expert_NA)


def test_uniform_router_scores_one_and_log_experts_squared():
    cfg = tiny(**MOE, aux_loss=0.5, router_z_loss=0.25)
    expert_NA = jnp.array([[0, 1], [0, 1], [0, 2]])                # unbalanced choices, uniform probabilities
    losses, load_X = moe.router_losses(jnp.zeros((3, 4)), expert_NA, cfg)
    assert_close(load_X, [3 / 6, 2 / 6, 1 / 6, 0.0], rel=1e-6)
    assert float(losses["moe_aux"]) == pytest.approx(0.5 * 1.0)   # X * sum_x f_x / X = 1
    assert float(losses["moe_z"]) == pytest.approx(0.25 * math.log(4) ** 2, rel=1e-6)


# --- The model around it -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dropless", "capacity-drops-shared-bias-gelu", "soft-geglu-shared"])
def test_causality(name):
    cfg = tiny(**GRID[name])
    params, toks = params_for(cfg), tokens(cfg)
    t = 7
    changed = toks.at[:, t].set((toks[:, t] + 1) % cfg.vocab_size)
    a, b = forward(params, toks, cfg)[0], forward(params, changed, cfg)[0]
    assert not np.allclose(a[:, t], b[:, t])
    if cfg.router == "soft":     # slots mix the whole sequence: earlier positions see the change
        assert not np.allclose(a[:, :t], b[:, :t])
    else:                         # token-order capacity: a token's slot depends only on earlier tokens
        assert_close(a[:, :t], b[:, :t], rel=1e-6)


def test_loss_adds_the_router_losses_and_reports_per_layer_metrics():
    cfg = tiny(**GRID["mixed-top1-gqa-postnorm"])
    params = params_for(cfg)
    loss, metrics = model.loss_fn(params, {"inputs": tokens(cfg), "targets": tokens(cfg, 1)}, cfg)
    assert float(loss) == pytest.approx(float(metrics["ce"] + metrics["moe_aux"] + metrics["moe_z"]), rel=1e-6)
    for name in ("moe_load_max", "moe_load_min", "moe_dropped"):
        assert metrics[name].shape == (2,)                         # the two MoE layers of four
    assert bool(jnp.all(metrics["moe_load_max"] >= 1 / 4)) and bool(jnp.all(metrics["moe_load_min"] <= 1 / 4))
    assert params["moe_blocks"]["mlp"]["w_in"].shape[:2] == (2, 4) and params["blocks"]["mlp"]["w_in"].shape[0] == 2


def test_counts_and_flops():
    cfg = tiny(**MOE, n_shared_experts=1, d_ff=64)                 # expert_ff 24, gated: 3 D F per expert
    D, L, X, k, Fe = 32, 2, 4, 2, 24
    params = model.init_params(cfg, jax.random.key(0))
    assert model.count_params(cfg) == sum(x.size for x in jax.tree.leaves(params))
    assert model.count_params(cfg) - model.count_active_params(cfg) == L * (X - k) * 3 * D * Fe
    dense = tiny(d_ff=64)
    ffn = D * X + k * 3 * D * Fe + 3 * D * Fe                     # router, two experts, the shared one
    assert model.flops_per_token(cfg, 16) - model.flops_per_token(dense, 16) == 6 * L * (ffn - 3 * D * 64)
    assert model.count_active_params(dense) == model.count_params(dense)


@pytest.mark.parametrize("name, changes", [
    ("dropless", {}), ("roomy-capacity", {"capacity_factor": 2.0}),
    ("mixed", {"n_layers": 4, "moe_every": 2, "n_kv_heads": 2}),
])
def test_decoding_through_the_cache_matches_the_full_forward(name, changes):
    # Decoding one token at a time routes groups of one: with drops, those differ from the full
    # sequence's, so capacity is checked where nothing drops (c = X / top_k).
    cfg = tiny(**MOE, **changes)
    params, toks = params_for(cfg), tokens(cfg)
    full, _ = forward(params, toks, cfg)
    step = jax.jit(lambda p, x, c: (lambda logits, aux: (logits, aux["cache"]))(*model.forward(p, x, cfg, cache=c)))
    logits, cache = step(params, toks[:, :5], model.init_cache(cfg, B, T))
    assert_close(logits, full[:, :5], rel=1e-5)
    for t in range(5, T):
        logits, cache = step(params, toks[:, t:t + 1], cache)
        assert_close(logits[:, 0], full[:, t], rel=1e-5)


# --- One-line errors -----------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (["model.n_experts=4", "model.top_k=5"], "model.top_k=5 exceeds model.n_experts=4; choose top_k <= n_experts"),
    (["model.n_experts=4", "model.moe_every=0"], "model.moe_every=0 must be positive"),
    (["model.n_experts=4", "model.capacity_factor=0"], "model.capacity_factor=0.0 must be positive"),
    (["model.n_experts=4", "model.capacity_factor=-1.25"], "model.capacity_factor=-1.25 must be positive"),
])
def test_bad_moe_settings_fail_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config("configs/moe_tiny.py", overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_an_expert_axis_that_does_not_divide_the_experts_fails_in_one_line():
    cfg = tiny(**MOE)
    with pytest.raises(sharding.ShardingError) as err:
        sharding.check_experts(cfg, types.SimpleNamespace(shape={"expert": 3}))
    assert str(err.value) == "mesh.expert=3 does not divide model.n_experts=4; use mesh.expert in [1, 2, 4]"
    sharding.check_experts(cfg, types.SimpleNamespace(shape={"expert": 2}))
    sharding.check_experts(tiny(), types.SimpleNamespace(shape={"expert": 3}))   # dense: one more data axis


def test_soft_moe_refuses_a_kv_cache_in_one_line():
    cfg = tiny(**GRID["soft-geglu-shared"])
    params = params_for(cfg)
    with pytest.raises(ConfigError) as err:
        model.forward(params, tokens(cfg)[:, :1], cfg, cache=model.init_cache(cfg, B, T))
    assert str(err.value).startswith("model.router='soft' mixes tokens") and "\n" not in str(err.value)


# --- The PyTorch twin ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", GRID)
def test_twin_logits_loss_and_gradients_match(name):
    cfg = tiny(**GRID[name])
    params, toks, targets = params_for(cfg), tokens(cfg), tokens(cfg, 1)
    (loss, metrics), grads = jax.jit(jax.value_and_grad(model.loss_fn, has_aux=True), static_argnums=2)(
        params, {"inputs": toks, "targets": targets}, cfg)
    module = tm.GPT(cfg)
    module.load_params(jax.tree.map(np.asarray, params))
    as_torch = lambda a: torch.tensor(np.asarray(a), dtype=torch.long)
    with torch.no_grad():
        assert_close(module(as_torch(toks)).numpy(), forward(params, toks, cfg)[0], rel=1e-5, what="logits")
    torch_loss, torch_metrics = module.loss(as_torch(toks), as_torch(targets))
    torch_loss.backward()
    assert_close(torch_loss.item(), loss, rel=1e-5, what="loss")
    for key in ("moe_aux", "moe_z"):
        if key in metrics:
            assert_close(torch_metrics[key].item(), metrics[key], rel=1e-5, what=key)
    torch_grads = tm.to_tree((n, p.grad.numpy()) for n, p in module.named_parameters())
    assert_trees_close(torch_grads, jax.tree.map(np.asarray, grads), rel=1e-5)


# --- Optimizer -----------------------------------------------------------------------------------


def test_router_trains_with_the_output_head_and_muon_skips_it():
    cfg = Config(model=tiny(**MOE), optim=OptimConfig(name="muon", lr=0.02, unembed_lr=1e-3),
                 train=TrainConfig(steps=2, batch_size=B))
    groups = optimizer.param_groups(cfg)["moe_blocks"]["mlp"]
    assert groups["router"] == "unembed" and groups["w_in"] == groups["w_out"] == "hidden"
    tx, _ = optimizer.make_optimizer(cfg)
    params = params_for(cfg.model)
    grads = jax.grad(lambda p: model.loss_fn(p, {"inputs": tokens(cfg.model), "targets": tokens(cfg.model, 1)},
                                             cfg.model)[0])(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    router = updates["moe_blocks"]["mlp"]["router"]
    # AdamW's first step moves each weight by about lr (sign of its gradient); Muon's would not.
    assert float(jnp.max(jnp.abs(router))) == pytest.approx(1e-3, rel=0.05)


# --- Presets -------------------------------------------------------------------------------------


def test_presets_match_in_active_parameters():
    moe_cfg, dense_cfg = load_config("configs/moe_tiny.py").model, load_config("configs/dense_tiny.py").model
    router = moe_cfg.n_layers * moe_cfg.d_model * moe_cfg.n_experts
    assert model.count_active_params(moe_cfg) - router == model.count_active_params(dense_cfg)
    extra_experts = moe_cfg.n_experts * 3 * 256 * moe_cfg.expert_ff - 3 * 256 * dense_cfg.d_ff   # 3x the MLP
    assert model.count_params(moe_cfg) - model.count_params(dense_cfg) == 4 * extra_experts + router


# --- Expert parallelism --------------------------------------------------------------------------

MOE_RUN = ["model.n_experts=4", "model.top_k=2", "model.expert_ff=32", "train.batch_size=8", "train.steps=5",
           "eval.every=5", "train.ckpt_every=100"]


def losses(run_dir) -> list[float]:
    return [record["loss"] for record in records(run_dir)]


@pytest.mark.parametrize("capacity, mesh", [
    ("none", ["mesh.expert=4", "mesh.data=1"]),
    ("1.25", ["mesh.strategy=fsdp", "mesh.data=1", "mesh.fsdp=2", "mesh.expert=2"]),
], ids=["dropless-expert4", "capacity-fsdp2-expert2"])
def test_expert_parallel_training_matches_one_device(corpus, tmp_path, capacity, mesh):
    args = [*MOE_RUN, f"model.capacity_factor={capacity}"]
    run_train(corpus, tmp_path / "one", *args, devices=1)
    proc = run_train(corpus, tmp_path / "split", *args, *mesh, devices=4)
    one, split = losses(tmp_path / "one"), losses(tmp_path / "split")
    assert len(one) == 5 and all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(split, one)), (split, one)
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.startswith("['moe_blocks']")}
    w_out = rows["['moe_blocks']['mlp']['w_out']"]                 # 2 x 4 x 32 x 32 float32, experts split
    assert "'expert'," in w_out and int(w_out[-1].replace(",", "")) == 2 * 4 * 32 * 32 * 4 // 4
    record = records(tmp_path / "split")[-1]
    assert len(record["moe_load_max"]) == 2 and len(record["moe_dropped"]) == 2
    assert (max(record["moe_dropped"]) == 0.0) == (capacity == "none")
