"""The GPT model: parameter specs, initialization, forward pass and loss.

Parameters are a nested dict of arrays. A model is a repeated pattern of blocks (attention, then
a feed-forward sublayer of some kind: `FFN_KINDS`); each kind's blocks share one stacked tree
whose leaves carry a leading "layers" axis, and `jax.lax.scan` runs the pattern's repeats, so
compile time is flat in depth. A dense model's pattern is ("dense",); a mixture of experts puts a
"moe" block (moe.py) every moe_every blocks.

Shape suffixes as in layers.py: B batch, T sequence, N = B*T, D d_model, V vocabulary,
L stacked layers, R pattern repeats, P pattern length.
"""
from __future__ import annotations

import math
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp

import cli
import layers
import moe
from configs.base import ConfigError, ModelConfig

init_ops = jax.nn.initializers

# The closed set of logical axis names a parameter may carry (None: never sharded). sharding.RULES
# maps some of them onto mesh axes; a name outside this set is a typo, caught when specs are built.
LOGICAL_AXES = frozenset({"layers", "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm", "expert"})


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: its shape, logical axis names (mapped to a mesh by sharding.py), dtype,
    initializer `init(key, shape, dtype) -> array`, and for hidden matrices the (input, output)
    axes of the logical matrix (other axes are batch axes): the fans of the init, and the
    matrix that Muon orthogonalizes."""
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    dtype: str
    init: Callable
    matrix: tuple | None = None

    def __post_init__(self):
        if len(self.axes) != len(self.shape):
            raise ValueError(f"ParamSpec axes {self.axes} do not match shape {self.shape}")
        unknown = [a for a in self.axes if a is not None and a not in LOGICAL_AXES]
        if unknown:
            raise ValueError(f"ParamSpec axes {self.axes}: unknown logical axis {unknown[0]!r}; "
                             f"valid: {', '.join(sorted(LOGICAL_AXES))} or None")


# --- Parameter specs -----------------------------------------------------------------------------


def _matrix_init(scheme: str, std: float, in_axis, out_axis, scale: float = 1.0, batch_axis=()) -> Callable:
    """normal(std), Xavier uniform, or fan-in variance scaling, the fans taken over in_axis and
    out_axis (a stacked weight's layer axis is a batch axis). `scale` multiplies the std."""
    if scheme == "normal":
        return init_ops.normal(std * scale)
    mode, dist = ("fan_avg", "uniform") if scheme == "xavier" else ("fan_in", "normal")
    return init_ops.variance_scaling(scale ** 2, mode, dist, in_axis, out_axis, batch_axis)


def _norm_specs(cfg: ModelConfig, dim: int, stacked: tuple, axes: tuple) -> dict:
    specs = {}
    if cfg.norm_scale:
        specs["scale"] = ParamSpec(stacked + (dim,), axes, cfg.param_dtype, init_ops.ones)
    if cfg.norm_bias:
        specs["bias"] = ParamSpec(stacked + (dim,), axes, cfg.param_dtype, init_ops.zeros)
    return specs


def _hidden(cfg: ModelConfig, shape, axes, in_axis, out_axis, scale=1.0, batch_axis=(0,)) -> ParamSpec:
    """A stacked hidden matrix (leading layer axis, and for experts an expert axis: batch axes,
    outside the fans), initialized by the config's scheme."""
    init = _matrix_init(cfg.init, cfg.init_std, in_axis, out_axis, scale, batch_axis)
    return ParamSpec(shape, axes, cfg.param_dtype, init, matrix=(in_axis, out_axis))


def _out_scale(cfg: ModelConfig) -> float:
    """The init scale of the projections that write into the residual stream."""
    return 0.0 if cfg.zero_init_out else (1 / math.sqrt(2 * cfg.n_layers) if cfg.residual_scale else 1.0)


def _attention_specs(cfg: ModelConfig, L: int) -> dict:
    D, H, K, E = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    G, dt, zeros = H // K, cfg.param_dtype, init_ops.zeros
    attn = {
        "wqkv": _hidden(cfg, (L, D, K, G + 2, E), ("layers", "embed", "kv_heads", None, "head_dim"), 1, (2, 3, 4)),
        "wo": _hidden(cfg, (L, H, E, D), ("layers", "heads", "head_dim", "embed"), (1, 2), 3, _out_scale(cfg)),
    }
    if cfg.attn_bias:
        attn["bqkv"] = ParamSpec((L, K, G + 2, E), ("layers", "kv_heads", None, "head_dim"), dt, zeros)
        attn["bo"] = ParamSpec((L, D), ("layers", "embed"), dt, zeros)
    if cfg.qk_norm and cfg.norm_scale:
        attn["q_norm"] = ParamSpec((L, E), ("layers", "head_dim"), dt, init_ops.ones)
        attn["k_norm"] = ParamSpec((L, E), ("layers", "head_dim"), dt, init_ops.ones)
    return attn


def _dense_specs(cfg: ModelConfig, L: int, d_ff: int | None = None) -> dict:
    """The MLP: w_in [D, F], or [D, 2, F] (gate, up) when gated, and w_out [F, D]; F = d_ff."""
    D, F, dt = cfg.d_model, d_ff or cfg.d_ff, cfg.param_dtype
    w_in_shape, w_in_axes = ((L, D, 2, F), ("layers", "embed", None, "mlp")) if cfg.gated else \
        ((L, D, F), ("layers", "embed", "mlp"))
    mlp = {
        "w_in": _hidden(cfg, w_in_shape, w_in_axes, 1, tuple(range(2, len(w_in_shape)))),
        "w_out": _hidden(cfg, (L, F, D), ("layers", "mlp", "embed"), 1, 2, _out_scale(cfg)),
    }
    if cfg.mlp_bias:
        mlp["b_in"] = ParamSpec(w_in_shape[:1] + w_in_shape[2:], w_in_axes[:1] + w_in_axes[2:], dt, init_ops.zeros)
        mlp["b_out"] = ParamSpec((L, D), ("layers", "embed"), dt, init_ops.zeros)
    return mlp


def _moe_specs(cfg: ModelConfig, L: int) -> dict:
    """The router and routed experts (moe.specs), and the shared experts as one dense MLP."""
    zeros = lambda shape, axes: ParamSpec(shape, axes, cfg.param_dtype, init_ops.zeros)
    specs = moe.specs(cfg, L, lambda *args: _hidden(cfg, *args), zeros, _out_scale(cfg))
    if cfg.n_shared_experts:
        specs["shared"] = _dense_specs(cfg, L, cfg.n_shared_experts * moe.expert_ff(cfg))
    return specs


@dataclass(frozen=True)
class FFNKind:
    """A kind of feed-forward sublayer, and so a kind of block. `specs(cfg, L)` declares its
    parameters stacked over L layers; `apply(p, x_ND, cfg, batch)` (x: `batch` sequences) returns
    (y_ND, aux): aux["losses"] scalars that forward sums over layers, any other entry statistics
    that it stacks per layer; `matmul_params(cfg)` counts the matmul weights one token passes
    through (what its FLOPs are counted from); `inactive_params(cfg)` the parameters per layer a
    token does not use (a MoE's unchosen experts)."""
    specs: Callable[[ModelConfig, int], dict]
    apply: Callable
    matmul_params: Callable[[ModelConfig], int]
    params_key: str
    inactive_params: Callable[[ModelConfig], int] = lambda cfg: 0


FFN_KINDS = {
    "dense": FFNKind(specs=_dense_specs, apply=lambda p, x_ND, cfg, batch: (layers.mlp(p, x_ND, cfg), {}),
                     matmul_params=lambda cfg: (3 if cfg.gated else 2) * cfg.d_model * cfg.d_ff,
                     params_key="blocks"),
    "moe": FFNKind(specs=_moe_specs, apply=moe.apply, matmul_params=moe.matmul_params,
                   params_key="moe_blocks", inactive_params=moe.inactive_params),
}


def block_pattern(cfg: ModelConfig) -> tuple[str, ...]:
    """The FFN kinds of one repeat of the layer pattern, in order; n_layers is a whole number
    of repeats. With experts, every moe_every-th block is a MoE block."""
    return ("dense",) * (cfg.moe_every - 1) + ("moe",) if cfg.n_experts else ("dense",)


def _stack_sizes(cfg: ModelConfig) -> dict[str, int]:
    """How many layers each kind's stacked tree holds."""
    pattern = block_pattern(cfg)
    repeats = cfg.n_layers // len(pattern)
    return {kind: count * repeats for kind, count in Counter(pattern).items()}


def _block_specs(cfg: ModelConfig, kind: str, L: int) -> dict:
    norm_axes = ("layers", "norm")
    return {"attn_norm": _norm_specs(cfg, cfg.d_model, (L,), norm_axes), "attn": _attention_specs(cfg, L),
            "mlp_norm": _norm_specs(cfg, cfg.d_model, (L,), norm_axes), "mlp": FFN_KINDS[kind].specs(cfg, L)}


def param_specs(cfg: ModelConfig) -> dict:
    """Every parameter, declared once: a nested dict of ParamSpec (empty groups left out)."""
    D, V = cfg.d_model, cfg.padded_vocab
    specs = {
        "embed": ParamSpec((V, D), ("vocab", "embed"), cfg.param_dtype,
                           _matrix_init(cfg.embed_init, cfg.embed_std, 1, 0)),
        **{FFN_KINDS[kind].params_key: _block_specs(cfg, kind, L) for kind, L in _stack_sizes(cfg).items()},
    }
    if cfg.pos == "learned":
        specs["pos_embed"] = ParamSpec((cfg.seq_len, D), (None, "embed"), cfg.param_dtype,
                                       _matrix_init(cfg.embed_init, cfg.embed_std, 1, 0))
    if cfg.norm_position == "pre":  # post-norm blocks already end normalized
        specs["final_norm"] = _norm_specs(cfg, D, (), ("norm",))
    if not cfg.tie_embeddings:
        specs["unembed"] = ParamSpec((D, V), ("embed", "vocab"), cfg.param_dtype,
                                     _matrix_init(cfg.unembed_init, cfg.unembed_std, 0, 1))
    return _prune(specs)


def _prune(tree: dict) -> dict:
    pruned = {k: _prune(v) if isinstance(v, dict) else v for k, v in tree.items()}
    return {k: v for k, v in pruned.items() if v != {}}


def is_spec(x) -> bool:
    """The is_leaf of spec trees: a ParamSpec is a leaf, not a node."""
    return isinstance(x, ParamSpec)


def flat_specs(cfg: ModelConfig) -> list[tuple[str, ParamSpec]]:
    """(name, spec) of every parameter, in tree order; names as jax.tree_util.keystr writes paths."""
    return [(jax.tree_util.keystr(path), spec)
            for path, spec in jax.tree_util.tree_flatten_with_path(param_specs(cfg), is_leaf=is_spec)[0]]


def init_params(cfg: ModelConfig, key) -> dict:
    """Materialize param_specs. Each parameter's key is folded from its path, so adding or
    removing one parameter leaves every other parameter's initial value unchanged."""
    def init_one(path, spec):
        name = jax.tree_util.keystr(path)
        leaf_key = jax.random.fold_in(key, zlib.crc32(name.encode()))
        return spec.init(leaf_key, spec.shape, jnp.dtype(spec.dtype))
    return jax.tree_util.tree_map_with_path(init_one, param_specs(cfg), is_leaf=is_spec)


def count_params(cfg: ModelConfig) -> int:
    """Total parameter count, padded vocabulary rows included."""
    specs = jax.tree_util.tree_leaves(param_specs(cfg), is_leaf=is_spec)
    return sum(math.prod(s.shape) for s in specs)


def count_active_params(cfg: ModelConfig) -> int:
    """Parameters one token uses: the total less each MoE layer's n_experts - top_k unchosen
    experts (the router and shared experts count). Equals count_params for a dense model."""
    inactive = sum(L * FFN_KINDS[kind].inactive_params(cfg) for kind, L in _stack_sizes(cfg).items())
    return count_params(cfg) - inactive


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 * P_matmul + 6 * L * H * E * T.

    P_matmul counts the matmul weights one token passes through: per layer the fused QKV
    (D (H + 2K) E), the output projection (H E D) and its FFN kind's active weights (a gated MLP
    3 D F, else 2 D F; a MoE layer its router, top_k experts and shared experts), plus the
    unembedding (D V_padded). Embedding lookups are not matmuls. Each
    matmul weight costs 2 FLOPs per token forward and 4 backward. Attention's QK^T and PV are
    2 * 2 T H E FLOPs per token per layer forward for full attention, half that under the causal
    mask, times 3 for forward + backward.
    """
    D, H, K, E = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    attention = D * (H + 2 * K) * E + H * E * D
    ffn = sum(L * FFN_KINDS[kind].matmul_params(cfg) for kind, L in _stack_sizes(cfg).items())
    matmul_params = cfg.n_layers * attention + ffn + D * cfg.padded_vocab
    return 6.0 * matmul_params + 6.0 * cfg.n_layers * H * E * seq_len


# --- Forward pass --------------------------------------------------------------------------------


def block(p, x_ND, cfg: ModelConfig, kind: str, batch: int, positions, mask_BTS=None, kv=None):
    """One transformer block: attention then the FFN of its kind, each with a residual, pre- or
    post-norm. Returns (x, the layer's updated KV cache or None, the FFN's aux)."""
    def attn(h):
        return layers.attention(p["attn"], h, cfg, batch, positions, mask_BTS, kv)
    def ffn(h):
        return FFN_KINDS[kind].apply(p["mlp"], h, cfg, batch)
    if cfg.norm_position == "pre":
        a, kv = attn(layers.norm(p.get("attn_norm", {}), x_ND, cfg))
        x_ND = x_ND + a
        f, aux = ffn(layers.norm(p.get("mlp_norm", {}), x_ND, cfg))
        return x_ND + f, kv, aux
    a, kv = attn(x_ND)
    x_ND = layers.norm(p.get("attn_norm", {}), x_ND + a, cfg)
    f, aux = ffn(x_ND)
    return layers.norm(p.get("mlp_norm", {}), x_ND + f, cfg), kv, aux


def init_cache(cfg: ModelConfig, batch: int, max_len: int, start=None) -> dict:
    """An empty KV cache: per layer k and v [B, max_len, K, E] (GQA stores only the kv heads),
    stacked on a leading layer axis in layer order; `index`, the next slot to write; `start` [B],
    where each row's tokens begin (rows of a batch of prompts are left-padded to one length)."""
    shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
    dtype = jnp.dtype(cfg.compute_dtype)
    start = jnp.zeros((batch,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype), "index": jnp.zeros((), jnp.int32),
            "start": start}


