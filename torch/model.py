"""The PyTorch twin of model.py: the same architecture read from the same ModelConfig, with the
same parameter tree, so one set of weights gives the same logits in both frameworks.

Every parameter is registered under its JAX path joined by dots, with the JAX shape: the block
weights stay stacked on a leading layer axis (`blocks.attn.wqkv` is params["blocks"]["attn"]["wqkv"],
[L, D, K, G+2, E]). `jax_path` is the one mapping between the trees; `GPT.load_params` and
`GPT.jax_params` both go through it.

This folder has no __init__.py, so `import torch` still finds PyTorch; load this file by path:
    spec = importlib.util.spec_from_file_location("torch_model", "torch/model.py")

Shape suffixes as in layers.py: B batch, T sequence, N = B*T, D d_model, H query heads,
K kv heads, G = H // K, E head_dim, F MLP hidden, V vocabulary.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import layers

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


# --- Parameters: the same tree as model.param_specs ----------------------------------------------


def _matrix_init(scheme, std, fan_in, fan_out, scale=1.0):
    """normal(std), Xavier uniform or fan-in normal, as model._matrix_init; `scale` multiplies the std."""
    if scheme == "normal":
        return lambda w: nn.init.normal_(w, 0.0, std * scale)
    if scheme == "xavier":
        bound = scale * math.sqrt(6.0 / (fan_in + fan_out))
        return lambda w: nn.init.uniform_(w, -bound, bound)
    return lambda w: nn.init.normal_(w, 0.0, scale / math.sqrt(fan_in))


def _norm_specs(cfg, shape):
    specs = {"scale": (shape, nn.init.ones_)} if cfg.norm_scale else {}
    return specs | ({"bias": (shape, nn.init.zeros_)} if cfg.norm_bias else {})


def _block_specs(cfg):
    L, D, H, K, E, Fh = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    G = H // K
    out_scale = 0.0 if cfg.zero_init_out else (1 / math.sqrt(2 * L) if cfg.residual_scale else 1.0)
    hidden = lambda fan_in, fan_out, scale=1.0: _matrix_init(cfg.init, cfg.init_std, fan_in, fan_out, scale)
    zeros = nn.init.zeros_
    attn = {"wqkv": ((L, D, K, G + 2, E), hidden(D, K * (G + 2) * E)),
            "wo": ((L, H, E, D), hidden(H * E, D, out_scale))}
    if cfg.attn_bias:
        attn |= {"bqkv": ((L, K, G + 2, E), zeros), "bo": ((L, D), zeros)}
    if cfg.qk_norm and cfg.norm_scale:
        attn |= {"q_norm": ((L, E), nn.init.ones_), "k_norm": ((L, E), nn.init.ones_)}
    w_in = (L, D, 2, Fh) if cfg.gated else (L, D, Fh)
    mlp = {"w_in": (w_in, hidden(D, math.prod(w_in[2:]))), "w_out": ((L, Fh, D), hidden(Fh, D, out_scale))}
    if cfg.mlp_bias:
        mlp |= {"b_in": ((L,) + w_in[2:], zeros), "b_out": ((L, D), zeros)}
    return {"attn_norm": _norm_specs(cfg, (L, D)), "attn": attn,
            "mlp_norm": _norm_specs(cfg, (L, D)), "mlp": mlp}


def param_specs(cfg) -> dict:
    """Nested dict of (shape, init) mirroring model.param_specs, empty groups left out."""
    D, V = cfg.d_model, cfg.padded_vocab
    specs = {"embed": ((V, D), _matrix_init(cfg.embed_init, cfg.embed_std, D, V)),
             "blocks": _block_specs(cfg)}
    if cfg.pos == "learned":
        specs["pos_embed"] = ((cfg.seq_len, D), _matrix_init(cfg.embed_init, cfg.embed_std, D, cfg.seq_len))
    if cfg.norm_position == "pre":
        specs["final_norm"] = _norm_specs(cfg, (D,))
    if not cfg.tie_embeddings:
        specs["unembed"] = ((D, V), _matrix_init(cfg.unembed_init, cfg.unembed_std, D, V))
    return _prune(specs)


def _prune(tree: dict) -> dict:
    pruned = {k: _prune(v) if isinstance(v, dict) else v for k, v in tree.items()}
    return {k: v for k, v in pruned.items() if v != {}}


def jax_path(name: str) -> tuple[str, ...]:
    """The single mapping between the trees: torch parameter "blocks.attn.wqkv" is
    params["blocks"]["attn"]["wqkv"], with the same shape."""
    return tuple(name.split("."))


def _tree(pairs) -> dict:
    """(path, leaf) pairs -> nested dict."""
    tree = {}
    for path, leaf in pairs:
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return tree


def _flatten(tree: dict, prefix=()):
    """(path, leaf) pairs of a nested dict, depth first."""
    for key, value in tree.items():
        yield from _flatten(value, prefix + (key,)) if isinstance(value, dict) else [(prefix + (key,), value)]


def to_tree(named_tensors) -> dict:
    """(torch name, tensor) pairs, e.g. named_parameters() or their gradients -> the JAX tree."""
    return _tree((jax_path(name), x) for name, x in named_tensors)


def _numpy(x: torch.Tensor) -> np.ndarray:
    x = x.detach().cpu()
    return (x.float() if x.dtype == torch.bfloat16 else x).numpy()  # NumPy has no bfloat16


# --- Layers: the functions of layers.py ----------------------------------------------------------


def rms_norm(x, scale, eps):
    """x / rms(x) * scale, computed in float32."""
    return F.rms_norm(x.float(), x.shape[-1:], None if scale is None else scale.float(), eps).to(x.dtype)


def norm(p, x, cfg):
    if cfg.norm == "rmsnorm":
        return rms_norm(x, p.get("scale"), cfg.norm_eps)
    scale, bias = p.get("scale"), p.get("bias")
    return F.layer_norm(x.float(), x.shape[-1:], None if scale is None else scale.float(),
                        None if bias is None else bias.float(), cfg.norm_eps).to(x.dtype)


def rope_tables(t, inv_freq, mscale):
    """cos and sin [T, E/2] in float32 for positions 0..T-1, scaled by mscale."""
    angles = torch.arange(t, device=inv_freq.device, dtype=torch.float32)[:, None] * inv_freq
    return torch.cos(angles) * mscale, torch.sin(angles) * mscale


def apply_rope(x, cos, sin):
    """Rotate the halves (x1, x2) of the last axis (NeoX/LLaMA layout), in float32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def attention(p, x_ND, rope, batch, cfg):
    """Fused QKV, optional QK-norm, RoPE, causal GQA attention (SDPA), output projection."""
    k, e, d = cfg.n_kv_heads, cfg.head_dim, cfg.d_model
    g = cfg.n_heads // k
    dtype = x_ND.dtype
    qkv = x_ND @ p["wqkv"].to(dtype).reshape(d, -1)
    if "bqkv" in p:
        qkv = qkv + p["bqkv"].to(dtype).reshape(-1)
    qkv_BKCTE = qkv.view(batch, -1, k, g + 2, e).permute(0, 2, 3, 1, 4)
    t = qkv_BKCTE.shape[3]
    q, key, value = qkv_BKCTE.split([g, 1, 1], dim=2)  # one split: its backward is one cat
    # SDPA's enable_gqa pairs query head h with kv head h // G: the JAX [K, G] grouping, flattened.
    q, key, value = q.reshape(batch, k * g, t, e), key.squeeze(2), value.squeeze(2)
    if cfg.qk_norm:
        q, key = rms_norm(q, p.get("q_norm"), cfg.norm_eps), rms_norm(key, p.get("k_norm"), cfg.norm_eps)
    if rope is not None:
        q, key = apply_rope(q, *rope), apply_rope(key, *rope)
    out_BHTE = F.scaled_dot_product_attention(q, key, value, is_causal=True, enable_gqa=True)
    y = out_BHTE.transpose(1, 2).reshape(x_ND.shape[0], -1) @ p["wo"].to(dtype).reshape(-1, d)
    return y + p["bo"].to(dtype) if "bo" in p else y


