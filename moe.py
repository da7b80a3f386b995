"""The mixture-of-experts feed-forward sublayer: the router, two dispatch paths, Soft MoE, specs.

model.py registers it as the "moe" FFN kind; `apply` returns (y, aux) like every FFN kind. Each
expert is an MLP like the dense one (cfg.activation, cfg.gated, cfg.mlp_bias), of hidden size
expert_ff; n_shared_experts always-on experts form one dense MLP of n_shared x expert_ff beside
them.

Routing (router="topk_softmax"), in float32: p = softmax(x W_router) over all X experts, each
token takes its top_k experts, and their gates are p renormalized over the chosen ones (Mixtral,
DeepSeek). That equals a softmax over the top_k logits alone, exp(l_i) / sum_{j in top-k} exp(l_j),
so the two usual descriptions are one function. With top_k=1 the gate is then always 1 and the
router learns from the load-balancing loss alone (Switch keeps the raw p instead).

Dispatch: capacity_factor None is dropless: the N*A (token, expert) assignments are sorted by
expert and each expert's rows run through one jax.lax.ragged_dot. A capacity factor c gives each
expert C = ceil(c * top_k * T / X) slots per sequence, filled in token order through one-hot
dispatch and combine einsums; an assignment past C is dropped (its expert adds nothing, the token
passes on the residual) and counted. Slots are taken in token order (all of a token's choices
before the next token's), not choice-major as in GShard, so a token's slot depends only on the
tokens before it in its own sequence: capacity-limited routing stays causal.

Soft MoE (router="soft", Puigcerver et al., 2023): each expert has P slots, every slot a softmax
(over the sequence) weighted mix of tokens, every token a softmax (over slots) mix of the slots'
outputs. It mixes tokens across the sequence, so in a causal LM a token sees the future through
the slots: it is here for experiments, its training loss is not a causal LM's, and decoding with
a KV cache is refused (model.forward).

Shape suffixes as in layers.py, plus X experts, A = top_k choices per token, S = N*A assignments,
C capacity (slots) per expert per sequence, F expert hidden.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

import layers
from configs.base import ModelConfig


def expert_ff(cfg: ModelConfig) -> int:
    return cfg.expert_ff or cfg.d_ff


def router_width(cfg: ModelConfig) -> int:
    """Router outputs: one logit per expert, or for Soft MoE one per slot."""
    return cfg.n_experts * soft_slots(cfg) if cfg.router == "soft" else cfg.n_experts


def soft_slots(cfg: ModelConfig) -> int:
    """Soft MoE slots per expert, P = ceil(c * top_k * seq_len / X) with c = capacity_factor or 1:
    then each token costs about top_k experts' FLOPs, as with top-k routing."""
    return math.ceil((cfg.capacity_factor or 1.0) * cfg.top_k * cfg.seq_len / cfg.n_experts)


def capacity(cfg: ModelConfig, tokens: int) -> int:
    """Slots per expert for a sequence of `tokens` under capacity_factor."""
    return math.ceil(cfg.capacity_factor * cfg.top_k * tokens / cfg.n_experts)


# --- Parameters ----------------------------------------------------------------------------------


def specs(cfg: ModelConfig, L: int, hidden, zeros, out_scale: float) -> dict:
    """The router [L, D, X] and the experts' stacked MLPs [L, X, ...]. model.py passes the spec
    constructors: hidden(shape, axes, in_axis, out_axis, scale, batch_axis), zeros(shape, axes)."""
    D, X, F = cfg.d_model, cfg.n_experts, expert_ff(cfg)
    w_in_shape, w_in_axes = ((L, X, D, 2, F), ("layers", "expert", "embed", None, "mlp")) if cfg.gated else \
        ((L, X, D, F), ("layers", "expert", "embed", "mlp"))
    experts = (0, 1)   # the layer and expert axes are batch axes of each expert's matrices
    p = {
        "router": hidden((L, D, router_width(cfg)), ("layers", "embed", None), 1, 2, 1.0, (0,)),
        "w_in": hidden(w_in_shape, w_in_axes, 2, tuple(range(3, len(w_in_shape))), 1.0, experts),
        "w_out": hidden((L, X, F, D), ("layers", "expert", "mlp", "embed"), 2, 3, out_scale, experts),
    }
    if cfg.mlp_bias:
        p["b_in"] = zeros(w_in_shape[:2] + w_in_shape[3:], w_in_axes[:2] + w_in_axes[3:])
        p["b_out"] = zeros((L, X, D), ("layers", "expert", "embed"))
    return p


def expert_params(cfg: ModelConfig) -> int:
    """Parameters of one routed expert."""
    D, F, c = cfg.d_model, expert_ff(cfg), 3 if cfg.gated else 2
    return c * D * F + (((c - 1) * F + D) if cfg.mlp_bias else 0)


