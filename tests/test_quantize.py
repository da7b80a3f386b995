"""int8 weight-only quantization (quantize.py, layers.Int8Weight): the quantized model's logits
against the float model's, the quantized tree (which weights, their scales, per-layer slicing),
the memory saved, the unknown-scheme error, and that float parameters trace exactly as before."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import layers
import model
import quantize
from configs.base import ConfigError, ModelConfig
from numerics import assert_close, relative_error

B, T = 2, 16

CASES = {
    "swiglu-tied": dict(),
    "gelu-bias-untied": dict(mlp="gelu", mlp_bias=True, attn_bias=True, tie_embeddings=False,
                             norm="layernorm", norm_bias=True, pos="learned"),
    "gqa-bf16-untied": dict(n_kv_heads=2, compute_dtype="bfloat16", tie_embeddings=False),
    "moe-shared": dict(n_experts=4, top_k=2, expert_ff=64, n_shared_experts=1, moe_every=2),
}


def tiny(**kw):
    return ModelConfig(**{**dict(vocab_size=97, seq_len=T, n_layers=2, d_model=64, n_heads=4), **kw})


def params_for(cfg, seed=0):
    """Initial params with every leaf perturbed, so biases and norm gains matter too."""
    params = model.init_params(cfg, jax.random.key(seed))
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return tree.unflatten([x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def tokens(cfg, seed=0):
    return jax.random.randint(jax.random.key(100 + seed), (B, T), 0, cfg.vocab_size)


def int8_paths(params) -> set[str]:
    """Where the tree holds an Int8Weight, as keystr paths."""
    is_int8 = lambda x: isinstance(x, layers.Int8Weight)
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_int8)[0]
    return {jax.tree_util.keystr(path) for path, leaf in flat if is_int8(leaf)}


@pytest.mark.parametrize("name", CASES)
def test_quantized_logits_stay_close_to_the_float_models(name):
    cfg = tiny(**CASES[name])
    params, toks = params_for(cfg), tokens(cfg)
    forward = jax.jit(lambda p: model.forward(p, toks, cfg)[0])
    full, quant = forward(params), forward(quantize.quantize_params(params, cfg, "int8"))
    assert quant.dtype == jnp.float32 and bool(jnp.isfinite(quant).all())
    assert relative_error(quant, full) < 0.03
    assert float(jnp.mean(jnp.argmax(quant, -1) == jnp.argmax(full, -1))) >= 0.9


@pytest.mark.parametrize("name, expected", [
    ("swiglu-tied", {"['embed']"}),
    ("gelu-bias-untied", {"['unembed']"}),
    ("moe-shared", {"['embed']", *(f"['moe_blocks']['mlp']['shared']['{w}']" for w in ("w_in", "w_out"))}),
])
def test_every_matmul_weight_and_nothing_else_is_quantized(name, expected):
    cfg = tiny(**CASES[name])
    paths = int8_paths(quantize.quantize_params(params_for(cfg), cfg, "int8"))
    stacks = ["blocks", "moe_blocks"] if cfg.n_experts else ["blocks"]
    hidden = {f"['{s}']['attn']['{w}']" for s in stacks for w in ("wqkv", "wo")}
    dense = {"['blocks']['mlp']['w_in']", "['blocks']['mlp']['w_out']"}
    assert paths == expected | hidden | dense   # MoE: router and routed experts stay float


def test_q_is_int8_with_one_scale_per_output_channel():
    cfg = tiny(n_kv_heads=2)
    params = params_for(cfg)
    quant = quantize.quantize_params(params, cfg, "int8")
    cases = [(params["blocks"]["attn"]["wqkv"], quant["blocks"]["attn"]["wqkv"], (1,)),      # [L, D, K, G+2, E]
             (params["blocks"]["attn"]["wo"], quant["blocks"]["attn"]["wo"], (1, 2)),        # [L, H, E, D]
             (params["blocks"]["mlp"]["w_in"], quant["blocks"]["mlp"]["w_in"], (1,)),        # [L, D, 2, F]
             (params["embed"], quant["embed"], (1,))]                                        # [V, D]: rows
    for w, qw, in_axes in cases:
        assert qw.q.dtype == jnp.int8 and qw.scale.dtype == jnp.float32 and qw.q.shape == w.shape
        assert int(jnp.max(jnp.abs(qw.q.astype(jnp.int32)))) <= 127
        amax = jnp.max(jnp.abs(w), axis=in_axes, keepdims=True)
        np.testing.assert_allclose(qw.scale, amax / 127, rtol=1e-6)
        assert bool(jnp.all(jnp.max(jnp.abs(qw.q.astype(jnp.int32)), axis=in_axes, keepdims=True) == 127))
        assert bool(jnp.all(jnp.abs(qw.q * qw.scale - w) <= 0.5001 * qw.scale))


def test_an_all_zero_channel_quantizes_to_zero_not_nan():
    qw = quantize.quantize_int8(jnp.zeros((3, 4)).at[:, 1].set(1.0), (0,))
    assert bool(jnp.all(qw.q[:, 0] == 0)) and bool(jnp.all(qw.q[:, 1] == 127))
    assert bool(jnp.isfinite(qw.scale).all()) and float(qw.scale[0, 0]) == 0.0


def test_int8_matmul_is_the_dequantized_weights_algebra():
    w = jax.random.normal(jax.random.key(0), (64, 2, 3, 16))                # wqkv-like [D, K, G+2, E]
    x = jax.random.normal(jax.random.key(1), (5, 64))
    qw = quantize.quantize_int8(w, (0,))
    dequant = (qw.q * qw.scale).reshape(64, -1)
    assert_close(layers.matmul(x, qw), x @ dequant, rel=1e-6)
    y_bf16 = layers.matmul(x.astype(jnp.bfloat16), qw)
    assert y_bf16.dtype == jnp.bfloat16
    assert_close(y_bf16, x @ dequant, rel=1e-2)
    table = quantize.quantize_int8(jax.random.normal(jax.random.key(2), (10, 64)), (1,))   # per-row
    toks = jnp.array([3, 0, 9, 3])
    np.testing.assert_allclose(layers.embed(table, toks, jnp.float32), (table.q * table.scale)[toks], rtol=1e-6)
    assert_close(layers.matmul(x, table, transposed=True), x @ (table.q * table.scale).T, rel=1e-6)   # tied


def test_quantized_stacks_slice_per_layer_and_decode_through_the_cache():
    cfg = tiny(n_kv_heads=2)
    quant, toks = quantize.quantize_params(params_for(cfg), cfg, "int8"), tokens(cfg)
    layer1 = jax.tree.map(lambda w: w[1], quant["blocks"])
    wqkv = layer1["attn"]["wqkv"]
    assert isinstance(wqkv, layers.Int8Weight) and wqkv.q.shape == quant["blocks"]["attn"]["wqkv"].shape[1:]
    assert wqkv.scale.shape == (1, *wqkv.q.shape[1:])
    full, _ = model.forward(quant, toks, cfg)
    step = jax.jit(lambda p, x, c: (lambda logits, aux: (logits, aux["cache"]))(*model.forward(p, x, cfg, cache=c)))
    logits, cache = step(quant, toks[:, :5], model.init_cache(cfg, B, T))
    assert_close(logits, full[:, :5], rel=1e-5)
    for t in range(5, 8):
        logits, cache = step(quant, toks[:, t:t + 1], cache)
        assert_close(logits[:, 0], full[:, t], rel=1e-5)
    if hasattr(model, "decode_layout"):   # the per-layer tuples a decode reads
        assert_close(model.forward(model.decode_layout(quant, cfg), toks, cfg)[0], full, rel=1e-6)


def test_matmul_weights_take_about_a_quarter_of_the_memory():
    cfg = tiny(d_model=128, vocab_size=1000)
    params = params_for(cfg)
    quant = quantize.quantize_params(params, cfg, "int8")
    paths = int8_paths(quant)
    is_int8 = lambda x: isinstance(x, layers.Int8Weight)
    flat = lambda tree: {jax.tree_util.keystr(path): x
                         for path, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_int8)[0]}
    before = sum(x.nbytes for path, x in flat(params).items() if path in paths)
    after = sum(x.nbytes for path, x in flat(quant).items() if path in paths)
    assert 3.8 < before / after <= 4.0    # int8 plus one float32 scale per output channel
    assert quantize.param_bytes(params) - quantize.param_bytes(quant) == before - after
    assert quantize.memory_line(params, quant).startswith("quantized: parameters ")


def test_an_unknown_scheme_is_a_one_line_config_error():
    cfg = tiny()
    with pytest.raises(ConfigError) as err:
        quantize.quantize_params(params_for(cfg), cfg, "int4")
    assert str(err.value) == "--quantize int4: unknown scheme; valid: int8"


@pytest.mark.parametrize("w_shape, x_dim, expression", [
    ((32, 2, 6, 8), 32, lambda x, w: x @ w.astype(x.dtype).reshape(32, -1)),            # wqkv
    ((4, 8, 32), 32, lambda x, w: x @ w.astype(x.dtype).reshape(-1, 32)),               # wo
    ((48, 32), 48, lambda x, w: x @ w.astype(x.dtype)),                                 # w_out
    ((32, 97), 32, lambda x, w: jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32)),  # unembed
])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_float_weights_trace_to_the_same_program_as_before(w_shape, x_dim, expression, dtype):
    """layers.matmul on a plain array is the expression each layer inlined before quantization
    existed: the training path's program is unchanged, op for op."""
    x, w = jnp.ones((6, x_dim), dtype), jnp.ones(w_shape, jnp.float32)
    preferred = jnp.float32 if w_shape == (32, 97) else None
    new = jax.jit(lambda x, w: layers.matmul(x, w, preferred)).lower(x, w).as_text()
    assert new == jax.jit(expression).lower(x, w).as_text()
