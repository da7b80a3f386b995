"""Pure-function transformer layers. Parameters come in as dicts of arrays; nothing here
knows about devices or configs beyond the ModelConfig it is handed.

Shape suffixes: B batch, T query length, S key length, N = B*T rows, D d_model,
H query heads, K kv heads, G = H // K query heads per kv head, E head_dim, F MLP hidden, V vocab.
Activations stay 2-D [N, D] around the matmuls (one GEMM per projection), and einsum attention
runs head-major [B, K, G, T, E]: both chosen by measurement (notes/benchmarks.md).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from configs.base import ConfigError

# --- Matmul weights ------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8Weight:
    """A matmul weight stored as int8 with a float32 scale per output channel, w ~ q * scale
    (quantize.py builds them for decoding). `scale` has q's rank with the input axes kept as
    size 1, so it broadcasts against q in every view of the weight: a layer's slice w[i] (both
    leaves carry the stacked axes, so jax.tree.map slices them together), a tied embedding table
    contracted on D (its rows are the unembedding's output channels), a row lookup."""
    q: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes


def matmul(x_NI, w, preferred_element_type=None, transposed: bool = False):
    """x [N, I] times a weight whose leading axes flatten to I (the input) and the rest to O, or
    with `transposed` a weight [O, I] contracted on its last axis (a tied embedding table used
    as the unembedding: its transposed view would be copied whole before each matrix-vector
    product, on every decode step, by XLA:CPU's dot layout).

    A plain array is cast to x's dtype, as training always has. An Int8Weight is dequantized
    inside the matmul: (x @ q) * scale, the per-output-channel scale applied after the dot (exact
    algebra), so no float copy of the weight is kept; int8 converts exactly to bf16 and float32.
    XLA:CPU still materializes the converted operand of each dot, so on a CPU this saves memory,
    not decode time (timings: quantize.py)."""
    quantized = isinstance(w, Int8Weight)
    dense = (w.q if quantized else w).astype(x_NI.dtype)
    if transposed:   # [O, I]
        y_NO = jax.lax.dot_general(x_NI, dense, (((1,), (1,)), ((), ())), preferred_element_type=preferred_element_type)
    else:            # [I..., O...]
        y_NO = jnp.dot(x_NI, dense.reshape(x_NI.shape[-1], -1), preferred_element_type=preferred_element_type)
    if not quantized:
        return y_NO
    # The scale in float32: rounded to bf16 it would bias whole output channels.
    return (y_NO.astype(jnp.float32) * w.scale.reshape(-1)).astype(y_NO.dtype)


# --- Norms ---------------------------------------------------------------------------------------


def rms_norm(x, scale, eps):
    """x / rms(x) * scale, computed in float32."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y if scale is None else y * scale.astype(jnp.float32)).astype(x.dtype)


def layer_norm(x, scale, bias, eps):
    """(x - mean) / std * scale + bias, computed in float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


def norm(p, x, cfg):
    """The configured norm; `p` holds its optional "scale" and "bias"."""
    if cfg.norm == "rmsnorm":
        return rms_norm(x, p.get("scale"), cfg.norm_eps)
    return layer_norm(x, p.get("scale"), p.get("bias"), cfg.norm_eps)


# --- Rotary positions (RoPE, with YaRN) ----------------------------------------------------------


def rope_frequencies(cfg) -> tuple[np.ndarray, float]:
    """Inverse frequencies [E/2] and the attention temperature factor (mscale).

    Plain RoPE: inv_freq_i = theta^(-2i/E). YaRN (Peng et al., 2023, sec. 3.2-3.4) with factor s:
    for each dimension, r_i = L_orig / wavelength_i counts its rotations over the original context;
    a ramp gamma(r) = clip((r - beta_slow) / (beta_fast - beta_slow), 0, 1) keeps high frequencies
    (gamma = 1) and divides low ones by s (gamma = 0): inv_freq' = (1 - gamma) inv_freq / s + gamma inv_freq.
    Logits are sharpened by mscale^2 with mscale = 0.1 ln(s) + 1, applied to both q and k.
    """
    e = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, e, 2, dtype=np.float64) / e)
    s = cfg.yarn_factor
    if s == 1.0:
        return inv_freq, 1.0
    original_len = cfg.yarn_original_len or cfg.seq_len
    rotations = original_len * inv_freq / (2 * math.pi)
    gamma = np.clip((rotations - cfg.yarn_beta_slow) / (cfg.yarn_beta_fast - cfg.yarn_beta_slow), 0.0, 1.0)
    inv_freq = (1.0 - gamma) * inv_freq / s + gamma * inv_freq
    mscale = cfg.yarn_mscale if cfg.yarn_mscale is not None else 0.1 * math.log(s) + 1.0
    return inv_freq, mscale