def matmul_params(cfg: ModelConfig) -> int:
    """Matmul weights one token passes through: the router, top_k experts and the shared MLP."""
    c = 3 if cfg.gated else 2
    shared = c * cfg.d_model * cfg.n_shared_experts * expert_ff(cfg)
    return cfg.d_model * router_width(cfg) + cfg.top_k * c * cfg.d_model * expert_ff(cfg) + shared


def inactive_params(cfg: ModelConfig) -> int:
    """Per layer, the routed experts' parameters a token does not use: X - top_k experts. (Soft
    MoE's slots are sized so a token costs top_k experts' compute: counted the same way.)"""
    return (cfg.n_experts - cfg.top_k) * expert_params(cfg)


# --- Routing -------------------------------------------------------------------------------------


def route(w_DX, x_ND, cfg: ModelConfig):
    """float32 router logits [N, X], the top_k gates renormalized [N, A] and experts [N, A]."""
    logits_NX = jnp.dot(x_ND.astype(jnp.float32), w_DX.astype(jnp.float32))
    gate_NA, expert_NA = jax.lax.top_k(jax.nn.softmax(logits_NX, axis=-1), cfg.top_k)
    return logits_NX, gate_NA / jnp.sum(gate_NA, axis=-1, keepdims=True), expert_NA


def router_losses(logits_NX, expert_NA, cfg: ModelConfig):
    """Load-balancing loss X * sum_x f_x P_x (Switch/GShard; f_x the fraction of the N*top_k
    assignments routed to x, which sums to 1, so a balanced router scores 1 at any top_k; P_x the
    mean router probability) and the router z-loss mean(logsumexp^2) (ST-MoE), each times its
    coefficient; and the load f [X]."""
    load_X = jnp.mean(jnp.sum(jax.nn.one_hot(expert_NA, cfg.n_experts), axis=1), axis=0) / cfg.top_k
    importance_X = jnp.mean(jax.nn.softmax(logits_NX, axis=-1), axis=0)
    balance = cfg.n_experts * jnp.sum(load_X * importance_X)
    z = jnp.mean(jnp.square(jax.nn.logsumexp(logits_NX, axis=-1)))
    return {"moe_aux": cfg.aux_loss * balance, "moe_z": cfg.router_z_loss * z}, load_X


# --- Experts -------------------------------------------------------------------------------------


def _ragged_experts(p, x_SD, expert_S, sizes_X, cfg: ModelConfig):
    """Each expert's MLP on its contiguous rows of x_SD (sorted by expert; sizes_X rows each)."""
    dtype, X = x_SD.dtype, cfg.n_experts
    h = jax.lax.ragged_dot(x_SD, p["w_in"].astype(dtype).reshape(X, cfg.d_model, -1), sizes_X)
    if "b_in" in p:
        h = h + p["b_in"].astype(dtype).reshape(X, -1)[expert_S]
    y = jax.lax.ragged_dot(layers.mlp_activation(h, cfg), p["w_out"].astype(dtype), sizes_X)
    return y + p["b_out"].astype(dtype)[expert_S] if "b_out" in p else y


def _slot_experts(p, x_BXCD, cfg: ModelConfig):
    """Each expert's MLP on its C slots per sequence."""
    dtype, X = x_BXCD.dtype, cfg.n_experts
    h = jnp.einsum("bxcd,xdf->bxcf", x_BXCD, p["w_in"].astype(dtype).reshape(X, cfg.d_model, -1))
    if "b_in" in p:
        h = h + p["b_in"].astype(dtype).reshape(X, 1, -1)
    y = jnp.einsum("bxcf,xfd->bxcd", layers.mlp_activation(h, cfg), p["w_out"].astype(dtype))
    return y + p["b_out"].astype(dtype)[:, None] if "b_out" in p else y


