"""Weight-only int8 quantization for decoding (`sample.py --quantize int8`).

Every matmul weight that layers.matmul reads becomes a layers.Int8Weight: symmetric, one scale
per output channel, scale = max|w| over the input axes / 127, q = round(w / scale) in [-127, 127].
The matmul dequantizes inside the dot, y = (x @ q) * scale, so the quantized model's only error
is the rounding of the weights. Quantized: attention wqkv and wo, the dense MLPs' w_in and w_out
(the MoE's shared experts too), the untied unembedding, and a tied embedding table: its rows are
the unembedding's output channels, so per-row scales serve both the lookup and the unembedding,
and the table is the largest matrix a decode step reads (45% of design_40m's weights). Left in float:
norms, biases, learned positions, an untied input embedding (only looked up), the MoE router
(tiny, and its choices are discrete) and the routed experts (moe.py reads them directly).

Speed, measured on XLA:CPU (AMD EPYC, AVX-512 VNNI/BF16; 2 cores shared with two niced jobs),
per step inside a jitted fori_loop like sample.py's decode loop, min of 9, float32 x @ w vs
(x @ q.astype(f32)) * s; 40m: design_40m's 16 SwiGLU layers plus the 50304-row unembedding:

    weight         batch 1: float   int8      batch 16: float   int8
    320 x 960               19 us    24 us              149 us   149 us
    320 x 50304            3.3 ms   6.7 ms              21 ms    25 ms
    40m decode step        9.6 ms    17 ms              49 ms    45 ms

XLA:CPU does not fuse the int8 -> float convert into the dot: it writes a float copy of each
weight before the dot (a transient the size of the largest matrix), so int8 saves ~4x weight
memory but costs up to 2x decode time on a CPU. Every alternative measured was no faster:
dot_general or einsum with preferred_element_type (they insert the same convert), a bf16 dot,
the vocabulary in chunks of 1k-8k columns, a multiply-and-reduce that fuses the convert (10-100x
slower), dynamic int8 activations (W8A8), and XLA's YNNPACK/XNNPACK fusion flags. GPUs' XLA
fuses the convert into the GEMM.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

import layers
import model
import parameters
from configs.base import ConfigError, ModelConfig

SCHEMES = ("int8",)
MATMUL_WEIGHTS = ("wqkv", "wo", "w_in", "w_out")   # the hidden matrices layers.matmul reads


def check_scheme(scheme: str) -> None:
    """Fail in one line on a scheme this module does not implement."""
    if scheme not in SCHEMES:
        raise ConfigError(f"--quantize {scheme}: unknown scheme; valid: {', '.join(SCHEMES)}")


@functools.partial(jax.jit, static_argnums=1)
def quantize_int8(w, in_axes: tuple[int, ...]) -> layers.Int8Weight:
    """Symmetric int8 with one float32 scale per output channel (the max over `in_axes`, kept as
    size-1 axes so the scale broadcasts against q)."""
    w32 = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w32), axis=in_axes, keepdims=True) / 127.0
    # An all-zero channel (e.g. a zero-initialized output projection) gets q = 0, scale 0: no NaN.
    q = jnp.round(w32 / jnp.where(scale > 0, scale, 1.0))
    return layers.Int8Weight(jnp.clip(q, -127, 127).astype(jnp.int8), scale)


def input_axes(names: tuple[str, ...], spec: parameters.ParamSpec, cfg: ModelConfig) -> tuple[int, ...] | None:
    """The input (contracted) axes of a parameter quantize_params replaces, or None to keep it."""
    if names == ("unembed",) or (names == ("embed",) and cfg.tie_embeddings):
        return (spec.axes.index("embed"),)   # [D, V] unembedding or the tied [V, D] table
    if names[-1] in MATMUL_WEIGHTS and spec.matrix is not None and "expert" not in spec.axes:
        in_axes = spec.matrix[0]
        return tuple(in_axes) if isinstance(in_axes, tuple) else (in_axes,)
    return None


def quantize_params(params: dict, cfg: ModelConfig, scheme: str) -> dict:
    """The parameters, stacked as model.init_params lays them out (quantize before
    model.decode_layout), with every matmul weight replaced by a layers.Int8Weight."""
    check_scheme(scheme)

    def one(path, spec, w):
        names = tuple(getattr(key, "key", key) for key in path)
        axes = input_axes(names, spec, cfg)
        return w if axes is None else quantize_int8(w, axes)
    return jax.tree_util.tree_map_with_path(one, model.param_specs(cfg), params, is_leaf=model.is_spec)


def param_bytes(params) -> int:
    """Bytes held by the parameters (an Int8Weight counts its q and its scales)."""
    return sum(leaf.nbytes for leaf in jax.tree.leaves(params))


def memory_line(before, after) -> str:
    """One line for the logs: the parameters' memory before and after quantization."""
    mib = 2.0 ** 20
    return (f"quantized: parameters {param_bytes(before) / mib:,.1f} MiB -> {param_bytes(after) / mib:,.1f} MiB "
            f"({param_bytes(before) / param_bytes(after):.2f}x smaller)")
