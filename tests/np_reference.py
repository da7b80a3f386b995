"""An independent float64 NumPy implementation of the model, written plainly (per-head loops,
kv heads repeated, explicit masks, a per-token loop over the chosen experts) to check layers.py,
moe.py and model.py against."""
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


def expert(p, e, x, cfg):
    """Routed expert e's MLP on one row x [D]."""
    return mlp({name: w[e] for name, w in p.items() if name in ("w_in", "w_out", "b_in", "b_out")}, x, cfg)


def topk_moe(p, x_TD, cfg, record):
    """One sequence, token by token: softmax over all experts, the top_k renormalized; an expert
    takes at most C = ceil(c * top_k * T / X) assignments, first come first served in token order.
    Appends (logits, chosen experts, dropped count) of each token to `record`."""
    t_len, n_experts, k = len(x_TD), cfg.n_experts, cfg.top_k
    capacity = math.ceil(cfg.capacity_factor * k * t_len / n_experts) if cfg.capacity_factor else None
    used, out = [0] * n_experts, np.zeros_like(x_TD)
    for t in range(t_len):
        logits = x_TD[t] @ p["router"]
        probs = softmax(logits)
        chosen = list(np.argsort(-probs)[:k])
        dropped = 0
        for e in chosen:
            if capacity is not None and used[e] >= capacity:
                dropped += 1
                continue
            used[e] += 1
            out[t] += probs[e] / sum(probs[chosen]) * expert(p, e, x_TD[t], cfg)
        record.append((logits, chosen, dropped))
    return out


def soft_moe(p, x_TD, cfg):
    """Soft MoE: slot s (of expert s // P) takes a softmax-over-tokens mix of the sequence; each
    token a softmax-over-slots mix of the slots' outputs."""
    logits_TS = x_TD @ p["router"]
    dispatch_ST = softmax(logits_TS.T)
    combine_TS = softmax(logits_TS)
    per_expert = logits_TS.shape[1] // cfg.n_experts
    outputs = np.stack([expert(p, s // per_expert, dispatch_ST[s] @ x_TD, cfg) for s in range(len(dispatch_ST))])
    return combine_TS @ outputs


def ffn(kind, p, x, cfg, record):
    if kind == "dense":
        return mlp(p, x, cfg)
    y = soft_moe(p, x, cfg) if cfg.router == "soft" else topk_moe(p, x, cfg, record)
    return y + mlp(p["shared"], x, cfg) if "shared" in p else y


def layer_kinds(cfg):
    """(kind, index in that kind's stack) per layer: with experts, layers moe_every - 1,
    2 moe_every - 1, ... are MoE layers."""
    kinds = []
    for i in range(cfg.n_layers):
        moe_before = (i + 1) // cfg.moe_every if cfg.n_experts else 0
        is_moe = cfg.n_experts and (i + 1) % cfg.moe_every == 0
        kinds.append(("moe", moe_before - 1) if is_moe else ("dense", i - moe_before))
    return kinds


def forward(params, tokens_BT, cfg, aux=None):
    """float64 logits [B, T, vocab_size]; params: the JAX tree as numpy arrays. A dict passed as
    `aux` receives the MoE losses (weighted) and statistics, as model.forward's aux."""
    stacks = {"dense": params.get("blocks"), "moe": params.get("moe_blocks")}
    logits, records = [], {}
    for row in np.asarray(tokens_BT):
        x = params["embed"][row].astype(np.float64)
        if cfg.pos == "learned":
            x = x + params["pos_embed"][: len(row)]
        for layer, (kind, index) in enumerate(layer_kinds(cfg)):
            p, record = _layer(stacks[kind], index), records.setdefault(layer, [])
            if cfg.norm_position == "pre":
                x = x + attention(p["attn"], norm(p.get("attn_norm", {}), x, cfg), cfg)
                x = x + ffn(kind, p["mlp"], norm(p.get("mlp_norm", {}), x, cfg), cfg, record)
            else:
                x = norm(p.get("attn_norm", {}), x + attention(p["attn"], x, cfg), cfg)
                x = norm(p.get("mlp_norm", {}), x + ffn(kind, p["mlp"], x, cfg, record), cfg)
        if cfg.norm_position == "pre":
            x = norm(params.get("final_norm", {}), x, cfg)
        w = params["embed"].T if cfg.tie_embeddings else params["unembed"]
        z = (x @ w)[:, : cfg.vocab_size]
        if cfg.logit_softcap:
            z = cfg.logit_softcap * np.tanh(z / cfg.logit_softcap)
        logits.append(z)
    if aux is not None:
        aux.update(moe_aux([r for r in records.values() if r], cfg))
    return np.stack(logits)


def moe_aux(layers, cfg):
    """Over all tokens of the batch, per MoE layer: load f_e (share of the assignments), mean
    router probability P_e; loss X sum_e f_e P_e; z-loss mean logsumexp^2; dropped share."""
    out = {"moe_aux": 0.0, "moe_z": 0.0, "load": [], "dropped": []}
    for record in layers:
        counts, probs, z, dropped = np.zeros(cfg.n_experts), 0.0, 0.0, 0
        for logits, chosen, drops in record:
            counts[chosen] += 1
            probs = probs + softmax(logits)
            z += (np.log(np.sum(np.exp(logits - logits.max()))) + logits.max()) ** 2
            dropped += drops
        load = counts / counts.sum()
        out["moe_aux"] += cfg.aux_loss * cfg.n_experts * np.sum(load * probs / len(record))
        out["moe_z"] += cfg.router_z_loss * z / len(record)
        out["load"].append(load)
        out["dropped"].append(dropped / counts.sum())
    return out


def _layer(tree, i):
    return {k: _layer(v, i) if isinstance(v, dict) else np.asarray(v, np.float64)[i] for k, v in tree.items()}


def to_float64(tree):
    return {k: to_float64(v) if isinstance(v, dict) else np.asarray(v, np.float64) for k, v in tree.items()}