def dropless(p, x_ND, gate_NA, expert_NA, cfg: ModelConfig):
    """Sort the assignments by expert, run each expert on its rows (ragged_dot), unsort and mix
    by the gates. Returns (y [N, D], dropped fraction: 0)."""
    n, a = expert_NA.shape
    expert_S = expert_NA.reshape(-1)
    order_S = jnp.argsort(expert_S, stable=True)
    inverse_S = jnp.zeros_like(order_S).at[order_S].set(jnp.arange(n * a, dtype=order_S.dtype))
    sizes_X = jnp.bincount(expert_S, length=cfg.n_experts)
    y_SD = _ragged_experts(p, x_ND[order_S // a], expert_S[order_S], sizes_X, cfg)
    y_NAD = y_SD[inverse_S].reshape(n, a, -1)
    return jnp.einsum("nad,na->nd", y_NAD, gate_NA.astype(x_ND.dtype)), jnp.zeros((), jnp.float32)


def capacity_limited(p, x_ND, gate_NA, expert_NA, cfg: ModelConfig, batch: int):
    """Per sequence, each expert takes its first C assignments in token order; the rest are
    dropped. One-hot dispatch [B, T, X, C] gathers the slots, combine (the gates) mixes them back.
    Returns (y [N, D], fraction of the assignments dropped)."""
    n, a = expert_NA.shape
    t, X, dtype = n // batch, cfg.n_experts, x_ND.dtype
    slots = capacity(cfg, t)
    chosen_BTAX = jax.nn.one_hot(expert_NA.reshape(batch, t, a), X, dtype=jnp.int32)
    taken_BTAX = jnp.cumsum(chosen_BTAX.reshape(batch, t * a, X), axis=1).reshape(batch, t, a, X)
    position_BTA = jnp.sum((taken_BTAX - 1) * chosen_BTAX, axis=-1)   # the slot; >= C: dropped
    slot_BTAXC = chosen_BTAX.astype(dtype)[..., None] * jax.nn.one_hot(position_BTA, slots, dtype=dtype)[..., None, :]
    dispatch_BTXC = jnp.sum(slot_BTAXC, axis=2)
    combine_BTXC = jnp.einsum("btaxc,bta->btxc", slot_BTAXC, gate_NA.reshape(batch, t, a).astype(dtype))
    x_BXCD = jnp.einsum("btxc,btd->bxcd", dispatch_BTXC, x_ND.reshape(batch, t, -1))
    y_BTD = jnp.einsum("btxc,bxcd->btd", combine_BTXC, _slot_experts(p, x_BXCD, cfg))
    dropped = jnp.mean((position_BTA >= slots).astype(jnp.float32))
    return y_BTD.reshape(n, -1), dropped


def soft(p, x_ND, cfg: ModelConfig, batch: int):
    """Soft MoE: slots are softmax-over-tokens mixes of the sequence, tokens softmax-over-slots
    mixes of the slots' outputs. Routing in float32; the mixes in the compute dtype."""
    t, X, dtype = x_ND.shape[0] // batch, cfg.n_experts, x_ND.dtype
    logits_BTS = jnp.dot(x_ND.astype(jnp.float32), p["router"].astype(jnp.float32)).reshape(batch, t, -1)
    dispatch_BTS = jax.nn.softmax(logits_BTS, axis=1).astype(dtype)
    combine_BTS = jax.nn.softmax(logits_BTS, axis=2).astype(dtype)
    slots_BSD = jnp.einsum("bts,btd->bsd", dispatch_BTS, x_ND.reshape(batch, t, -1))
    out_BXCD = _slot_experts(p, slots_BSD.reshape(batch, X, -1, cfg.d_model), cfg)
    y_BTD = jnp.einsum("bts,bsd->btd", combine_BTS, out_BXCD.reshape(batch, -1, cfg.d_model))
    return y_BTD.reshape(x_ND.shape)


def apply(p, x_ND, cfg: ModelConfig, batch: int):
    """The MoE sublayer on x [N = batch * T, D]. Returns (y [N, D], aux): aux["losses"] the
    weighted load-balancing and router z-losses, aux["moe"] the layer's statistics: "load" [X],
    the fraction of assignments routed to each expert (before any drop), and "dropped", the
    fraction dropped by capacity. Soft MoE has neither: no discrete routing to balance."""
    shared = layers.mlp(p["shared"], x_ND, cfg) if "shared" in p else 0.0
    if cfg.router == "soft":
        return soft(p, x_ND, cfg, batch) + shared, {}
    logits_NX, gate_NA, expert_NA = route(p["router"], x_ND, cfg)
    if cfg.capacity_factor is None:
        y_ND, dropped = dropless(p, x_ND, gate_NA, expert_NA, cfg)
    else:
        y_ND, dropped = capacity_limited(p, x_ND, gate_NA, expert_NA, cfg, batch)
    losses, load_X = router_losses(logits_NX, expert_NA, cfg)
    return y_ND + shared, {"losses": losses, "moe": {"load": load_X, "dropped": dropped}}


def metrics(stats: dict) -> dict:
    """Per-layer arrays [L_moe] for the logs, from forward's aux["moe"]: the largest and smallest
    expert's share of the assignments (1 / n_experts when balanced) and the dropped fraction."""
    return {"moe_load_max": jnp.max(stats["load"], axis=-1), "moe_load_min": jnp.min(stats["load"], axis=-1),
            "moe_dropped": stats["dropped"]}