def rope_tables(positions, cfg):
    """cos and sin tables [..., E/2] for integer positions [...], scaled by YaRN's mscale."""
    inv_freq, mscale = rope_frequencies(cfg)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    return jnp.cos(angles) * mscale, jnp.sin(angles) * mscale


def apply_rope(x, cos, sin):
    """Rotate the halves (x1, x2) of the last axis by the angle tables (NeoX/LLaMA layout)."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


# --- Attention -----------------------------------------------------------------------------------


def _scores(q_BKGTE, k_BKSE, mask, scale):
    """Scaled float32 scores [B, K, G, T, S], the keys `mask` (broadcast to them) hides at a finite
    floor, not -inf: a row with every key masked then gives a uniform, not NaN, softmax."""
    scores = jnp.einsum("bkgte,bkse->bkgts", q_BKGTE, k_BKSE, preferred_element_type=jnp.float32)
    return jnp.where(mask, scores * scale, jnp.finfo(jnp.float32).min)


def _einsum_attention(q_BKGTE, k_BKSE, v_BKSE, mask_BTS, scale):
    probs = jax.nn.softmax(_scores(q_BKGTE, k_BKSE, mask_BTS[:, None, None], scale), axis=-1)
    return jnp.einsum("bkgts,bkse->bkgte", probs.astype(v_BKSE.dtype), v_BKSE)


def _block_scores(q_BKGTE, k_BKSE, start: int, scale: float):
    """_scores of the queries at positions [start, start + T) over keys [0, S), causally masked."""
    t, s = q_BKGTE.shape[3], k_BKSE.shape[2]
    return _scores(q_BKGTE, k_BKSE, jnp.arange(s)[None, :] <= jnp.arange(start, start + t)[:, None], scale)


def _causal_block_fwd(q_BKGTE, k_BKSE, v_BKSE, start, scale):
    scores = _block_scores(q_BKGTE, k_BKSE, start, scale)
    top = jnp.max(scores, axis=-1, keepdims=True)
    weights = jnp.exp(scores - top)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    # Normalizing the [T, E] output rather than the [T, S] weights: one division per value, not per score.
    out = jnp.einsum("bkgts,bkse->bkgte", weights.astype(v_BKSE.dtype), v_BKSE, preferred_element_type=jnp.float32)
    out = (out / total).astype(v_BKSE.dtype)
    return out, (q_BKGTE, k_BKSE, v_BKSE, out, top + jnp.log(total))


def _causal_block_bwd(start, scale, residuals, dout_BKGTE):
    """FlashAttention's backward (Dao, 2023): the probabilities again from the scores and the
    log-sum-exp, and softmax's row term as rowsum(dO * O) over E, which equals rowsum(dP * P)
    over S (O = P V) but reads [T, E] rather than [T, S]."""
    q_BKGTE, k_BKSE, v_BKSE, out_BKGTE, lse = residuals
    probs = jnp.exp(_block_scores(q_BKGTE, k_BKSE, start, scale) - lse)
    row = jnp.sum(dout_BKGTE.astype(jnp.float32) * out_BKGTE.astype(jnp.float32), axis=-1, keepdims=True)
    dprobs = jnp.einsum("bkgte,bkse->bkgts", dout_BKGTE, v_BKSE, preferred_element_type=jnp.float32)
    dscores = (probs * (dprobs - row) * scale).astype(q_BKGTE.dtype)
    dq = jnp.einsum("bkgts,bkse->bkgte", dscores, k_BKSE)
    dk = jnp.einsum("bkgts,bkgte->bkse", dscores, q_BKGTE)
    dv = jnp.einsum("bkgts,bkgte->bkse", probs.astype(v_BKSE.dtype), dout_BKGTE)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _causal_block(q_BKGTE, k_BKSE, v_BKSE, start: int, scale: float):
    """Softmax attention of the queries at [start, start + T) over keys [0, S), causally masked."""
    return _causal_block_fwd(q_BKGTE, k_BKSE, v_BKSE, start, scale)[0]


_causal_block.defvjp(_causal_block_fwd, _causal_block_bwd)


def _causal_einsum_attention(q_BKGTE, k_BKSE, v_BKSE, scale):
    """Causal self-attention in query blocks: block [start, end) attends only to keys [0, end), so
    the fully masked blocks above the diagonal are never computed. Blocks of at least 64 queries,
    at most 8 of them, a size chosen by timing whole training steps (notes/benchmarks.md)."""
    t = q_BKGTE.shape[3]
    block = max(64, -(-t // 8))
    outs = [_causal_block(q_BKGTE[:, :, :, start:start + block], k_BKSE[:, :, :start + block],
                          v_BKSE[:, :, :start + block], start, scale) for start in range(0, t, block)]
    return jnp.concatenate(outs, axis=3)


def cudnn_fits(cfg, platform: str) -> bool:
    """Whether cuDNN's flash attention runs `cfg` on `platform`: a GPU, 16-bit compute, head_dim a
    multiple of 8 up to 128."""
    shapes = cfg.compute_dtype in ("bfloat16", "float16") and cfg.head_dim % 8 == 0 and cfg.head_dim <= 128
    return platform == "gpu" and shapes


def attention_backend(cfg, platform: str) -> str:
    """cfg.attn_impl as training runs it on `platform` (a jax.default_backend() name). "auto" is the
    backend measured fastest there (notes/benchmarks.md): the blocked einsums on a CPU, cuDNN's
    flash attention on a GPU where its shape rules allow, XLA's jax.nn.dot_product_attention
    otherwise. "cudnn" where it cannot run is a ConfigError naming what it needs."""
    fits = cudnn_fits(cfg, platform)
    if cfg.attn_impl == "cudnn" and not fits:
        raise ConfigError(f"model.attn_impl='cudnn' needs a GPU, model.compute_dtype bfloat16 or float16 and "
                          f"head_dim a multiple of 8 up to 128 (here: {platform}, {cfg.compute_dtype}, head_dim "
                          f"{cfg.head_dim}); choose 'auto', 'einsum' or 'xla'")
    if cfg.attn_impl != "auto":
        return cfg.attn_impl
    return "einsum" if platform == "cpu" else "cudnn" if fits else "xla"


def attend(q_BTKGE, k_BKSE, v_BKSE, mask_BTS, impl):
    """Attention of T queries over S keys, the keys and values head-major [B, K, S, E]. `mask_BTS`
    (True: may attend) is None for causal self-attention (T == S), or explicit over a KV cache.

    Query heads are grouped under their kv head (GQA: H = K*G; MQA: K = 1), so keys and values
    are never repeated. Over a cache, and with impl "einsum", attention is explicit einsums on
    the head-major layout, which the cache keeps so that no step copies it into another layout;
    otherwise impl "xla" / "cudnn" is jax.nn.dot_product_attention, which takes [B, T, H, E] (the
    projection's token-major layout, so the transposes here cancel out in training).
    """
    b, t, k, g, e = q_BTKGE.shape
    scale = 1.0 / math.sqrt(e)
    if impl == "einsum" or mask_BTS is not None:
        q_BKGTE = q_BTKGE.transpose(0, 2, 3, 1, 4)
        if mask_BTS is None:
            out_BKGTE = _causal_einsum_attention(q_BKGTE, k_BKSE, v_BKSE, scale)
        else:
            out_BKGTE = _einsum_attention(q_BKGTE, k_BKSE, v_BKSE, mask_BTS, scale)
        return out_BKGTE.transpose(0, 3, 1, 2, 4)
    out_BTHE = jax.nn.dot_product_attention(
        q_BTKGE.reshape(b, t, k * g, e), k_BKSE.transpose(0, 2, 1, 3), v_BKSE.transpose(0, 2, 1, 3),
        scale=scale, implementation=impl, is_causal=True)
    return out_BTHE.reshape(b, t, k, g, e)


def attention(p, x_ND, cfg, batch, positions, mask_BTS=None, kv=None):
    """Self-attention block: fused QKV projection, optional QK-norm, RoPE, attention, output
    projection. Returns ([N, D], the layer's updated cache or None).

    `positions` are the tokens' positions, [T] or per row [B, T]. `kv` is this layer's cache
    (k [B, K, S, E], v, index): the new keys and values are written at `index`, and the queries
    attend over the whole cache under `mask_BTS`. The fused weight is laid out [D, K, G + 2, E]:
    per kv head, its G query heads then one key and one value head, so that sharding the kv-head
    axis keeps each group whole.
    """
    k, e = cfg.n_kv_heads, cfg.head_dim
    g = cfg.n_heads // k
    dtype = x_ND.dtype
    qkv = matmul(x_ND, p["wqkv"])
    if "bqkv" in p:
        qkv = qkv + p["bqkv"].astype(dtype).reshape(-1)
    qkv_BTKCE = qkv.reshape(batch, -1, k, g + 2, e)
    # One split, not three slices: its gradient is a single concatenate where the slices' would be
    # three zero-padded copies summed.
    q, key, value = jnp.split(qkv_BTKCE, [g, g + 1], axis=3)
    key, value = key.squeeze(3), value.squeeze(3)
    if cfg.qk_norm:
        q = rms_norm(q, p.get("q_norm"), cfg.norm_eps)
        key = rms_norm(key, p.get("k_norm"), cfg.norm_eps)
    if cfg.pos == "rope":
        cos, sin = rope_tables(positions, cfg)                  # [..., T, E/2]
        heads = lambda table, n: table.reshape(*table.shape[:-1], *(1,) * n, table.shape[-1])
        q = apply_rope(q, heads(cos, 2), heads(sin, 2))
        key = apply_rope(key, heads(cos, 1), heads(sin, 1))
    key_BKSE, value_BKSE = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)
    if kv is not None:
        cache_k, cache_v, index = kv
        key_BKSE = jax.lax.dynamic_update_slice(cache_k, key_BKSE.astype(cache_k.dtype), (0, 0, index, 0))
        value_BKSE = jax.lax.dynamic_update_slice(cache_v, value_BKSE.astype(cache_v.dtype), (0, 0, index, 0))
        kv = (key_BKSE, value_BKSE, index)
    # Over a cache attend always runs the einsums, so a run trained with cuDNN still decodes on a CPU.
    impl = "einsum" if mask_BTS is not None else attention_backend(cfg, jax.default_backend())
    out_BTKGE = attend(q, key_BKSE.astype(dtype), value_BKSE.astype(dtype), mask_BTS, impl)
    y = matmul(out_BTKGE.reshape(x_ND.shape[0], cfg.n_heads * e), p["wo"])
    return (y + p["bo"].astype(dtype) if "bo" in p else y), kv


# --- MLP -----------------------------------------------------------------------------------------

# Every activation an MLP kind (configs.base.MLPS) may name.
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),
}


def mlp_activation(h, cfg):
    """act(h), or for gated MLPs act(gate) * up from h's last axis read as (gate, up) halves
    [..., 2, F]. Shared by the dense MLP and the MoE experts."""
    act = ACTIVATIONS[cfg.activation]
    if not cfg.gated:
        return act(h)
    gate, up = jnp.split(h.reshape(*h.shape[:-1], 2, -1), 2, axis=-2)  # split: as in attention
    return (act(gate) * up).reshape(*h.shape[:-1], -1)


def mlp(p, x_ND, cfg):
    """act(x W_in) W_out, or for gated MLPs act(x W_gate) * (x W_up) W_out.

    A gated W_in is one [D, 2, F] weight (gate, up) so both halves come from a single GEMM. F is
    read from the weights, so the same function runs the MoE's shared experts.
    """
    dtype = x_ND.dtype
    h = matmul(x_ND, p["w_in"])
    if "b_in" in p:
        h = h + p["b_in"].astype(dtype).reshape(-1)
    y = matmul(mlp_activation(h, cfg), p["w_out"])
    return y + p["b_out"].astype(dtype) if "b_out" in p else y


# --- Embeddings ----------------------------------------------------------------------------------


def embed(table, tokens, dtype, vocab_axis: int = 0):
    """Row lookup: tokens [...] -> [..., D] from the table [V, D], or with vocab_axis 1 from its
    transpose [D, V] (decode_layout's tied unembedding). An Int8Weight table has one scale per
    vocabulary entry."""
    def take(a):
        return jnp.moveaxis(jnp.take(a, tokens, axis=vocab_axis), 0, -1) if vocab_axis else jnp.take(a, tokens, axis=0)
    if isinstance(table, Int8Weight):
        return (take(table.q).astype(jnp.float32) * take(table.scale)).astype(dtype)
    return take(table).astype(dtype)


def unembed(w, x_ND, cfg, transposed: bool = False):
    """Float32 logits over the real vocabulary [N, vocab_size] from the unembedding [D, V], or
    with `transposed` a tied embedding table [V, D] itself: padded rows are sliced off so they
    never receive probability. Optional soft-cap: cap * tanh(logits / cap)."""
    logits = matmul(x_ND, w, preferred_element_type=jnp.float32, transposed=transposed)
    logits = logits[:, : cfg.vocab_size]
    if cfg.logit_softcap is not None:
        logits = cfg.logit_softcap * jnp.tanh(logits / cfg.logit_softcap)
    return logits
