"""Each layer of layers.py against the float64 NumPy reference, plus RoPE/YaRN properties."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import layers
import np_reference as ref
from configs.base import MLPS, ConfigError, ModelConfig
from numerics import assert_close

REL = 1e-5    # float32 against float64, relative to each tensor's scale
rng = np.random.default_rng(0)


def randn(*shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def tiny(**kw):
    base = dict(vocab_size=50, seq_len=16, n_layers=1, d_model=32, n_heads=4)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("scale", [True, False])
def test_rms_norm(scale):
    x, g = randn(5, 32), randn(32) if scale else None
    out = layers.rms_norm(jnp.asarray(x), None if g is None else jnp.asarray(g), 1e-5)
    assert_close(out, ref.rms_norm(x.astype(np.float64), g, 1e-5), REL)


@pytest.mark.parametrize("scale, bias", [(True, True), (True, False), (False, False)])
def test_layer_norm(scale, bias):
    x = randn(5, 32, scale=3.0) + 1.0
    g, b = (randn(32) if scale else None), (randn(32) if bias else None)
    out = layers.layer_norm(jnp.asarray(x), g, b, 1e-6)
    assert_close(out, ref.layer_norm(x.astype(np.float64), g, b, 1e-6), REL)


def test_norm_keeps_compute_dtype():
    x = jnp.ones((3, 8), jnp.bfloat16)
    assert layers.norm({"scale": jnp.ones(8)}, x, tiny()).dtype == jnp.bfloat16


@pytest.mark.parametrize("yarn", [1.0, 4.0])
def test_rope_matches_reference(yarn):
    cfg = tiny(head_dim=16, rope_theta=500.0, yarn_factor=yarn)
    x, pos = randn(12, 16), np.arange(3, 15)
    cos, sin = layers.rope_tables(jnp.asarray(pos), cfg)
    assert_close(layers.apply_rope(jnp.asarray(x), cos, sin), ref.rope(x.astype(np.float64), pos, cfg), REL)


@pytest.mark.parametrize("yarn", [1.0, 8.0])
def test_rope_scores_depend_only_on_relative_position(yarn):
    cfg = tiny(head_dim=16, yarn_factor=yarn)
    q, k = jnp.asarray(randn(16)), jnp.asarray(randn(16))

    def score(m, n):
        cos, sin = layers.rope_tables(jnp.array([m, n]), cfg)
        rq, rk = layers.apply_rope(jnp.stack([q, k]), cos, sin)
        return float(rq @ rk)
    for m, n in [(5, 2), (9, 9), (3, 11)]:
        assert score(m, n) == pytest.approx(score(m + 37, n + 37), rel=1e-4, abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)


def test_yarn_keeps_high_frequencies_and_stretches_low_ones():
    plain, _ = layers.rope_frequencies(tiny(head_dim=64, seq_len=256))
    yarn, mscale = layers.rope_frequencies(tiny(head_dim=64, seq_len=256, yarn_factor=4.0))
    rotations = 256 * plain / (2 * math.pi)
    high, low = rotations > 32, rotations < 1
    assert high.any() and low.any() and (~high & ~low).any()
    np.testing.assert_allclose(yarn[high], plain[high], rtol=1e-12)
    np.testing.assert_allclose(yarn[low], plain[low] / 4, rtol=1e-12)
    mid = ~high & ~low
    assert np.all(yarn[mid] < plain[mid]) and np.all(yarn[mid] > plain[mid] / 4)
    assert mscale == pytest.approx(0.1 * math.log(4) + 1)
    _, custom = layers.rope_frequencies(tiny(head_dim=64, yarn_factor=4.0, yarn_mscale=1.0))
    assert custom == 1.0


def _impls():
    impls = ["einsum", "xla"]
    gpu = jax.default_backend() == "gpu"
    return impls + ["cudnn" if gpu else pytest.param("cudnn", marks=pytest.mark.skip("cudnn needs a GPU"))]


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("k, g", [(4, 1), (2, 2), (1, 4)], ids=["mha", "gqa", "mqa"])
def test_attend_matches_reference(impl, k, g):
    b, t, e = 2, 7, 8
    dtype = jnp.bfloat16 if impl == "cudnn" else jnp.float32
    q, key, v = randn(b, t, k, g, e), randn(b, t, k, e), randn(b, t, k, e)
    head_major = lambda a: jnp.asarray(a, dtype).transpose(0, 2, 1, 3)   # keys and values [B, K, S, E]
    out = layers.attend(jnp.asarray(q, dtype), head_major(key), head_major(v), None, impl)
    expected = np.stack([[[ref.causal_attention(*(a.astype(np.float64) for a in
                                                  (q[i, :, h, j], key[i, :, h], v[i, :, h])))
                           for i in range(b)] for h in range(k)] for j in range(g)]).transpose(2, 3, 1, 0, 4)
    assert_close(np.asarray(out, np.float32), expected, 2e-2 if dtype == jnp.bfloat16 else REL)


def test_auto_attention_backend_per_platform():
    bf16 = dict(compute_dtype="bfloat16")
    assert layers.attention_backend(tiny(), "cpu") == "einsum"
    assert layers.attention_backend(tiny(**bf16), "gpu") == "cudnn"
    assert layers.attention_backend(tiny(), "gpu") == "xla"                           # float32: not cuDNN's
    assert layers.attention_backend(tiny(head_dim=12, **bf16), "gpu") == "xla"        # not a multiple of 8
    assert layers.attention_backend(tiny(head_dim=256, d_model=512, **bf16), "gpu") == "xla"
    assert layers.attention_backend(tiny(**bf16), "tpu") == "xla"
    assert layers.attention_backend(tiny(attn_impl="xla"), "cpu") == "xla"            # a named backend stays
    assert layers.attention_backend(tiny(attn_impl="einsum", **bf16), "gpu") == "einsum"
    assert layers.attention_backend(tiny(attn_impl="cudnn", **bf16), "gpu") == "cudnn"
    for cfg, platform, here in [(tiny(attn_impl="cudnn", **bf16), "cpu", "cpu, bfloat16, head_dim 8"),
                                (tiny(attn_impl="cudnn"), "gpu", "gpu, float32, head_dim 8")]:
        with pytest.raises(ConfigError) as err:
            layers.attention_backend(cfg, platform)
        assert str(err.value) == (f"model.attn_impl='cudnn' needs a GPU, model.compute_dtype bfloat16 or float16 and "
                                  f"head_dim a multiple of 8 up to 128 (here: {here}); choose 'auto', 'einsum' or 'xla'")


def test_a_cudnn_run_still_attends_over_a_cache_off_a_gpu():
    """Decoding always runs the einsums, so a run trained with cuDNN samples on a CPU."""
    cfg, b, t = tiny(attn_impl="cudnn"), 2, 3
    k, e, d = cfg.n_kv_heads, cfg.head_dim, cfg.d_model
    p = {"wqkv": jnp.asarray(randn(d, k, cfg.n_heads // k + 2, e, scale=0.2)),
         "wo": jnp.asarray(randn(cfg.n_heads, e, d, scale=0.2))}
    cache = jnp.zeros((b, k, cfg.seq_len, e))
    mask_BTS = jnp.broadcast_to(jnp.arange(cfg.seq_len) < t, (b, t, cfg.seq_len))
    out, _ = layers.attention(p, jnp.asarray(randn(b * t, d)), cfg, b, jnp.arange(t), mask_BTS, (cache, cache, 0))
    assert out.shape == (b * t, d) and bool(jnp.all(jnp.isfinite(out)))


@pytest.mark.parametrize("k, g", [(4, 1), (2, 2)], ids=["mha", "gqa"])
def test_blocked_attention_gradients_match_float64_autograd(k, g):
    """The einsum attention's own backward (FlashAttention's, over query blocks of 64: here
    64 + 64 + 22 queries) against PyTorch's autograd of the plain masked softmax in float64."""
    import torch
    b, t, e = 2, 150, 8
    q, key, v, dout = randn(b, t, k, g, e), randn(b, t, k, e), randn(b, t, k, e), randn(b, t, k, g, e)
    head_major = lambda a: jnp.asarray(a).transpose(0, 2, 1, 3)
    loss = lambda q, key_BKSE, v_BKSE: jnp.sum(layers.attend(q, key_BKSE, v_BKSE, None, "einsum") * dout)
    grads = jax.grad(loss, argnums=(0, 1, 2))(jnp.asarray(q), head_major(key), head_major(v))

    tq, tk, tv = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (q, key, v))
    heads = lambda a: a.repeat_interleave(g, dim=2).permute(0, 2, 1, 3)     # [B, H, T, E], query head h -> kv h // g
    scores = tq.reshape(b, t, k * g, e).permute(0, 2, 1, 3) @ heads(tk).transpose(-1, -2) / math.sqrt(e)
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), -torch.inf)
    out = (scores.softmax(-1) @ heads(tv)).permute(0, 2, 1, 3)
    (out.reshape(dout.shape) * torch.tensor(dout, dtype=torch.float64)).sum().backward()
    assert_close(grads[0], tq.grad.numpy(), REL, "dq")
    assert_close(np.asarray(grads[1]).transpose(0, 2, 1, 3), tk.grad.numpy(), REL, "dk")
    assert_close(np.asarray(grads[2]).transpose(0, 2, 1, 3), tv.grad.numpy(), REL, "dv")


