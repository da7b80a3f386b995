"""The PyTorch twin (torch/model.py) against the JAX model, in float32 on the CPU: the same
parameter tree, the same logits, loss and gradients for every row of the core option grid, and the
same losses over five AdamW steps.

Tolerances. Both frameworks compute in float32 and differ only in summation order, so agreement is
measured against each tensor's scale: |torch - jax| <= 1e-5 * max|jax| for the logits and for every
gradient (measured: at most 7e-7 and 1.3e-6), and 1e-5 relative for the loss. Five AdamW steps
(train.py's defaults, from the same parameters, on the same five batches) give losses equal to
1e-5 relative (measured: at most 2.2e-7) and parameters equal to 1e-5 of each tensor's scale
(measured: 1.7e-6), but for one: the attention key bias. Its true gradient is zero (softmax ignores
a constant added to a row of scores), and Adam, dividing each gradient by its own running RMS,
turns the rounding noise of each framework into steps of up to lr; it is checked against that bound.
"""
import jax
import numpy as np
import pytest
import torch

import bench
import model
from test_model import GRID, tiny

tm = bench.load_torch_model()
SCALE_TOL = 1e-5
B, T = 2, 12


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


def assert_close_to_scale(actual, expected, tol=SCALE_TOL, name=""):
    expected = np.asarray(expected)
    err = np.abs(np.asarray(actual) - expected).max() / max(np.abs(expected).max(), 1e-30)
    assert err <= tol, f"{name}: max |difference| is {err:.2e} of the largest value"


def flat(tree):
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


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
    expected = jax.jit(model.forward, static_argnums=2)(params, toks, cfg)
    with torch.no_grad():
        logits = twin(cfg, params)(*torch_batch(toks))
    assert logits.shape == expected.shape and logits.dtype == torch.float32
    assert_close_to_scale(logits.numpy(), expected, name="logits")


@pytest.mark.parametrize("name", GRID)
def test_loss_and_every_gradient_match(name):
    cfg = tiny(**GRID[name])
    params, toks, targets = params_for(cfg), tokens(cfg), tokens(cfg, seed=1)
    (loss, metrics), grads = jax.jit(jax.value_and_grad(model.loss_fn, has_aux=True), static_argnums=2)(
        params, {"inputs": toks, "targets": targets}, cfg)
    module = twin(cfg, params)
    torch_loss, torch_metrics = module.loss(*torch_batch(toks, targets))
    torch_loss.backward()
    assert torch_loss.item() == pytest.approx(float(loss), rel=SCALE_TOL)
    assert torch_metrics["z"].item() == pytest.approx(float(metrics["z"]), rel=SCALE_TOL)
    torch_grads = flat(tm.to_tree((n, p.grad.numpy()) for n, p in module.named_parameters()))
    expected = flat(grads)
    assert torch_grads.keys() == expected.keys()
    for key, grad in expected.items():
        assert_close_to_scale(torch_grads[key], grad, name=f"gradient of {key}")


@pytest.mark.parametrize("impl", ["einsum", "xla"])
def test_long_sequences_match(impl):
    # 200 tokens: einsum attention runs in causal query blocks of 64, the last one ragged.
    cfg = tiny(seq_len=256, n_kv_heads=2, attn_impl=impl)
    params = params_for(cfg)
    toks = np.random.default_rng(7).integers(0, cfg.vocab_size, (1, 200), dtype=np.int32)
    expected = jax.jit(model.forward, static_argnums=2)(params, toks, cfg)
    with torch.no_grad():
        assert_close_to_scale(twin(cfg, params)(*torch_batch(toks)).numpy(), expected, name="logits")


def test_loss_mask_matches():
    cfg = tiny()
    params, toks, targets = params_for(cfg), tokens(cfg), tokens(cfg, seed=1)
    mask = np.ones((B, T), np.float32)
    mask[1, 5:] = 0.0
    _, metrics = model.loss_fn(params, {"inputs": toks, "targets": targets, "mask": mask}, cfg)
    _, torch_metrics = twin(cfg, params).loss(*torch_batch(toks, targets), torch.tensor(mask))
    assert torch_metrics["tokens"].item() == float(metrics["tokens"]) == B * T - 7
    assert torch_metrics["ce"].item() == pytest.approx(float(metrics["ce"]), rel=SCALE_TOL)


