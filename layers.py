"""Pure-function transformer layers. Parameters come in as dicts of arrays; nothing here
knows about devices or configs beyond the ModelConfig it is handed.

Shape suffixes: B batch, T query length, S key length, N = B*T rows, D d_model,
H query heads, K kv heads, G = H // K query heads per kv head, E head_dim, F MLP hidden, V vocab.
Activations stay 2-D [N, D] around the matmuls (one GEMM per projection), and einsum attention
runs head-major [B, K, G, T, E]: both chosen by measurement (notes/benchmarks.md).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

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


def _einsum_attention(q_BKGTE, k_BKSE, v_BKSE, mask_BTS, scale):
    scores = jnp.einsum("bkgte,bkse->bkgts", q_BKGTE, k_BKSE, preferred_element_type=jnp.float32)
    # A finite floor, not -inf: a row with every key masked then gives a uniform, not NaN, softmax.
    scores = jnp.where(mask_BTS[:, None, None], scores * scale, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BKSE.dtype)
    return jnp.einsum("bkgts,bkse->bkgte", probs, v_BKSE)


def _causal_einsum_attention(q_BKGTE, k_BKSE, v_BKSE, scale):
    """Causal self-attention in query blocks: block [start, end) attends only to keys [0, end), so
    the fully masked blocks above the diagonal are never computed. Blocks of at least 64 queries,
    at most 8 of them, a size chosen by timing whole training steps (notes/benchmarks.md)."""
    t = q_BKGTE.shape[3]
    block = max(64, -(-t // 8))
    outs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        mask_TS = jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None]
        outs.append(_einsum_attention(q_BKGTE[:, :, :, start:end], k_BKSE[:, :, :end], v_BKSE[:, :, :end],
                                      mask_TS[None], scale))
    return jnp.concatenate(outs, axis=3)


def attend(q_BTKGE, k_BSKE, v_BSKE, mask_BTS, impl):
    """Attention of T queries over S keys. `mask_BTS` (True: may attend) is None for causal
    self-attention (T == S), or explicit, e.g. over a KV cache with left-padded rows.

    Query heads are grouped under their kv head (GQA: H = K*G; MQA: K = 1), so keys and values
    are never repeated. `impl` is "einsum" (explicit einsums, laid out head-major [B, K, G, T, E]),
    or "xla" / "cudnn" (jax.nn.dot_product_attention, which takes [B, T, H, E] and groups heads
    the same way, so the token-major layout of the projections and the cache goes in as it is).
    """
    b, t, k, g, e = q_BTKGE.shape
    scale = 1.0 / math.sqrt(e)
    if impl == "einsum":
        heads = (q_BTKGE.transpose(0, 2, 3, 1, 4), k_BSKE.transpose(0, 2, 1, 3), v_BSKE.transpose(0, 2, 1, 3))
        if mask_BTS is None:
            out_BKGTE = _causal_einsum_attention(*heads, scale)
        else:
            out_BKGTE = _einsum_attention(*heads, mask_BTS, scale)
        return out_BKGTE.transpose(0, 3, 1, 2, 4)
    out_BTHE = jax.nn.dot_product_attention(
        q_BTKGE.reshape(b, t, k * g, e), k_BSKE, v_BSKE, scale=scale, implementation=impl,
        mask=None if mask_BTS is None else mask_BTS[:, None], is_causal=mask_BTS is None)
    return out_BTHE.reshape(b, t, k, g, e)


def attention(p, x_ND, cfg, batch, positions, mask_BTS=None, kv=None):
    """Self-attention block: fused QKV projection, optional QK-norm, RoPE, attention, output
    projection. Returns ([N, D], the layer's updated cache or None).

    `positions` are the tokens' positions, [T] or per row [B, T]. `kv` is this layer's cache
    (k [B, S, K, E], v, index): the new keys and values are written at `index`, and the queries
    attend over the whole cache under `mask_BTS`. The fused weight is laid out [D, K, G + 2, E]:
    per kv head, its G query heads then one key and one value head, so that sharding the kv-head
    axis keeps each group whole.
    """
    k, e = cfg.n_kv_heads, cfg.head_dim
    g = cfg.n_heads // k
    dtype = x_ND.dtype
    qkv = x_ND @ p["wqkv"].astype(dtype).reshape(cfg.d_model, -1)
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
    if kv is not None:
        cache_k, cache_v, index = kv
        key = jax.lax.dynamic_update_slice(cache_k, key.astype(cache_k.dtype), (0, index, 0, 0))
        value = jax.lax.dynamic_update_slice(cache_v, value.astype(cache_v.dtype), (0, index, 0, 0))
        kv = (key, value, index)
    out_BTKGE = attend(q, key.astype(dtype), value.astype(dtype), mask_BTS, cfg.attn_impl)
    y = out_BTKGE.reshape(x_ND.shape[0], cfg.n_heads * e) @ p["wo"].astype(dtype).reshape(-1, cfg.d_model)
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
    h = x_ND @ p["w_in"].astype(dtype).reshape(cfg.d_model, -1)
    if "b_in" in p:
        h = h + p["b_in"].astype(dtype).reshape(-1)
    y = mlp_activation(h, cfg) @ p["w_out"].astype(dtype)
    return y + p["b_out"].astype(dtype) if "b_out" in p else y


# --- Embeddings ----------------------------------------------------------------------------------


def embed(table_VD, tokens, dtype):
    """Row lookup: tokens [...] -> [..., D]."""
    return jnp.take(table_VD, tokens, axis=0).astype(dtype)


def unembed(w_DV, x_ND, cfg):
    """Float32 logits over the real vocabulary [N, vocab_size]: padded rows are sliced off so
    they never receive probability. Optional soft-cap: cap * tanh(logits / cap)."""
    logits = jnp.dot(x_ND, w_DV.astype(x_ND.dtype), preferred_element_type=jnp.float32)
    logits = logits[:, : cfg.vocab_size]
    if cfg.logit_softcap is not None:
        logits = cfg.logit_softcap * jnp.tanh(logits / cfg.logit_softcap)
    return logits