@pytest.mark.parametrize("opts", [
    dict(), dict(n_kv_heads=2, qk_norm=True), dict(n_kv_heads=1, attn_bias=True, pos="none"),
    dict(qk_norm=True, norm_scale=False, yarn_factor=2.0),
], ids=["mha-rope", "gqa-qknorm", "mqa-bias-nope", "qknorm-noscale-yarn"])
def test_attention_block_matches_reference(opts):
    cfg = tiny(**opts)
    k, g, e, d = cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, cfg.head_dim, cfg.d_model
    p = {"wqkv": randn(d, k, g + 2, e, scale=0.2), "wo": randn(cfg.n_heads, e, d, scale=0.2)}
    if cfg.attn_bias:
        p |= {"bqkv": randn(k, g + 2, e, scale=0.2), "bo": randn(d, scale=0.2)}
    if cfg.qk_norm and cfg.norm_scale:
        p |= {"q_norm": randn(e), "k_norm": randn(e)}
    x = randn(2, 9, d)
    out, _ = layers.attention({n: jnp.asarray(a) for n, a in p.items()}, jnp.asarray(x.reshape(18, d)),
                              cfg, 2, jnp.arange(9))
    p64 = ref.to_float64(p)
    expected = np.stack([ref.attention(p64, row.astype(np.float64), cfg) for row in x]).reshape(18, d)
    assert_close(out, expected, REL)


