"""The PyTorch twin (torch/model.py, torch/train.py) against the JAX model and training step, in
float32 on the CPU: the same parameter tree, the same logits, loss and gradients for every row of
the core option grid, the same optimizer (groups, per-group lr, schedule, clipping), and the same
losses and parameters over five steps of train.train_step.

Tolerances (tests/numerics.py). Both frameworks compute in float32 and differ only in summation
order, so agreement is measured against each tensor's scale: a relative norm error of 1e-5 for the
logits, every gradient and the losses. After five optimizer steps from the same parameters on the
same batches the parameters agree to 1e-5 too. Adam divides each gradient by its own running RMS,
so the rounding noise of a near-zero gradient becomes a step of up to lr: the differences grow
with lr, which these tests keep at 1e-3 (about 14x inside the tolerance at 1e-3, 1.4x at 1e-2).
One parameter is all noise: the attention key bias, whose true gradient is zero (softmax ignores
a constant added to a row of scores); it is checked against the bound of lr per step.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import model
import optimizer
import train
from benchmarks.common import load_twin
from configs.base import Config, OptimConfig, TrainConfig
from numerics import assert_close
from test_model import GRID, tiny

tm, tt = load_twin("model"), load_twin("train")
REL = 1e-5
B, T = 2, 12
STEPS = 5
# Every optimizer feature on: per-group peaks, warmup then cosine decay, weight decay, clipping
# below the gradients' norm (so it acts).
OPTIM = OptimConfig(lr=1e-3, embed_lr=2e-3, unembed_lr=5e-4, scalar_lr=3e-4, warmup_steps=2,
                    schedule="cosine", weight_decay=0.1, clip_norm=0.5)


def params_for(cfg, seed=0):
    """Random parameters of the spec's shapes, drawn by NumPy (no per-shape JAX compiles): gains
    near 1, everything else N(0, 0.1), so that every weight, bias and padded row matters."""
    rng = np.random.default_rng(seed)
    gain = lambda path: path[-1].key in ("scale", "q_norm", "k_norm")
    return jax.tree_util.tree_map_with_path(
        lambda path, s: (gain(path) + 0.1 * rng.standard_normal(s.shape)).astype(np.float32),
        model.param_specs(cfg), is_leaf=model.is_spec)


def tokens(cfg, seed=0):
    return np.random.default_rng(100 + seed).integers(0, cfg.vocab_size, (B, T), dtype=np.int32)


def as_numpy(tree):
    return jax.tree.map(np.asarray, tree)


def twin(cfg, params):
    module = tm.GPT(cfg)
    module.load_params(as_numpy(params))
    return module


def torch_batch(*arrays):
    return [torch.tensor(np.asarray(a), dtype=torch.long) for a in arrays]


def flat(tree):
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def jax_logits(params, toks, cfg):
    return jax.jit(model.forward, static_argnums=2)(params, toks, cfg)[0]


@pytest.mark.parametrize("name", GRID)
def test_parameter_tree_is_the_jax_tree(name):
    cfg = tiny(**GRID[name])
    specs = model.param_specs(cfg)
    shapes = jax.tree.map(lambda s: s.shape, specs, is_leaf=model.is_spec)
    assert flat(shapes) == flat(jax.tree.map(lambda x: x.shape, tm.GPT(cfg).jax_params()))


@pytest.mark.parametrize("name", GRID)
def test_logits_match(name):
    cfg = tiny(**GRID[name])
    params, toks = params_for(cfg), tokens(cfg)
    expected = jax_logits(params, toks, cfg)
    with torch.no_grad():
        logits = twin(cfg, params)(*torch_batch(toks))
    assert logits.shape == expected.shape and logits.dtype == torch.float32
    assert_close(logits.numpy(), expected, REL, what="logits")


@pytest.mark.parametrize("name", GRID)
def test_loss_and_every_gradient_match(name):
    cfg = tiny(**GRID[name])
    params, toks, targets = params_for(cfg), tokens(cfg), tokens(cfg, seed=1)
    (loss, metrics), grads = jax.jit(jax.value_and_grad(model.loss_fn, has_aux=True), static_argnums=2)(
        params, {"inputs": toks, "targets": targets}, cfg)
    module = twin(cfg, params)
    torch_loss, torch_metrics = module.loss(*torch_batch(toks, targets))
    torch_loss.backward()
    assert_close(torch_loss.item(), loss, REL, what="loss")
    assert_close(torch_metrics["z"].item(), metrics["z"], REL, what="z")
    torch_grads = flat(tm.to_tree((n, p.grad.numpy()) for n, p in module.named_parameters()))
    expected = flat(grads)
    assert torch_grads.keys() == expected.keys()
    for key, grad in expected.items():
        assert_close(torch_grads[key], grad, REL, what=f"gradient of {key}")


@pytest.mark.parametrize("impl", ["einsum", "xla"])
def test_long_sequences_match(impl):
    # 200 tokens: einsum attention runs in causal query blocks of 64, the last one ragged.
    cfg = tiny(seq_len=256, n_kv_heads=2, attn_impl=impl)
    params = params_for(cfg)
    toks = np.random.default_rng(7).integers(0, cfg.vocab_size, (1, 200), dtype=np.int32)
    with torch.no_grad():
        logits = twin(cfg, params)(*torch_batch(toks))
    assert_close(logits.numpy(), jax_logits(params, toks, cfg), REL, what="logits")


def test_loss_mask_matches():
    cfg = tiny()
    params, toks, targets = params_for(cfg), tokens(cfg), tokens(cfg, seed=1)
    mask = np.ones((B, T), np.float32)
    mask[1, 5:] = 0.0
    _, metrics = model.loss_fn(params, {"inputs": toks, "targets": targets, "mask": mask}, cfg)
    _, torch_metrics = twin(cfg, params).loss(*torch_batch(toks, targets), torch.tensor(mask))
    assert torch_metrics["tokens"].item() == float(metrics["tokens"]) == B * T - 7
    assert_close(torch_metrics["ce"].item(), metrics["ce"], REL, what="masked cross-entropy")
    assert_close(torch_metrics["z"].item(), metrics["z"], REL, what="masked z")


def test_bfloat16_compute_stays_close():
    # bench.py train --dtype bfloat16 runs both twins this way: float32 parameters, bfloat16 compute.
    cfg = tiny(n_kv_heads=2, compute_dtype="bfloat16")
    params, toks = params_for(cfg), tokens(cfg)
    module = twin(cfg, params)
    loss, _ = module.loss(*torch_batch(toks, toks))
    loss.backward()
    assert all(p.grad.dtype == torch.float32 and bool(torch.isfinite(p.grad).all()) for p in module.parameters())
    with torch.no_grad():
        assert_close(module(*torch_batch(toks)).numpy(), model.forward(params, toks, cfg)[0], 2e-2, what="logits")


def test_round_trip_in_both_directions():
    cfg = tiny(**GRID["gpt2"])
    params = as_numpy(params_for(cfg))
    back = twin(cfg, params).jax_params()
    assert jax.tree.structure(back) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, back, params)
    # A module's own initialization, read out as a JAX tree, gives the module's logits in JAX.
    module, toks = tm.GPT(cfg), tokens(cfg)
    with torch.no_grad():
        assert_close(module(*torch_batch(toks)).numpy(), jax_logits(module.jax_params(), toks, cfg), REL,
                     what="logits")


def test_load_params_rejects_a_foreign_tree():
    cfg = tiny()
    params = as_numpy(params_for(cfg))
    module = tm.GPT(cfg)
    with pytest.raises(ValueError, match="blocks.attn.wqkv"):
        module.load_params({**params, "blocks": {**params["blocks"], "attn": {
            **params["blocks"]["attn"], "wqkv": params["blocks"]["attn"]["wqkv"][:1]}}})
    with pytest.raises(ValueError, match="unembed"):
        module.load_params({**params, "unembed": params["embed"].T})


# --- The optimizer and the training step ---------------------------------------------------------


def train_config(name: str, **model_changes) -> Config:
    return Config(model=tiny(**GRID[name], **model_changes), optim=OPTIM,
                  train=TrainConfig(steps=STEPS, batch_size=B))


def test_groups_lr_and_decay_follow_optimizer_py():
    cfg = train_config("gpt2", tie_embeddings=False)
    module = tm.GPT(cfg.model)
    opt, _ = tt.make_optimizer(module, cfg)
    by_tensor = {id(p): name for name, p in module.named_jax_parameters()}
    got = {by_tensor[id(p)]: (g["lr"] / tt.lr_factor(OPTIM, STEPS, 0), g["weight_decay"])
           for g in opt.param_groups for p in g["params"]}
    decayed = {"embed", "pos_embed", "unembed", "blocks.attn.wqkv", "blocks.attn.wo", "blocks.mlp.w_in",
               "blocks.mlp.w_out"}
    assert {name for name, (_, decay) in got.items() if decay} == decayed
    assert all(decay == OPTIM.weight_decay for name, (_, decay) in got.items() if name in decayed)
    peaks = {"embed": 2e-3, "pos_embed": 2e-3, "unembed": 5e-4}
    for name, (lr, _) in got.items():
        want = peaks.get(name, 1e-3 if name in decayed else 3e-4)
        assert lr == pytest.approx(want, rel=1e-12), name
    assert got.keys() == {n for n, _ in module.named_jax_parameters()}


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd", "constant"])
def test_lr_schedule_is_optimizer_py_schedule(schedule):
    optim = OptimConfig(lr=3e-3, warmup_steps=3, schedule=schedule, min_lr_ratio=0.2, decay_fraction=0.3)
    steps = 20
    jax_lrs = jax.vmap(optimizer.lr_schedule(optim, steps, optim.lr))(jnp.arange(steps + 2))
    torch_lrs = [optim.lr * tt.lr_factor(optim, steps, step) for step in range(steps + 2)]
    assert_close(torch_lrs, jax_lrs, 1e-6, what=f"{schedule} lr")


def test_muon_has_no_twin():
    cfg = Config(model=tiny(), optim=OptimConfig(name="muon"))
    with pytest.raises(ValueError, match="optim.name=adamw"):
        tt.make_optimizer(tm.GPT(cfg.model), cfg)


def run_torch(cfg, params, batches):
    """Losses and the lr of the hidden group at each step, and the final parameters."""
    module = twin(cfg.model, params)
    opt, schedule = tt.make_optimizer(module, cfg)
    step = tt.make_step(module, opt, schedule, cfg.optim.clip_norm)
    losses, lrs = [], []
    for x, y in batches:
        lrs.append(next(g["lr"] for g in opt.param_groups if g["name"] == "hidden"))
        losses.append(step(*torch_batch(x, y)).item())
    return losses, lrs, flat(module.jax_params())


def run_jax(cfg, params, batches):
    """train.train_step with optimizer.make_optimizer: losses, lrs, gradient norms, final parameters."""
    tx, schedule = optimizer.make_optimizer(cfg)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    step = jax.jit(lambda s, b: train.train_step(s, b, cfg, tx, schedule))
    metrics = []
    for x, y in batches:
        state, m = step(state, {"inputs": x, "targets": y})
        metrics.append(m)
    metrics = jax.tree.map(lambda *xs: np.array(xs), *metrics)
    return metrics, flat(as_numpy(state["params"]))


@pytest.mark.parametrize("name,changes", [("llama", {"tie_embeddings": False}), ("gpt2", {})])
def test_five_train_steps_give_the_same_losses_and_parameters(name, changes):
    cfg = train_config(name, **changes)
    params = params_for(cfg.model)
    batches = [(tokens(cfg.model, seed=2 * i), tokens(cfg.model, seed=2 * i + 1)) for i in range(STEPS)]
    torch_losses, torch_lrs, torch_final = run_torch(cfg, params, batches)
    metrics, final = run_jax(cfg, params, batches)
    assert max(metrics["grad_norm"]) > OPTIM.clip_norm  # clipping acted
    assert_close(torch_lrs, metrics["lr"], 1e-6, what="lr")
    assert_close(torch_losses, metrics["loss"], REL, what="losses")
    start, g = flat(params), cfg.model.n_heads // cfg.model.n_kv_heads
    assert max(np.abs(final[key] - start[key]).max() for key in final) > OPTIM.scalar_lr
    assert torch_final.keys() == final.keys()
    for key, value in torch_final.items():
        expected = final[key]
        if key == "['blocks']['attn']['bqkv']":  # the key bias: see the module docstring
            assert np.abs(value[:, :, g] - expected[:, :, g]).max() <= 2 * STEPS * OPTIM.scalar_lr
            value, expected = np.delete(value, g, axis=2), np.delete(expected, g, axis=2)
        assert_close(value, expected, REL, what=key)