ACTIVATIONS = {   # keyed as layers.ACTIVATIONS; the config's MLP kind names one and its gating
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu2": lambda x: torch.square(F.relu(x)),
}


def mlp(p, x_ND, cfg):
    """act(x W_in) W_out, or act(x W_gate) * (x W_up) W_out from one [D, 2, F] weight."""
    dtype = x_ND.dtype
    h = x_ND @ p["w_in"].to(dtype).reshape(cfg.d_model, -1)
    if "b_in" in p:
        h = h + p["b_in"].to(dtype).reshape(-1)
    act = ACTIVATIONS[cfg.activation]
    if cfg.gated:
        gate, up = h.view(-1, 2, cfg.d_ff).unbind(1)
        h = act(gate) * up
    else:
        h = act(h)
    y = h @ p["w_out"].to(dtype)
    return y + p["b_out"].to(dtype) if "b_out" in p else y


def block(p, x_ND, rope, batch, cfg):
    """Attention then MLP, each with a residual, pre- or post-norm (model.block)."""
    attn = lambda h: attention(p["attn"], h, rope, batch, cfg)
    ff = lambda h: mlp(p["mlp"], h, cfg)
    if cfg.norm_position == "pre":
        x_ND = x_ND + attn(norm(p.get("attn_norm", {}), x_ND, cfg))
        return x_ND + ff(norm(p.get("mlp_norm", {}), x_ND, cfg))
    x_ND = norm(p.get("attn_norm", {}), x_ND + attn(x_ND), cfg)
    return norm(p.get("mlp_norm", {}), x_ND + ff(x_ND), cfg)