def _cache_positions(cache: dict, t: int, max_len: int):
    """Per-row positions [B, T] of the new tokens, and which cache slots each may attend to."""
    slots_T = cache["index"] + jnp.arange(t)
    positions_BT = slots_T[None, :] - cache["start"][:, None]
    keys_S = jnp.arange(max_len)
    mask_BTS = (keys_S[None, None, :] <= slots_T[None, :, None]) & \
        (keys_S[None, None, :] >= cache["start"][:, None, None])
    return positions_BT, mask_BTS


def _embed(params, tokens_BT, cfg: ModelConfig, positions):
    b, t = tokens_BT.shape
    dtype = jnp.dtype(cfg.compute_dtype)
    x_ND = layers.embed(params["embed"], tokens_BT.reshape(-1), dtype)
    if cfg.pos == "learned":
        # Left-padding slots have negative positions; clipped, they are masked out as keys anyway.
        pos = jnp.take(params["pos_embed"], positions, axis=0, mode="clip").astype(dtype)
        x_ND = (x_ND.reshape(b, t, -1) + pos).reshape(b * t, -1)
    return x_ND


def _run_blocks(params, x_ND, cfg: ModelConfig, batch: int, positions, mask_BTS, cache):
    """Scan the block pattern over its R repeats: each kind's stack [L, ...] is read as [R, c, ...]
    (c: the kind's count per repeat), the cache's [n_layers, ...] as [R, P, ...]. Returns (x, the
    new k and v or None, aux: auxiliary losses summed over layers, statistics stacked per layer)."""
    pattern = block_pattern(cfg)
    repeats = cfg.n_layers // len(pattern)
    per_repeat = lambda tree: jax.tree.map(lambda w: w.reshape(repeats, -1, *w.shape[1:]), tree)
    stacks = {kind: per_repeat(params[FFN_KINDS[kind].params_key]) for kind in set(pattern)}
    kvs = None if cache is None else per_repeat((cache["k"], cache["v"]))

    def step(x_ND, xs):
        stacks_r, kvs_r = xs
        seen, new_kvs, losses, stats = Counter(), [], {}, {}
        for i, kind in enumerate(pattern):
            p = jax.tree.map(lambda w: w[seen[kind]], stacks_r[kind])
            seen[kind] += 1
            kv = None if kvs_r is None else (kvs_r[0][i], kvs_r[1][i], cache["index"])
            x_ND, kv, block_aux = block(p, x_ND, cfg, kind, batch, positions, mask_BTS, kv)
            new_kvs.append(kv)
            for name, value in block_aux.get("losses", {}).items():
                losses[name] = losses.get(name, 0.0) + value
            for name, value in block_aux.items():
                if name != "losses":
                    stats.setdefault(name, []).append(value)
        kvs_out = None if kvs_r is None else tuple(jnp.stack([kv[j] for kv in new_kvs]) for j in (0, 1))
        stats = {name: jax.tree.map(lambda *v: jnp.stack(v), *values) for name, values in stats.items()}
        return x_ND, (kvs_out, losses, stats)
    if cfg.remat:
        step = jax.checkpoint(step)
    x_ND, (kvs, losses, stats) = jax.lax.scan(step, x_ND, (stacks, kvs))
    kvs, stats = jax.tree.map(lambda v: v.reshape(-1, *v.shape[2:]), (kvs, stats))   # [R, c, ...] -> layers
    return x_ND, kvs, {"losses": {name: jnp.sum(value) for name, value in losses.items()}, **stats}


