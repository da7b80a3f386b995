"""An independent float64 NumPy implementation of the model, written plainly (per-head loops,
kv heads repeated, explicit masks) to check layers.py and model.py against."""
import math

import numpy as np

erf = np.vectorize(math.erf)


def rms_norm(x, scale, eps):
    y = x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + eps)
    return y if scale is None else y * scale


def layer_norm(x, scale, bias, eps):
    mu = x.mean(-1, keepdims=True)
    y = (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)
    y = y if scale is None else y * scale
    return y if bias is None else y + bias


def norm(p, x, cfg):
    if cfg.norm == "rmsnorm":
        return rms_norm(x, p.get("scale"), cfg.norm_eps)
    return layer_norm(x, p.get("scale"), p.get("bias"), cfg.norm_eps)


def rope_inv_freq(cfg):
    """YaRN as written in the paper: ramp on r = L / lambda over [beta_slow, beta_fast]."""
    e = cfg.head_dim
    inv = np.array([cfg.rope_theta ** (-2.0 * i / e) for i in range(e // 2)])
    if cfg.yarn_factor == 1.0:
        return inv, 1.0
    length = cfg.yarn_original_len or cfg.seq_len
    out = []
    for f in inv:
        r = length / (2 * math.pi / f)
        if r < cfg.yarn_beta_slow:
            gamma = 0.0
        elif r > cfg.yarn_beta_fast:
            gamma = 1.0
        else:
            gamma = (r - cfg.yarn_beta_slow) / (cfg.yarn_beta_fast - cfg.yarn_beta_slow)
        out.append((1 - gamma) * f / cfg.yarn_factor + gamma * f)
    mscale = cfg.yarn_mscale if cfg.yarn_mscale is not None else 0.1 * math.log(cfg.yarn_factor) + 1
    return np.array(out), mscale


def rope(x_TE, positions, cfg):
    """Rotate pairs (i, i + E/2) of each row by angle pos * inv_freq_i."""
    inv, mscale = rope_inv_freq(cfg)
    half = x_TE.shape[-1] // 2
    out = np.empty_like(x_TE)
    for t, pos in enumerate(positions):
        c, s = np.cos(pos * inv) * mscale, np.sin(pos * inv) * mscale
        a, b = x_TE[t, :half], x_TE[t, half:]
        out[t, :half] = a * c - b * s
        out[t, half:] = b * c + a * s
    return out


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def causal_attention(q_TE, k_TE, v_TE):
    t, e = q_TE.shape
    scores = q_TE @ k_TE.T / math.sqrt(e)
    scores[np.triu(np.ones((t, t), bool), k=1)] = -np.inf
    return softmax(scores) @ v_TE


def attention(p, x_TD, cfg):
    """Per-head loop; query head h reads kv head h // (H / K)."""
    H, K, E = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    G = H // K
    w = p["wqkv"]  # [D, K, G + 2, E]
    b = p.get("bqkv", np.zeros(w.shape[1:]))
    heads = []
    for h in range(H):
        kv, j = divmod(h, G)
        q = x_TD @ w[:, kv, j] + b[kv, j]
        k = x_TD @ w[:, kv, G] + b[kv, G]
        v = x_TD @ w[:, kv, G + 1] + b[kv, G + 1]
        if cfg.qk_norm:
            q = rms_norm(q, p.get("q_norm"), cfg.norm_eps)
            k = rms_norm(k, p.get("k_norm"), cfg.norm_eps)
        if cfg.pos == "rope":
            pos = np.arange(x_TD.shape[0])
            q, k = rope(q, pos, cfg), rope(k, pos, cfg)
        heads.append(causal_attention(q, k, v))
    out = np.concatenate(heads, axis=-1) @ p["wo"].reshape(H * E, -1)
    return out + p["bo"] if "bo" in p else out


def gelu(x):
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


# Keyed by activation; the config's MLP kind (configs.base.MLPS) names one and whether it is gated.
ACT = {"silu": lambda x: x / (1 + np.exp(-x)), "gelu": gelu, "gelu_tanh": gelu_tanh,
       "relu2": lambda x: np.maximum(x, 0) ** 2}


def mlp(p, x, cfg):
    act = ACT[cfg.activation]
    if cfg.gated:
        b = p.get("b_in", np.zeros(p["w_in"].shape[1:]))
        h = act(x @ p["w_in"][:, 0] + b[0]) * (x @ p["w_in"][:, 1] + b[1])
    else:
        h = act(x @ p["w_in"] + p.get("b_in", 0.0))
    return h @ p["w_out"] + p.get("b_out", 0.0)


def forward(params, tokens_BT, cfg):
    """float64 logits [B, T, vocab_size]; params: the JAX tree as numpy arrays."""
    params = {k: v for k, v in params.items()}
    blocks = params["blocks"]
    logits = []
    for row in np.asarray(tokens_BT):
        x = params["embed"][row].astype(np.float64)
        if cfg.pos == "learned":
            x = x + params["pos_embed"][: len(row)]
        for layer in range(cfg.n_layers):
            p = _layer(blocks, layer)
            if cfg.norm_position == "pre":
                x = x + attention(p["attn"], norm(p.get("attn_norm", {}), x, cfg), cfg)
                x = x + mlp(p["mlp"], norm(p.get("mlp_norm", {}), x, cfg), cfg)
            else:
                x = norm(p.get("attn_norm", {}), x + attention(p["attn"], x, cfg), cfg)
                x = norm(p.get("mlp_norm", {}), x + mlp(p["mlp"], x, cfg), cfg)
        if cfg.norm_position == "pre":
            x = norm(params.get("final_norm", {}), x, cfg)
        w = params["embed"].T if cfg.tie_embeddings else params["unembed"]
        z = (x @ w)[:, : cfg.vocab_size]
        if cfg.logit_softcap:
            z = cfg.logit_softcap * np.tanh(z / cfg.logit_softcap)
        logits.append(z)
    return np.stack(logits)


def _layer(tree, i):
    return {k: _layer(v, i) if isinstance(v, dict) else np.asarray(v, np.float64)[i] for k, v in tree.items()}


def to_float64(tree):
    return {k: to_float64(v) if isinstance(v, dict) else np.asarray(v, np.float64) for k, v in tree.items()}
