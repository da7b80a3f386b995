"""The GPT model: the parameter tree, initialization, forward pass and loss.

Parameters are a nested dict of arrays. A model is a repeated pattern of blocks (attention, then
a feed-forward sublayer of some kind: `FFN_KINDS`); each kind's blocks share one stacked tree
whose leaves carry a leading "layers" axis, and in training `jax.lax.scan` runs the pattern's
repeats, so compile time is flat in depth; with a KV cache the layers are unrolled, each with its
own cache buffers, and `decode_layout` splits the stacks once so a decode step slices nothing.
A dense model's pattern is ("dense",); a mixture of experts puts a "moe" block (moe.py) every
moe_every blocks. Each sublayer's parameters are declared in parameters.py.

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
import cross_entropy
import layers
import moe
import parameters
from configs.base import ConfigError, ModelConfig
from parameters import ParamSpec


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
    "dense": FFNKind(specs=parameters.dense_specs, apply=lambda p, x_ND, cfg, batch: (layers.mlp(p, x_ND, cfg), {}),
                     matmul_params=lambda cfg: (3 if cfg.gated else 2) * cfg.d_model * cfg.d_ff,
                     params_key="blocks"),
    "moe": FFNKind(specs=parameters.moe_specs, apply=moe.apply, matmul_params=moe.matmul_params,
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
    return {"attn_norm": parameters.norm_specs(cfg, cfg.d_model, (L,), norm_axes), "attn": parameters.attention_specs(cfg, L),
            "mlp_norm": parameters.norm_specs(cfg, cfg.d_model, (L,), norm_axes), "mlp": FFN_KINDS[kind].specs(cfg, L)}


def param_specs(cfg: ModelConfig) -> dict:
    """Every parameter, declared once: a nested dict of ParamSpec (empty groups left out)."""
    D, V = cfg.d_model, cfg.padded_vocab
    specs = {
        "embed": ParamSpec((V, D), ("vocab", "embed"), cfg.param_dtype,
                           parameters.matrix_init(cfg.embed_init, cfg.embed_std, 1, 0)),
        **{FFN_KINDS[kind].params_key: _block_specs(cfg, kind, L) for kind, L in _stack_sizes(cfg).items()},
    }
    if cfg.pos == "learned":
        specs["pos_embed"] = ParamSpec((cfg.seq_len, D), (None, "embed"), cfg.param_dtype,
                                       parameters.matrix_init(cfg.embed_init, cfg.embed_std, 1, 0))
    if cfg.norm_position == "pre":  # post-norm blocks already end normalized
        specs["final_norm"] = parameters.norm_specs(cfg, D, (), ("norm",))
    if not cfg.tie_embeddings:
        specs["unembed"] = ParamSpec((D, V), ("embed", "vocab"), cfg.param_dtype,
                                     parameters.matrix_init(cfg.unembed_init, cfg.unembed_std, 0, 1))
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
    """An empty KV cache: k and v, each a tuple of one [B, K, max_len, E] buffer per layer in layer
    order (GQA stores only the kv heads; head-major, the layout attention reads without a copy;
    separate buffers, so each layer writes its new slots
    with one in-place dynamic_update_slice on its own donated buffer, and no layer's cache is
    sliced out of or stacked back into a shared array); `index`, the next slot to write;
    `start` [B], where each row's tokens begin (left-padded rows of a batch of prompts)."""
    shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
    dtype = jnp.dtype(cfg.compute_dtype)
    start = jnp.zeros((batch,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
    buffers = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers))
    return {"k": buffers(), "v": buffers(), "index": jnp.zeros((), jnp.int32), "start": start}