def forward(params, tokens_BT, cfg: ModelConfig, cache=None):
    """tokens [B, T] -> (float32 logits [B, T, vocab_size], aux), the same pair for training,
    prefill and decoding.

    `aux` is a dict of the pass's side outputs: with a cache (init_cache), the tokens continue the
    cached sequence, their keys and values are written at cache["index"], and aux["cache"] is the
    updated cache; aux["losses"] holds auxiliary loss terms (name -> scalar, weighted, summed over
    layers) that loss_fn adds, e.g. a MoE's "moe_aux" and "moe_z"; a top-k MoE adds aux["moe"],
    moe.apply's statistics stacked over the MoE layers in layer order: "load" [L_moe, n_experts]
    (each expert's share of the assignments) and "dropped" [L_moe] (the share capacity dropped).
    """
    b, t = tokens_BT.shape
    if cache is not None and cfg.n_experts and cfg.router == "soft":
        raise ConfigError("model.router='soft' mixes tokens across the whole sequence, so it cannot decode "
                          "causally through a KV cache; use model.router='topk_softmax'")
    if cache is None:
        positions, mask_BTS = jnp.arange(t), None
    else:
        positions, mask_BTS = _cache_positions(cache, t, cache["k"].shape[2])
    x_ND = _embed(params, tokens_BT, cfg, positions)
    x_ND, kvs, aux = _run_blocks(params, x_ND, cfg, b, positions, mask_BTS, cache)
    if cfg.norm_position == "pre":
        x_ND = layers.norm(params.get("final_norm", {}), x_ND, cfg)
    w_DV = params["embed"].T if cfg.tie_embeddings else params["unembed"]
    logits_BTV = layers.unembed(w_DV, x_ND, cfg).reshape(b, t, -1)
    if cache is not None:
        aux["cache"] = {**cache, "k": kvs[0], "v": kvs[1], "index": cache["index"] + t}
    return logits_BTV, aux