def _layers(blocks: dict) -> list[dict]:
    """Per-layer views of the stacked block weights. One unbind per weight: its backward is a
    single stack, where indexing layer i would add a full-size zero gradient for every layer."""
    paths, stacked = zip(*_flatten(blocks))
    return [_tree(zip(paths, views)) for views in zip(*(w.unbind(0) for w in stacked))]


# --- The module ----------------------------------------------------------------------------------


def _module(specs: dict, dtype) -> nn.Module:
    """Nested specs -> ModuleDict of ParameterDicts, so parameter names are the dotted JAX paths."""
    if all(isinstance(v, tuple) for v in specs.values()):
        return nn.ParameterDict({k: nn.Parameter(torch.empty(shape, dtype=dtype)) for k, (shape, _) in specs.items()})
    return nn.ModuleDict({k: _module(v, dtype) for k, v in specs.items()})


class GPT(nn.Module):
    """tokens [B, T] -> float32 logits [B, T, vocab_size], like model.forward."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        specs, dtype = param_specs(cfg), DTYPES[cfg.param_dtype]
        for name, spec in specs.items():
            if isinstance(spec, dict):
                self.add_module(name, _module(spec, dtype))
            else:
                self.register_parameter(name, nn.Parameter(torch.empty(spec[0], dtype=dtype)))
        inits = {path: init for path, (_, init) in _flatten(specs)}
        with torch.no_grad():
            for name, param in self.named_parameters():
                inits[jax_path(name)](param)
        inv_freq, self.mscale = layers.rope_frequencies(cfg)   # NumPy, shared with JAX
        # A buffer, not a parameter: it follows .to(device) and stays out of the parameter tree.
        self.register_buffer("inv_freq", torch.tensor(inv_freq, dtype=torch.float32), persistent=False)

    def forward(self, tokens_BT):
        cfg = self.cfg
        params = to_tree(self.named_parameters())
        b, t = tokens_BT.shape
        dtype = DTYPES[cfg.compute_dtype]
        x_ND = F.embedding(tokens_BT.reshape(-1), params["embed"]).to(dtype)
        if cfg.pos == "learned":
            x_ND = (x_ND.view(b, t, -1) + params["pos_embed"][:t].to(dtype)).view(b * t, -1)
        rope = rope_tables(t, self.inv_freq, self.mscale) if cfg.pos == "rope" else None
        for p in _layers(params["blocks"]):
            x_ND = block(p, x_ND, rope, b, cfg)
        if cfg.norm_position == "pre":
            x_ND = norm(params.get("final_norm", {}), x_ND, cfg)
        w_DV = params["embed"].T if cfg.tie_embeddings else params["unembed"]
        # In 16-bit compute PyTorch rounds the logits to 16 bits before this cast; JAX keeps float32.
        logits = (x_ND @ w_DV.to(dtype)).float()[:, : cfg.vocab_size]
        if cfg.logit_softcap is not None:
            logits = cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)
        return logits.view(b, t, -1)

    def loss(self, inputs_BT, targets_BT, mask_BT=None):
        """Mean next-token cross-entropy (+ z_loss * mean logsumexp^2), as model.loss_fn: an
        optional mask weights the tokens. Returns (loss, metrics)."""
        logits_BTV = self(inputs_BT)
        lse_BT = torch.logsumexp(logits_BTV, dim=-1)
        target_BT = logits_BTV.gather(-1, targets_BT[..., None])[..., 0]
        weights_BT = torch.ones_like(lse_BT) if mask_BT is None else mask_BT.float()
        tokens = weights_BT.sum()
        mean = lambda x_BT: (weights_BT * x_BT).sum() / tokens.clamp(min=1.0)
        ce, z = mean(lse_BT - target_BT), mean(torch.square(lse_BT))
        loss = ce + self.cfg.z_loss * z if self.cfg.z_loss else ce
        return loss, {"ce": ce, "z": z, "tokens": tokens}

    @torch.no_grad()
    def load_params(self, params: dict) -> None:
        """Copy in a JAX parameter tree (NumPy arrays or anything np.asarray takes)."""
        own = {jax_path(name): (name, p) for name, p in self.named_parameters()}
        given = dict(_flatten(params))
        if given.keys() != own.keys():
            raise ValueError(f"parameters not in this model: {sorted(given.keys() - own.keys())}; "
                             f"missing: {sorted(own.keys() - given.keys())}")
        for path, (name, param) in own.items():
            array = np.asarray(given[path])
            if array.shape != param.shape:
                raise ValueError(f"{name}: shape {array.shape} does not match {tuple(param.shape)}")
            # PyTorch cannot read NumPy's bfloat16 (ml_dtypes); float32 holds it exactly.
            param.copy_(torch.tensor(array.astype(np.float32) if array.dtype.name == "bfloat16" else array))

    def jax_params(self) -> dict:
        """The parameters as the JAX tree of NumPy arrays (bfloat16 comes back as float32)."""
        return to_tree((name, _numpy(p)) for name, p in self.named_parameters())