def test_bfloat16_compute_stays_close():
    # bench.py --dtype bfloat16 runs both twins this way: float32 parameters, bfloat16 compute.
    cfg = tiny(n_kv_heads=2, compute_dtype="bfloat16")
    params, toks = params_for(cfg), tokens(cfg)
    module = twin(cfg, params)
    loss, _ = module.loss(*torch_batch(toks, toks))
    loss.backward()
    assert all(p.grad.dtype == torch.float32 and bool(torch.isfinite(p.grad).all()) for p in module.parameters())
    with torch.no_grad():
        assert_close_to_scale(module(*torch_batch(toks)).numpy(), model.forward(params, toks, cfg)[0], tol=2e-2)


def test_round_trip_in_both_directions():
    cfg = tiny(**GRID["gpt2"])
    params = as_numpy(params_for(cfg))
    back = twin(cfg, params).jax_params()
    assert jax.tree.structure(back) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, back, params)
    # A module's own initialization, read out as a JAX tree, gives the module's logits in JAX.
    module, toks = tm.GPT(cfg), tokens(cfg)
    with torch.no_grad():
        assert_close_to_scale(module(*torch_batch(toks)).numpy(), model.forward(module.jax_params(), toks, cfg)[0])


def test_load_params_rejects_a_foreign_tree():
    cfg = tiny()
    params = as_numpy(params_for(cfg))
    module = tm.GPT(cfg)
    with pytest.raises(ValueError, match="blocks.attn.wqkv"):
        module.load_params({**params, "blocks": {**params["blocks"], "attn": {
            **params["blocks"]["attn"], "wqkv": params["blocks"]["attn"]["wqkv"][:1]}}})
    with pytest.raises(ValueError, match="unembed"):
        module.load_params({**params, "unembed": params["embed"].T})


def test_weight_decay_follows_train_py():
    cfg = tiny(**GRID["gpt2"], tie_embeddings=False)
    module = tm.GPT(cfg)
    decayed = bench.decayed_names(cfg)
    assert decayed == {"embed", "pos_embed", "unembed", "blocks.attn.wqkv", "blocks.attn.wo", "blocks.mlp.w_in",
                       "blocks.mlp.w_out"}
    groups = bench.torch_optimizer(module, decayed).param_groups
    by_tensor = {id(p): name for name, p in module.named_parameters()}
    assert {by_tensor[id(p)] for group in groups if group["weight_decay"] for p in group["params"]} == decayed


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_five_adamw_steps_give_the_same_losses(name):
    cfg = tiny(**GRID[name])
    params = params_for(cfg)
    batches = [(tokens(cfg, seed=2 * i), tokens(cfg, seed=2 * i + 1)) for i in range(5)]
    module = twin(cfg, params)
    decayed = bench.decayed_names(cfg)
    step = bench.torch_train_step(module.loss, bench.torch_optimizer(module, decayed))
    torch_losses = [step(*torch_batch(x, y)).item() for x, y in batches]

    opt = bench.jax_optimizer(decayed)
    jax_step, state, jax_losses = bench.jax_train_step(cfg, opt), (params, opt.init(params)), []
    for x, y in batches:
        *state, loss = jax_step(*state, {"inputs": x, "targets": y})
        jax_losses.append(float(loss))
    np.testing.assert_allclose(torch_losses, jax_losses, rtol=SCALE_TOL)
    final, start, g = flat(as_numpy(state[0])), flat(params), cfg.n_heads // cfg.kv_heads
    assert max(np.abs(final[key] - start[key]).max() for key in final) > bench.OPTIM.lr
    for key, value in flat(module.jax_params()).items():
        expected = final[key]
        if key == "['blocks']['attn']['bqkv']":  # the key bias: see the module docstring
            assert np.abs(value[:, :, g] - expected[:, :, g]).max() <= 2 * len(batches) * bench.OPTIM.lr
            value, expected = np.delete(value, g, axis=2), np.delete(expected, g, axis=2)
        assert_close_to_scale(value, expected, name=key)