def loss_fn(params, batch, cfg: ModelConfig):
    """Mean next-token cross-entropy (+ z_loss * mean logsumexp^2, + the forward pass's auxiliary
    losses). Returns (loss, metrics): ce, z, tokens, each auxiliary loss, and with a top-k MoE the
    per-layer arrays [L_moe] of moe.metrics (moe_load_max, moe_load_min, moe_dropped).

    An optional batch["mask"] [B, T] weights the tokens (0 drops one, e.g. the padding rows of a
    last validation batch); metrics["tokens"] is the weight summed, for exact means over batches.
    """
    logits_BTV, aux = forward(params, batch["inputs"], cfg)
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_BT = jnp.take_along_axis(logits_BTV, batch["targets"][..., None], axis=-1)[..., 0]
    mask_BT = batch.get("mask")
    weights_BT = jnp.ones_like(lse_BT) if mask_BT is None else mask_BT.astype(jnp.float32)
    tokens = jnp.sum(weights_BT)
    mean = lambda x_BT: jnp.sum(weights_BT * x_BT) / jnp.maximum(tokens, 1.0)
    ce, z = mean(lse_BT - target_BT), mean(jnp.square(lse_BT))
    loss = ce + cfg.z_loss * z if cfg.z_loss else ce
    for term in aux["losses"].values():   # already weighted by their coefficients
        loss = loss + term
    stats = moe.metrics(aux["moe"]) if "moe" in aux else {}
    return loss, {"ce": ce, "z": z, "tokens": tokens, **aux["losses"], **stats}