def decode_layout(params, cfg: ModelConfig) -> dict:
    """The parameters rearranged once, after loading, for decoding; forward accepts either layout.
    Each kind's stacked tree becomes a tuple of per-layer trees, so a decode step reads each
    layer's weights where they lie instead of slicing them out of the stack. A tied table is kept
    only as its transpose, the unembedding [D, V]: the matrix-vector product every step makes is
    faster on that layout (notes/inference.md), and a token's embedding is one column of it."""
    out = dict(params)
    for kind, L in _stack_sizes(cfg).items():
        key = FFN_KINDS[kind].params_key
        out[key] = tuple(jax.tree.map(lambda w: w[i], params[key]) for i in range(L))
    if "unembed" not in params:
        out["unembed"] = jax.tree.map(lambda w: w.T, out.pop("embed"))   # an Int8Weight's scale too
    return out


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
    if "embed" in params:
        x_ND = layers.embed(params["embed"], tokens_BT.reshape(-1), dtype)
    else:   # decode_layout keeps a tied table only as the unembedding [D, V]
        x_ND = layers.embed(params["unembed"], tokens_BT.reshape(-1), dtype, vocab_axis=1)
    if cfg.pos == "learned":
        # Left-padding slots have negative positions; clipped, they are masked out as keys anyway.
        pos = jnp.take(params["pos_embed"], positions, axis=0, mode="clip").astype(dtype)
        x_ND = (x_ND.reshape(b, t, -1) + pos).reshape(b * t, -1)
    return x_ND


def _add_aux(block_aux: dict, losses: dict, stats: dict) -> None:
    """Sum a block's auxiliary losses into `losses`; append its statistics to `stats` lists."""
    for name, value in block_aux.get("losses", {}).items():
        losses[name] = losses.get(name, 0.0) + value
    for name, value in block_aux.items():
        if name != "losses":
            stats.setdefault(name, []).append(value)


def _stack_stats(stats: dict) -> dict:
    return {name: jax.tree.map(lambda *v: jnp.stack(v), *values) for name, values in stats.items()}


