"""The whole model: the option grid against the float64 reference, causality, loss at init,
mixed precision, initializers, and the public helpers (count_params, flops_per_token)."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cross_entropy
import model
import parameters
import np_reference as ref
from numerics import assert_close
from configs.base import ModelConfig

B, T = 2, 12


def tiny(**kw):
    base = dict(vocab_size=61, seq_len=16, n_layers=2, d_model=32, n_heads=4)
    return ModelConfig(**{**base, **kw})


# Every menu item appears in at least one row.
GRID = {
    "llama": dict(),
    "gpt2": dict(norm="layernorm", norm_bias=True, pos="learned", attn_bias=True, mlp="gelu_tanh",
                 mlp_bias=True, vocab_multiple=64),
    "post-norm-untied": dict(norm_position="post", tie_embeddings=False, mlp="gelu", unembed_init="fan_in"),
    "gqa-qknorm-relu2-softcap": dict(n_kv_heads=2, qk_norm=True, mlp="relu2", logit_softcap=5.0,
                                     norm_scale=False),
    "mqa-nope-geglu": dict(n_kv_heads=1, pos="none", mlp="geglu", d_ff=40, init="xavier"),
    "headdim-yarn-einsum": dict(head_dim=12, yarn_factor=4.0, rope_theta=1e6, attn_impl="einsum",
                                init="fan_in", embed_init="fan_in"),
    "layernorm-noscale-zeroinit": dict(norm="layernorm", norm_scale=False, zero_init_out=True,
                                       d_ff_rule="4x", z_loss=1e-3, remat="full"),
}


def params_for(cfg, seed=0):
    """Initial params with the zero-init and norm gains perturbed so every weight matters."""
    params = model.init_params(cfg, jax.random.key(seed))
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(tree, leaves)


def tokens(cfg, seed=0, shape=(B, T)):
    return jax.random.randint(jax.random.key(100 + seed), shape, 0, cfg.vocab_size)


@pytest.mark.parametrize("name", GRID)
def test_forward_matches_float64_reference(name):
    cfg = tiny(**GRID[name])
    params, toks = params_for(cfg), tokens(cfg)
    logits, _ = jax.jit(model.forward, static_argnums=2)(params, toks, cfg)
    assert logits.shape == (B, T, cfg.vocab_size) and logits.dtype == jnp.float32
    assert bool(jnp.isfinite(logits).all())
    expected = ref.forward(ref.to_float64(params), toks, cfg)
    assert_close(logits, expected, rel=1e-5)


@pytest.mark.parametrize("name", GRID)
def test_loss_matches_reference_cross_entropy(name):
    cfg = tiny(**GRID[name])
    params, toks, targets = params_for(cfg), tokens(cfg), tokens(cfg, seed=1)
    loss, metrics = model.loss_fn(params, {"inputs": toks, "targets": targets}, cfg)
    z = ref.forward(ref.to_float64(params), toks, cfg)
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    ce = np.mean(lse - np.take_along_axis(z, np.asarray(targets)[..., None], -1)[..., 0])
    assert float(metrics["ce"]) == pytest.approx(ce, rel=1e-5)
    assert float(loss) == pytest.approx(ce + cfg.z_loss * np.mean(lse ** 2), rel=1e-5)


@pytest.mark.parametrize("name", GRID)
def test_causality(name):
    cfg = tiny(**GRID[name])
    params, toks = params_for(cfg), tokens(cfg)
    t = 7
    changed = toks.at[:, t].set((toks[:, t] + 1) % cfg.vocab_size)
    a, b = model.forward(params, toks, cfg)[0], model.forward(params, changed, cfg)[0]
    np.testing.assert_array_equal(a[:, :t], b[:, :t])
    assert not np.allclose(a[:, t], b[:, t])


@pytest.mark.parametrize("name", ["llama", "gpt2", "gqa-qknorm-relu2-softcap", "post-norm-untied"])
def test_fresh_model_loss_is_log_vocab(name):
    # Small-std output weights give near-uniform predictions (fan-in init of the head would not).
    cfg = tiny(**{**GRID[name], "unembed_init": "normal"}, vocab_size=512, d_model=64)
    params = model.init_params(cfg, jax.random.key(0))
    batch = {"inputs": tokens(cfg, shape=(4, 16)), "targets": tokens(cfg, seed=1, shape=(4, 16))}
    loss, _ = model.loss_fn(params, batch, cfg)
    assert abs(float(loss) - math.log(512)) < 0.05 * math.log(512)


def test_padded_vocabulary_never_gets_probability():
    cfg = tiny(vocab_size=61, vocab_multiple=64)
    params = params_for(cfg)
    params["embed"] = params["embed"].at[61:].set(100.0)  # would dominate if it leaked
    logits, _ = model.forward(params, tokens(cfg), cfg)
    assert logits.shape[-1] == 61
    grads = jax.grad(lambda p: model.loss_fn(p, {"inputs": tokens(cfg), "targets": tokens(cfg, 1)}, cfg)[0])(params)
    np.testing.assert_array_equal(grads["embed"][61:], 0.0)


def test_bfloat16_compute_with_float32_params():
    cfg = tiny(compute_dtype="bfloat16", n_kv_heads=2)
    params, toks = params_for(cfg), tokens(cfg)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    logits, _ = model.forward(params, toks, cfg)
    assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())
    full, _ = model.forward(params, toks, dataclasses.replace(cfg, compute_dtype="float32"))
    assert_close(logits, full, rel=3e-2)   # bfloat16 keeps 8 bits of mantissa
    batch = {"inputs": toks, "targets": tokens(cfg, 1)}
    grads = jax.grad(lambda p: model.loss_fn(p, batch, cfg)[0])(params)
    assert all(g.dtype == jnp.float32 and bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


def test_bfloat16_params():
    cfg = tiny(param_dtype="bfloat16", compute_dtype="bfloat16")
    params = model.init_params(cfg, jax.random.key(0))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    assert bool(jnp.isfinite(model.forward(params, tokens(cfg), cfg)[0]).all())


@pytest.mark.parametrize("remat", ["dots", "full"])
def test_remat_gives_the_same_gradients(remat):
    cfg = tiny(n_kv_heads=2, n_layers=3, remat="none")
    params, batch = params_for(cfg), {"inputs": tokens(cfg), "targets": tokens(cfg, 1)}
    grad = lambda c: jax.jit(jax.grad(lambda p: model.loss_fn(p, batch, c)[0]))(params)
    jax.tree.map(lambda a, b: assert_close(a, b, rel=1e-5),
                 grad(cfg), grad(dataclasses.replace(cfg, remat=remat)))


def test_attention_backends_agree_inside_the_model():
    cfg = tiny(n_kv_heads=2)
    params, toks = params_for(cfg), tokens(cfg)
    a, _ = model.forward(params, toks, dataclasses.replace(cfg, attn_impl="xla"))
    b, _ = model.forward(params, toks, dataclasses.replace(cfg, attn_impl="einsum"))
    assert_close(a, b, rel=1e-5)


def test_program_size_does_not_grow_with_depth():
    def n_eqns(layers):
        cfg = tiny(n_layers=layers)
        params = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
        return len(jax.make_jaxpr(model.forward, static_argnums=2)(params, tokens(cfg), cfg).eqns)
    assert n_eqns(2) == n_eqns(12)


# --- Initialization ------------------------------------------------------------------------------


def test_normal_init_stds_and_residual_scaling():
    cfg = ModelConfig(vocab_size=1000, d_model=128, n_heads=4, n_layers=8, init_std=0.02, embed_std=0.05)
    p = model.init_params(cfg, jax.random.key(0))
    assert float(p["embed"].std()) == pytest.approx(0.05, rel=0.03)
    assert float(p["blocks"]["attn"]["wqkv"].std()) == pytest.approx(0.02, rel=0.03)
    out_std = 0.02 / math.sqrt(2 * 8)
    assert float(p["blocks"]["attn"]["wo"].std()) == pytest.approx(out_std, rel=0.03)
    assert float(p["blocks"]["mlp"]["w_out"].std()) == pytest.approx(out_std, rel=0.03)
    assert float(p["blocks"]["mlp"]["w_in"].std()) == pytest.approx(0.02, rel=0.03)
    np.testing.assert_array_equal(p["blocks"]["attn_norm"]["scale"], 1.0)
    unscaled = model.init_params(dataclasses.replace(cfg, residual_scale=False), jax.random.key(0))
    assert float(unscaled["blocks"]["attn"]["wo"].std()) == pytest.approx(0.02, rel=0.03)


def test_xavier_fan_in_and_zero_init():
    cfg = ModelConfig(vocab_size=1000, d_model=128, n_heads=4, n_layers=2, mlp="gelu",
                      init="xavier", residual_scale=False, tie_embeddings=False, unembed_init="fan_in")
    p = model.init_params(cfg, jax.random.key(0))
    w_in = p["blocks"]["mlp"]["w_in"]  # [L, 128, 512]: uniform(+-sqrt(6 / (128 + 512)))
    bound = math.sqrt(6 / (128 + 512))
    assert float(jnp.abs(w_in).max()) <= bound and float(jnp.abs(w_in).max()) > 0.95 * bound
    assert float(p["unembed"].std()) == pytest.approx(1 / math.sqrt(128), rel=0.03)
    fan_in = model.init_params(dataclasses.replace(cfg, init="fan_in"), jax.random.key(0))
    assert float(fan_in["blocks"]["mlp"]["w_out"].std()) == pytest.approx(1 / math.sqrt(512), rel=0.03)
    zero = model.init_params(dataclasses.replace(cfg, zero_init_out=True), jax.random.key(0))
    assert not zero["blocks"]["attn"]["wo"].any() and not zero["blocks"]["mlp"]["w_out"].any()
    assert zero["blocks"]["attn"]["wqkv"].any()


def test_adding_a_parameter_leaves_the_others_unchanged():
    cfg = tiny()
    a = model.init_params(cfg, jax.random.key(3))
    b = model.init_params(dataclasses.replace(cfg, qk_norm=True, attn_bias=True), jax.random.key(3))
    np.testing.assert_array_equal(a["blocks"]["attn"]["wqkv"], b["blocks"]["attn"]["wqkv"])
    np.testing.assert_array_equal(a["embed"], b["embed"])
    assert set(b["blocks"]["attn"]) - set(a["blocks"]["attn"]) == {"bqkv", "bo", "q_norm", "k_norm"}


# --- Specs, counts, FLOPs ------------------------------------------------------------------------


@pytest.mark.parametrize("name", GRID)
def test_specs_describe_the_initialized_tree(name):
    cfg = tiny(**GRID[name])
    specs = model.param_specs(cfg)
    params = model.init_params(cfg, jax.random.key(0))
    is_spec = model.is_spec
    assert jax.tree.structure(specs, is_leaf=is_spec) == jax.tree.structure(params)
    for spec, x in zip(jax.tree.leaves(specs, is_leaf=is_spec), jax.tree.leaves(params)):
        assert spec.shape == x.shape and len(spec.axes) == x.ndim and jnp.dtype(spec.dtype) == x.dtype
    assert model.count_params(cfg) == sum(x.size for x in jax.tree.leaves(params))


def test_flops_per_token_formula():
    cfg = ModelConfig(vocab_size=1000, vocab_multiple=64, d_model=64, n_heads=4, n_kv_heads=2,
                      n_layers=3, mlp="swiglu", d_ff=100)
    e, v = 16, 1024
    matmul = 3 * (64 * (4 + 2 * 2) * e + 4 * e * 64 + 3 * 64 * 100) + 64 * v
    assert model.flops_per_token(cfg, 128) == 6 * matmul + 6 * 3 * 4 * e * 128
    gelu = dataclasses.replace(cfg, mlp="gelu")
    assert model.flops_per_token(cfg, 128) - model.flops_per_token(gelu, 128) == 6 * 3 * 64 * 100


def test_loss_mask_drops_tokens_exactly():
    cfg = tiny()
    params, toks, targets = params_for(cfg), tokens(cfg), tokens(cfg, 1)
    mask = jnp.ones((B, T)).at[1].set(0.0)
    loss, metrics = model.loss_fn(params, {"inputs": toks, "targets": targets, "mask": mask}, cfg)
    row0, _ = model.loss_fn(params, {"inputs": toks[:1], "targets": targets[:1]}, cfg)
    assert float(loss) == pytest.approx(float(row0), rel=1e-5)
    assert float(metrics["tokens"]) == T



@pytest.mark.parametrize("opts", [dict(), dict(tie_embeddings=False, logit_softcap=5.0, z_loss=1e-3),
                                  dict(compute_dtype="bfloat16")], ids=["tied", "untied-softcap-z", "bf16"])
@pytest.mark.parametrize("chunks", [2, 5])
def test_loss_in_sequence_blocks_matches_the_whole_loss(opts, chunks):
    """loss_chunks: the same loss, metrics and gradients, with the gradient taken in the forward
    pass; 5 blocks do not divide T = 12, so the last is padded (and a masked row is in the batch)."""
    cfg = tiny(loss_chunks=1, **opts)
    params = params_for(cfg)
    batch = {"inputs": tokens(cfg), "targets": tokens(cfg, 1), "mask": jnp.ones((B, T)).at[1, 5:].set(0.0)}
    step = lambda c: jax.jit(jax.value_and_grad(lambda p: model.loss_fn(p, batch, c), has_aux=True))(params)
    (loss, metrics), grads = step(cfg)
    (loss_k, metrics_k), grads_k = step(dataclasses.replace(cfg, loss_chunks=chunks))
    rel = 1e-2 if cfg.compute_dtype == "bfloat16" else 1e-5   # bf16: the hidden states' gradient is rounded
    assert float(loss_k) == pytest.approx(float(loss), rel=1e-6)
    for name in ("ce", "z", "tokens"):
        assert float(metrics_k[name]) == pytest.approx(float(metrics[name]), rel=1e-6)
    jax.tree.map(lambda a, b: assert_close(a, b, rel=rel), grads_k, grads)
    no_grad, _ = jax.jit(lambda p: model.loss_fn(p, batch, dataclasses.replace(cfg, loss_chunks=chunks)))(params)
    assert float(no_grad) == pytest.approx(float(loss), rel=1e-6)


def test_loss_in_sequence_blocks_never_holds_all_the_logits():
    # Logits [2 x 64, 4096] in float32 are 2 MiB, and so is their gradient; in 8 blocks, 1/8 of each.
    cfg = tiny(vocab_size=4096, seq_len=64, loss_chunks=1)
    params, batch = params_for(cfg), {"inputs": tokens(cfg, shape=(2, 64)), "targets": tokens(cfg, 1, shape=(2, 64))}
    temps = lambda c: jax.jit(jax.grad(lambda p: model.loss_fn(p, batch, c)[0])).lower(params).compile() \
        .memory_analysis().temp_size_in_bytes
    whole, blocks = temps(cfg), temps(dataclasses.replace(cfg, loss_chunks=8))
    assert whole - blocks >= 2 * 2**20, (whole, blocks)


def test_automatic_loss_blocks_hold_about_d_model_tokens():
    assert cross_entropy.auto_blocks(2, 256, 768) == 1       # 512 tokens < 2 d_model: the logits whole
    assert cross_entropy.auto_blocks(8, 256, 768) == 2       # 2,048 tokens: 2.7 -> the nearest divisor of 256
    assert cross_entropy.auto_blocks(4, 256, 320) == 4
    assert cross_entropy.auto_blocks(16, 1024, 768) == 16    # 21.3 -> 16, not 32
    assert cross_entropy.auto_blocks(4, 96, 64) == 6         # divisors of 96 only

# --- KV cache ------------------------------------------------------------------------------------


@pytest.mark.parametrize("opts", [
    dict(), dict(n_kv_heads=2), dict(n_kv_heads=1, qk_norm=True), dict(pos="learned", attn_bias=True),
    dict(n_kv_heads=2, attn_impl="einsum"), dict(yarn_factor=2.0, norm_position="post"),
], ids=["mha-rope", "gqa", "mqa-qknorm", "learned", "gqa-einsum", "yarn-postnorm"])
def test_decoding_through_the_cache_matches_the_full_forward(opts):
    cfg = tiny(**opts)
    params, toks = params_for(cfg), tokens(cfg)
    full, _ = model.forward(params, toks, cfg)
    step = jax.jit(lambda p, x, c: (lambda logits, aux: (logits, aux["cache"]))(*model.forward(p, x, cfg, cache=c)))
    logits, cache = step(params, toks[:, :5], model.init_cache(cfg, B, T))    # prefill 5
    assert_close(logits, full[:, :5], rel=1e-5)
    for t in range(5, T):                                                     # then one at a time
        logits, cache = step(params, toks[:, t:t + 1], cache)
        assert_close(logits[:, 0], full[:, t], rel=1e-5)
    assert int(cache["index"]) == T and len(cache["k"]) == cfg.n_layers
    assert all(k.shape == (B, cfg.n_kv_heads, T, cfg.head_dim) for k in cache["k"] + cache["v"])


def test_the_decode_layout_gives_the_stacked_layouts_logits():
    cfg = tiny(n_kv_heads=2)
    params, toks = params_for(cfg), tokens(cfg)
    split = model.decode_layout(params, cfg)
    assert isinstance(split["blocks"], tuple) and len(split["blocks"]) == cfg.n_layers
    np.testing.assert_array_equal(split["blocks"][1]["attn"]["wo"], params["blocks"]["attn"]["wo"][1])
    assert "embed" not in split and split["unembed"].shape == (cfg.d_model, cfg.padded_vocab)   # tied, kept once
    assert_close(model.forward(split, toks, cfg)[0], model.forward(params, toks, cfg)[0], rel=1e-6)
    cached = [model.forward(p, toks[:, :4], cfg, cache=model.init_cache(cfg, B, T))[0] for p in (params, split)]
    assert_close(cached[1], cached[0], rel=1e-6)


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_left_padded_rows_match_their_prompts_alone(pos):
    cfg = tiny(pos=pos, n_kv_heads=2)
    params = params_for(cfg)
    short, long = tokens(cfg, 1, (1, 4)), tokens(cfg, 2, (1, 7))
    padded = jnp.concatenate([jnp.zeros((1, 3), short.dtype), short], axis=1)      # left-pad to 7
    batch = jnp.concatenate([padded, long])
    cache = model.init_cache(cfg, 2, 9, start=[3, 0])
    logits, aux = model.forward(params, batch, cfg, cache=cache)
    cache = aux["cache"]
    nxt = jnp.array([[5], [6]])
    step_logits, _ = model.forward(params, nxt, cfg, cache=cache)
    alone_short, _ = model.forward(params, jnp.concatenate([short, nxt[:1]], axis=1), cfg)
    alone_long, _ = model.forward(params, jnp.concatenate([long, nxt[1:]], axis=1), cfg)
    assert_close(logits[0, 3:], alone_short[0, :4], rel=1e-5)
    assert_close(step_logits[0, 0], alone_short[0, 4], rel=1e-5)
    assert_close(step_logits[1, 0], alone_long[0, 7], rel=1e-5)


# --- Extension points ----------------------------------------------------------------------------


def test_a_misspelled_logical_axis_fails_in_one_line():
    with pytest.raises(ValueError, match=r"unknown logical axis 'embd'; valid: .*embed") as err:
        parameters.ParamSpec((2, 3), ("embd", None), "float32", jax.nn.initializers.zeros)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="do not match shape"):
        parameters.ParamSpec((2, 3), ("embed",), "float32", jax.nn.initializers.zeros)


def _doubled_dense(monkeypatch):
    """Register a second FFN kind, a dense MLP whose output is doubled and which reports an
    auxiliary loss, and a pattern alternating it with dense blocks: one registry entry."""
    dense = model.FFN_KINDS["dense"]

    def apply(p, x_ND, cfg, batch):
        y_ND, _ = dense.apply(p, x_ND, cfg, batch)
        return 2.0 * y_ND, {"losses": {"double_aux": jnp.mean(jnp.square(y_ND))}}
    monkeypatch.setitem(model.FFN_KINDS, "double", model.FFNKind(
        specs=dense.specs, apply=apply, matmul_params=dense.matmul_params, params_key="double_blocks"))
    monkeypatch.setattr(model, "block_pattern", lambda cfg: ("dense", "double", "dense"))


def _layer_by_layer(params, toks, cfg):
    """The same model applied one layer at a time, in pattern order, without the scan."""
    b, t = toks.shape
    x_ND = model._embed(params, toks, cfg, jnp.arange(t))
    taken, aux = {"dense": 0, "double": 0}, 0.0
    for layer in range(cfg.n_layers):
        kind = model.block_pattern(cfg)[layer % 3]
        stack = params[model.FFN_KINDS[kind].params_key]
        p = jax.tree.map(lambda w: w[taken[kind]], stack)
        taken[kind] += 1
        x_ND, _, block_aux = model.block(p, x_ND, cfg, kind, b, jnp.arange(t))
        aux = aux + sum(block_aux.get("losses", {}).values())
    x_ND = model.layers.norm(params["final_norm"], x_ND, cfg)
    return model.layers.unembed(params["embed"], x_ND, cfg, transposed=True).reshape(b, t, -1), aux


def test_mixed_block_pattern_scans_one_stack_per_kind(monkeypatch):
    _doubled_dense(monkeypatch)
    cfg = tiny(n_layers=6, n_kv_heads=2)
    params = params_for(cfg)
    assert params["blocks"]["mlp"]["w_in"].shape[0] == 4 and params["double_blocks"]["mlp"]["w_in"].shape[0] == 2
    toks = tokens(cfg)
    logits, aux = model.forward(params, toks, cfg)
    expected, expected_aux = _layer_by_layer(params, toks, cfg)
    assert_close(logits, expected, rel=1e-5)
    assert float(aux["losses"]["double_aux"]) == pytest.approx(float(expected_aux), rel=1e-5)
    loss, metrics = model.loss_fn(params, {"inputs": toks, "targets": tokens(cfg, 1)}, cfg)
    assert float(loss) == pytest.approx(float(metrics["ce"] + metrics["double_aux"]), rel=1e-5)
    assert model.count_params(cfg) == sum(x.size for x in jax.tree.leaves(params))


def test_mixed_block_pattern_decodes_through_the_cache(monkeypatch):
    _doubled_dense(monkeypatch)
    cfg = tiny(n_layers=6, n_kv_heads=2)
    params, toks = params_for(cfg), tokens(cfg)
    full, _ = model.forward(params, toks, cfg)
    logits, aux = model.forward(params, toks[:, :5], cfg, cache=model.init_cache(cfg, B, T))
    assert_close(logits, full[:, :5], rel=1e-5)
    cache = aux["cache"]
    for t in range(5, T):
        logits, aux = model.forward(params, toks[:, t:t + 1], cfg, cache=cache)
        cache = aux["cache"]
        assert_close(logits[:, 0], full[:, t], rel=1e-5)


def test_remat_keeps_less_for_the_backward_pass():
    """What each policy keeps shows in the compiled step's temporary buffers: none > dots > full."""
    cfg = tiny(seq_len=32)
    params, batch = params_for(cfg), {"inputs": tokens(cfg, shape=(8, 32)), "targets": tokens(cfg, 1, shape=(8, 32))}

    def temp_bytes(remat):
        c = dataclasses.replace(cfg, remat=remat)
        grad = jax.jit(jax.grad(lambda p: model.loss_fn(p, batch, c)[0]))
        return grad.lower(params).compile().memory_analysis().temp_size_in_bytes
    none, dots, full = (temp_bytes(r) for r in ("none", "dots", "full"))
    assert none > dots > full, (none, dots, full)