# --- Summary -------------------------------------------------------------------------------------


def summary(cfg: ModelConfig) -> str:
    """A table of every parameter (shape, logical axes, count) with totals and FLOPs per token."""
    rows = [("parameter", "shape", "logical axes", "count")]
    for name, spec in flat_specs(cfg):
        rows.append((name, "x".join(map(str, spec.shape)), ",".join(axis or "-" for axis in spec.axes),
                     f"{math.prod(spec.shape):,}"))
    return "\n".join([cli.format_table(rows, right=(3,)), f"total parameters: {count_params(cfg):,}",
                      f"active parameters per token: {count_active_params(cfg):,}",
                      f"training FLOPs per token at seq_len {cfg.seq_len}: {flops_per_token(cfg, cfg.seq_len):,.0f}"])


if __name__ == "__main__":
    from configs.load import load_config
    parser = cli.Parser(description="Print a preset's parameter table, size and FLOPs.")
    parser.add_argument("--config", required=True, help="a preset file, e.g. configs/quickstart.py")
    parser.add_argument("overrides", nargs="*", help="section.field=value, e.g. model.n_layers=4")
    args = parser.parse_args()
    try:
        print(summary(load_config(args.config, args.overrides).model))
    except ConfigError as err:
        raise SystemExit(f"error: {err}")
