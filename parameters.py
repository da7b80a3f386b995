"""Parameter declarations: the ParamSpec type, the closed set of logical axis names, the
initializers, and the specs of each sublayer (attention, the dense MLP, the MoE), stacked over a
leading "layers" axis. model.py assembles them into the model's tree (model.param_specs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import jax

import moe
from configs.base import ModelConfig

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


def matrix_init(scheme: str, std: float, in_axis, out_axis, scale: float = 1.0, batch_axis=()) -> Callable:
    """normal(std), Xavier uniform, or fan-in variance scaling, the fans taken over in_axis and
    out_axis (a stacked weight's layer axis is a batch axis). `scale` multiplies the std."""
    if scheme == "normal":
        return init_ops.normal(std * scale)
    mode, dist = ("fan_avg", "uniform") if scheme == "xavier" else ("fan_in", "normal")
    return init_ops.variance_scaling(scale ** 2, mode, dist, in_axis, out_axis, batch_axis)


def norm_specs(cfg: ModelConfig, dim: int, stacked: tuple, axes: tuple) -> dict:
    specs = {}
    if cfg.norm_scale:
        specs["scale"] = ParamSpec(stacked + (dim,), axes, cfg.param_dtype, init_ops.ones)
    if cfg.norm_bias:
        specs["bias"] = ParamSpec(stacked + (dim,), axes, cfg.param_dtype, init_ops.zeros)
    return specs


def hidden(cfg: ModelConfig, shape, axes, in_axis, out_axis, scale=1.0, batch_axis=(0,)) -> ParamSpec:
    """A stacked hidden matrix (leading layer axis, and for experts an expert axis: batch axes,
    outside the fans), initialized by the config's scheme."""
    init = matrix_init(cfg.init, cfg.init_std, in_axis, out_axis, scale, batch_axis)
    return ParamSpec(shape, axes, cfg.param_dtype, init, matrix=(in_axis, out_axis))


def out_scale(cfg: ModelConfig) -> float:
    """The init scale of the projections that write into the residual stream."""
    return 0.0 if cfg.zero_init_out else (1 / math.sqrt(2 * cfg.n_layers) if cfg.residual_scale else 1.0)


def attention_specs(cfg: ModelConfig, L: int) -> dict:
    D, H, K, E = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    G, dt, zeros = H // K, cfg.param_dtype, init_ops.zeros
    attn = {
        "wqkv": hidden(cfg, (L, D, K, G + 2, E), ("layers", "embed", "kv_heads", None, "head_dim"), 1, (2, 3, 4)),
        "wo": hidden(cfg, (L, H, E, D), ("layers", "heads", "head_dim", "embed"), (1, 2), 3, out_scale(cfg)),
    }
    if cfg.attn_bias:
        attn["bqkv"] = ParamSpec((L, K, G + 2, E), ("layers", "kv_heads", None, "head_dim"), dt, zeros)
        attn["bo"] = ParamSpec((L, D), ("layers", "embed"), dt, zeros)
    if cfg.qk_norm and cfg.norm_scale:
        attn["q_norm"] = ParamSpec((L, E), ("layers", "head_dim"), dt, init_ops.ones)
        attn["k_norm"] = ParamSpec((L, E), ("layers", "head_dim"), dt, init_ops.ones)
    return attn


def dense_specs(cfg: ModelConfig, L: int, d_ff: int | None = None) -> dict:
    """The MLP: w_in [D, F], or [D, 2, F] (gate, up) when gated, and w_out [F, D]; F = d_ff."""
    D, F, dt = cfg.d_model, d_ff or cfg.d_ff, cfg.param_dtype
    w_in_shape, w_in_axes = ((L, D, 2, F), ("layers", "embed", None, "mlp")) if cfg.gated else \
        ((L, D, F), ("layers", "embed", "mlp"))
    mlp = {
        "w_in": hidden(cfg, w_in_shape, w_in_axes, 1, tuple(range(2, len(w_in_shape)))),
        "w_out": hidden(cfg, (L, F, D), ("layers", "mlp", "embed"), 1, 2, out_scale(cfg)),
    }
    if cfg.mlp_bias:
        mlp["b_in"] = ParamSpec(w_in_shape[:1] + w_in_shape[2:], w_in_axes[:1] + w_in_axes[2:], dt, init_ops.zeros)
        mlp["b_out"] = ParamSpec((L, D), ("layers", "embed"), dt, init_ops.zeros)
    return mlp


def moe_specs(cfg: ModelConfig, L: int) -> dict:
    """The router and routed experts (moe.specs), and the shared experts as one dense MLP."""
    zeros = lambda shape, axes: ParamSpec(shape, axes, cfg.param_dtype, init_ops.zeros)
    specs = moe.specs(cfg, L, lambda *args: hidden(cfg, *args), zeros, out_scale(cfg))
    if cfg.n_shared_experts:
        specs["shared"] = dense_specs(cfg, L, cfg.n_shared_experts * moe.expert_ff(cfg))
    return specs