@pytest.mark.parametrize("kind", sorted(MLPS))
@pytest.mark.parametrize("bias", [False, True])
def test_mlp_matches_reference(kind, bias):
    cfg = tiny(mlp=kind, d_ff=24, mlp_bias=bias)
    gated = cfg.gated
    p = {"w_in": randn(32, 2, 24, scale=0.3) if gated else randn(32, 24, scale=0.3),
         "w_out": randn(24, 32, scale=0.3)}
    if bias:
        p |= {"b_in": randn(2, 24) if gated else randn(24), "b_out": randn(32)}
    x = randn(6, 32)
    out = layers.mlp({n: jnp.asarray(a) for n, a in p.items()}, jnp.asarray(x), cfg)
    assert_close(out, ref.mlp(ref.to_float64(p), x.astype(np.float64), cfg), REL)


def test_embed_and_unembed_with_padding_and_softcap():
    cfg = tiny(vocab_size=50, vocab_multiple=64, logit_softcap=2.0)
    table = randn(64, 32)
    tokens = np.array([[0, 49, 7]])
    x = layers.embed(jnp.asarray(table), jnp.asarray(tokens), jnp.float32)
    np.testing.assert_array_equal(x, table[tokens])
    h = randn(3, 32)
    logits = layers.unembed(jnp.asarray(table), jnp.asarray(h), cfg, transposed=True)   # a tied table [V, D]
    untied = layers.unembed(jnp.asarray(table.T), jnp.asarray(h), cfg)                    # the unembedding [D, V]
    np.testing.assert_array_equal(layers.embed(jnp.asarray(table.T), jnp.asarray(tokens), jnp.float32, vocab_axis=1), x)
    assert logits.shape == (3, 50) and logits.dtype == jnp.float32
    assert_close(untied, logits, REL)
    expected = 2.0 * np.tanh((h.astype(np.float64) @ table.T.astype(np.float64))[:, :50] / 2.0)
    assert_close(logits, expected, REL)
    assert float(jnp.abs(logits).max()) <= 2.0   # tanh saturates to exactly 1 in float32