# What the backward pass keeps of each scanned block's forward (the rest it recomputes): "dots"
# keeps the weight matmuls' outputs and recomputes norms, activations and attention: half the
# memory of "none" and, on a CPU, no slower, since every kept residual is a stacked buffer the
# scan fills and copies into each step (notes/training.md, "Remat").
REMAT_POLICIES = {"dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                  "full": jax.checkpoint_policies.nothing_saveable}


def _run_blocks(params, x_ND, cfg: ModelConfig, batch: int, positions):
    """Training and evaluation (no cache, stacked weights): scan the block pattern over its R
    repeats, each kind's stack [L, ...] read as [R, c, ...] (c: the kind's count per repeat), so
    compile time is flat in depth. Returns (x, aux: auxiliary losses summed over layers,
    statistics stacked per layer)."""
    pattern = block_pattern(cfg)
    repeats = cfg.n_layers // len(pattern)
    stacks = {kind: jax.tree.map(lambda w: w.reshape(repeats, -1, *w.shape[1:]), params[FFN_KINDS[kind].params_key])
              for kind in set(pattern)}

    def step(x_ND, stacks_r):
        seen, losses, stats = Counter(), {}, {}
        for kind in pattern:
            p = jax.tree.map(lambda w: w[seen[kind]], stacks_r[kind])
            seen[kind] += 1
            x_ND, _, block_aux = block(p, x_ND, cfg, kind, batch, positions)
            _add_aux(block_aux, losses, stats)
        return x_ND, (losses, _stack_stats(stats))
    if cfg.remat != "none":
        step = jax.checkpoint(step, policy=REMAT_POLICIES[cfg.remat])
    x_ND, (losses, stats) = jax.lax.scan(step, x_ND, stacks)
    stats = jax.tree.map(lambda v: v.reshape(-1, *v.shape[2:]), stats)   # [R, c, ...] -> layers
    return x_ND, {"losses": {name: jnp.sum(value) for name, value in losses.items()}, **stats}


def _run_layers(params, x_ND, cfg: ModelConfig, batch: int, positions, mask_BTS, cache):
    """Prefill and decoding (or the decode layout): the layers unrolled in order, each reading its
    own weights (a tuple entry of decode_layout, else sliced from the stack) and its own cache
    buffers. Returns (x, the new per-layer k and v tuples or None, aux as _run_blocks')."""
    pattern, seen, kvs, losses, stats = block_pattern(cfg), Counter(), [], {}, {}
    for i in range(cfg.n_layers):
        kind = pattern[i % len(pattern)]
        stack = params[FFN_KINDS[kind].params_key]
        p = stack[seen[kind]] if isinstance(stack, tuple) else jax.tree.map(lambda w: w[seen[kind]], stack)
        seen[kind] += 1
        kv = None if cache is None else (cache["k"][i], cache["v"][i], cache["index"])
        x_ND, kv, block_aux = block(p, x_ND, cfg, kind, batch, positions, mask_BTS, kv)
        kvs.append(kv)
        _add_aux(block_aux, losses, stats)
    new_kv = None if cache is None else tuple(tuple(kv[j] for kv in kvs) for j in (0, 1))
    return x_ND, new_kv, {"losses": losses, **_stack_stats(stats)}


def hidden_states(params, tokens_BT, cfg: ModelConfig, cache=None):
    """tokens [B, T] -> (the final hidden states [B, T, D], after the final norm, aux): forward
    up to the unembedding."""
    b, t = tokens_BT.shape
    if cache is not None and cfg.n_experts and cfg.router == "soft":
        raise ConfigError("model.router='soft' mixes tokens across the whole sequence, so it cannot decode "
                          "causally through a KV cache; use model.router='topk_softmax'")
    if cache is None:
        positions, mask_BTS = jnp.arange(t), None
    else:
        positions, mask_BTS = _cache_positions(cache, t, cache["k"][0].shape[2])
    x_ND = _embed(params, tokens_BT, cfg, positions)
    split = isinstance(params[FFN_KINDS[block_pattern(cfg)[0]].params_key], tuple)   # decode_layout
    if cache is None and not split:
        x_ND, aux = _run_blocks(params, x_ND, cfg, b, positions)
    else:
        x_ND, kvs, aux = _run_layers(params, x_ND, cfg, b, positions, mask_BTS, cache)
    if cfg.norm_position == "pre":
        x_ND = layers.norm(params.get("final_norm", {}), x_ND, cfg)
    if cache is not None:
        aux["cache"] = {**cache, "k": kvs[0], "v": kvs[1], "index": cache["index"] + t}
    return x_ND.reshape(b, t, -1), aux


def unembedding(params) -> tuple:
    """(the unembedding weight, whether it is the tied table [V, D] rather than [D, V])."""
    return (params["unembed"], False) if "unembed" in params else (params["embed"], True)


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
    x_BTD, aux = hidden_states(params, tokens_BT, cfg, cache)
    b, t, d = x_BTD.shape
    w, transposed = unembedding(params)
    return layers.unembed(w, x_BTD.reshape(b * t, d), cfg, transposed).reshape(b, t, -1), aux


def loss_fn(params, batch, cfg: ModelConfig):
    """Mean next-token cross-entropy (+ z_loss * mean logsumexp^2, + the forward pass's auxiliary
    losses). Returns (loss, metrics): ce, z, tokens, each auxiliary loss, and with a top-k MoE the
    per-layer arrays [L_moe] of moe.metrics (moe_load_max, moe_load_min, moe_dropped).

    An optional batch["mask"] [B, T] weights the tokens (0 drops one, e.g. the padding rows of a
    last validation batch); metrics["tokens"] is the weight summed, for exact means over batches.
    The cross-entropy is cross_entropy.sums, in model.loss_chunks blocks.
    """
    x_BTD, aux = hidden_states(params, batch["inputs"], cfg)
    mask_BT = batch.get("mask")
    weights_BT = jnp.ones(x_BTD.shape[:2], jnp.float32) if mask_BT is None else mask_BT.astype(jnp.float32)
    tokens = jnp.sum(weights_BT)
    w, transposed = unembedding(params)
    objective, ce, z = cross_entropy.sums(w, x_BTD, batch["targets"], weights_BT, cfg, transposed)
    per_token = 1.0 / jnp.maximum(tokens, 1.0)
    loss = objective * per_token
    for term in aux["losses"].values():   # already weighted by their coefficients
        loss = loss + term
    stats = moe.metrics(aux["moe"]) if "moe" in aux else {}
    return loss, {"ce": ce * per_token, "z": z * per_token, "tokens": tokens, **aux["losses"], **stats}


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
