"""Next-token cross-entropy over the vocabulary, from the final hidden states.

`sums` returns the weighted sums over tokens that model.loss_fn turns into means:
objective = sum w (lse - target) + z_loss * sum w lse^2, and the two sums themselves as metrics.

In one block (model.loss_chunks = 1) the float32 logits [B, T, V] exist whole, and so does their
gradient. In k > 1 blocks the sequence is cut into k parts, and each block's gradient is taken in
the forward pass, as soon as its logits exist (the fused linear cross-entropy of Liger Kernel,
Hsu et al. 2024): the logits never exist beyond one block, and the backward pass only scales the
stored gradients by the incoming cotangent, so no unembedding matmul is recomputed. The price is
the unembedding's gradient [D, V] in float32, held from the forward pass on. The blocks cut the
sequence, not the batch, so each block keeps the batch's sharding.

loss_chunks = 0 (the default) picks k by `auto_blocks`: blocks of about d_model tokens, whose
logits are the size of that gradient, and one block when the batch holds fewer than 2 d_model
tokens, where the held gradient would outweigh the logits saved. Measured in notes/benchmarks.md.

Shape suffixes as in layers.py: B batch, T sequence, C positions in a block, D d_model.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

import layers
from configs.base import ModelConfig


def _block_sums(w, x_BCD, targets_BC, weights_BC, cfg: ModelConfig, transposed: bool):
    """(objective, (ce sum, z sum)) over one block of tokens."""
    b, c, d = x_BCD.shape
    logits_NV = layers.unembed(w, x_BCD.reshape(b * c, d), cfg, transposed)
    lse_N = jax.nn.logsumexp(logits_NV, axis=-1)
    target_N = jnp.take_along_axis(logits_NV, targets_BC.reshape(-1, 1), axis=-1)[:, 0]
    weights_N = weights_BC.reshape(-1)
    ce, z = jnp.sum(weights_N * (lse_N - target_N)), jnp.sum(weights_N * jnp.square(lse_N))
    return _objective(ce, z, cfg), (ce, z)


def _objective(ce, z, cfg: ModelConfig):
    return ce + cfg.z_loss * z if cfg.z_loss else ce


def _blocks(k: int, *arrays_BT) -> tuple:
    """Each [B, T, ...] -> [k, B, C, ...], zero-padded along T to a multiple of k (padded tokens
    come with weight 0)."""
    def split(a_BT):
        b, t = a_BT.shape[:2]
        c = -(-t // k)
        a_BT = jnp.pad(a_BT, [(0, 0), (0, k * c - t)] + [(0, 0)] * (a_BT.ndim - 2))
        return jnp.moveaxis(a_BT.reshape(b, k, c, *a_BT.shape[2:]), 1, 0)
    return tuple(split(a) for a in arrays_BT)


def auto_blocks(batch: int, seq: int, d_model: int) -> int:
    """The divisor of seq nearest batch * seq / d_model, or 1 below 2 d_model tokens."""
    target = batch * seq / d_model
    if target < 2:
        return 1
    return min((k for k in range(1, seq + 1) if seq % k == 0), key=lambda k: abs(k - target))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fused_sums(w, x_BTD, targets_BT, weights_BT, cfg: ModelConfig, transposed: bool, k: int):
    def body(totals, block):
        _, stats = _block_sums(w, *block, cfg, transposed)
        return jax.tree.map(jnp.add, totals, stats), None
    (ce, z), _ = jax.lax.scan(body, (jnp.float32(0), jnp.float32(0)), _blocks(k, x_BTD, targets_BT, weights_BT))
    return _objective(ce, z, cfg), (ce, z)


def _fused_forward(w, x_BTD, targets_BT, weights_BT, cfg: ModelConfig, transposed: bool, k: int):
    def body(carry, block):
        dw, totals = carry
        x_BCD, targets_BC, weights_BC = block
        (_, stats), grad_fn = jax.vjp(
            lambda w_, x_: _block_sums(w_, x_, targets_BC, weights_BC, cfg, transposed), w, x_BCD)
        dw_block, dx_BCD = grad_fn((jnp.float32(1), jax.tree.map(jnp.zeros_like, stats)))
        return (dw + dw_block.astype(jnp.float32), jax.tree.map(jnp.add, totals, stats)), dx_BCD
    b, t, d = x_BTD.shape
    init = (jnp.zeros(w.shape, jnp.float32), (jnp.float32(0), jnp.float32(0)))
    (dw, (ce, z)), dx_KBCD = jax.lax.scan(body, init, _blocks(k, x_BTD, targets_BT, weights_BT))
    dx_BTD = jnp.moveaxis(dx_KBCD, 0, 1).reshape(b, -1, d)[:, :t]
    return (_objective(ce, z, cfg), (ce, z)), (dw.astype(w.dtype), dx_BTD)


def _fused_backward(cfg, transposed, k, residuals, cotangents):
    dw, dx_BTD = residuals
    g = cotangents[0]     # the metrics' cotangents are dropped: sums() stops their gradient
    return (g * dw).astype(dw.dtype), (g * dx_BTD).astype(dx_BTD.dtype), None, None


_fused_sums.defvjp(_fused_forward, _fused_backward)


def sums(w, x_BTD, targets_BT, weights_BT, cfg: ModelConfig, transposed: bool = False):
    """(objective, ce sum, z sum) of next-token cross-entropy weighted per token, from the final
    hidden states x [B, T, D] through the unembedding w [D, V] (or with `transposed` the tied
    table [V, D]), in model.loss_chunks blocks (0: auto_blocks). Only the objective carries a
    gradient."""
    k = cfg.loss_chunks or auto_blocks(*x_BTD.shape)
    if k == 1:
        objective, (ce, z) = _block_sums(w, x_BTD, targets_BT, weights_BT, cfg, transposed)
    else:
        objective, (ce, z) = _fused_sums(w, x_BTD, targets_BT, weights_BT, cfg, transposed, k)
    return objective, jax.lax.stop_gradient(ce), jax.lax.stop_gradient(z)
