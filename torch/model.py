"""The PyTorch twin of model.py: the same architecture read from the same ModelConfig, with the
same parameter tree, so one set of weights gives the same logits in both frameworks.

Every parameter is registered under its JAX path joined by dots, with the JAX shape: the block
weights stay stacked on a leading layer axis (`blocks.attn.wqkv` is params["blocks"]["attn"]["wqkv"],
[L, D, K, G+2, E]). `jax_path` is the one mapping between the trees; `GPT.load_params` and
`GPT.jax_params` both go through it.

This folder has no __init__.py, so `import torch` still finds PyTorch; load this file by path:
    spec = importlib.util.spec_from_file_location("torch_model", "torch/model.py")

Mixture-of-experts blocks (moe_blocks) follow model.py's pattern and moe.py's routing, written
again here: each expert runs on the rows that chose it (gathered, then index_add), capacity in
token order per sequence; only sizes (expert_ff, capacity, router width) come from moe.py.

Shape suffixes as in layers.py: B batch, T sequence, N = B*T, D d_model, H query heads,
K kv heads, G = H // K, E head_dim, F MLP hidden, V vocabulary, X experts, A = top_k.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import layers
import moe

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


def _mlp_specs(cfg, lead, Fh, hidden, out_scale):
    """An MLP's weights stacked over the leading axes `lead` (layers, or layers and experts)."""
    D, zeros = cfg.d_model, nn.init.zeros_
    inner = (D, 2, Fh) if cfg.gated else (D, Fh)
    mlp = {"w_in": (lead + inner, hidden(D, math.prod(inner[1:]))), "w_out": (lead + (Fh, D), hidden(Fh, D, out_scale))}
    if cfg.mlp_bias:
        mlp |= {"b_in": (lead + inner[1:], zeros), "b_out": (lead + (D,), zeros)}
    return mlp


def _moe_specs(cfg, L, hidden, out_scale):
    """The router, the routed experts [L, X, ...] and the shared experts' one MLP."""
    Fe, width = moe.expert_ff(cfg), moe.router_width(cfg)
    specs = {"router": ((L, cfg.d_model, width), hidden(cfg.d_model, width)),
             **_mlp_specs(cfg, (L, cfg.n_experts), Fe, hidden, out_scale)}
    if cfg.n_shared_experts:
        specs["shared"] = _mlp_specs(cfg, (L,), cfg.n_shared_experts * Fe, hidden, out_scale)
    return specs


def layer_kinds(cfg) -> list[str]:
    """Each layer's FFN: with experts, every moe_every-th layer (counting from 1) is MoE."""
    return ["moe" if cfg.n_experts and (i + 1) % cfg.moe_every == 0 else "dense" for i in range(cfg.n_layers)]


def _block_specs(cfg, kind, L):
    D, H, K, E = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    G = H // K
    out_scale = 0.0 if cfg.zero_init_out else (1 / math.sqrt(2 * cfg.n_layers) if cfg.residual_scale else 1.0)
    hidden = lambda fan_in, fan_out, scale=1.0: _matrix_init(cfg.init, cfg.init_std, fan_in, fan_out, scale)
    zeros = nn.init.zeros_
    attn = {"wqkv": ((L, D, K, G + 2, E), hidden(D, K * (G + 2) * E)),
            "wo": ((L, H, E, D), hidden(H * E, D, out_scale))}
    if cfg.attn_bias:
        attn |= {"bqkv": ((L, K, G + 2, E), zeros), "bo": ((L, D), zeros)}
    if cfg.qk_norm and cfg.norm_scale:
        attn |= {"q_norm": ((L, E), nn.init.ones_), "k_norm": ((L, E), nn.init.ones_)}
    mlp = _mlp_specs(cfg, (L,), cfg.d_ff, hidden, out_scale) if kind == "dense" else \
        _moe_specs(cfg, L, hidden, out_scale)
    return {"attn_norm": _norm_specs(cfg, (L, D)), "attn": attn,
            "mlp_norm": _norm_specs(cfg, (L, D)), "mlp": mlp}


def param_specs(cfg) -> dict:
    """Nested dict of (shape, init) mirroring model.param_specs, empty groups left out."""
    D, V = cfg.d_model, cfg.padded_vocab
    kinds = layer_kinds(cfg)
    specs = {"embed": ((V, D), _matrix_init(cfg.embed_init, cfg.embed_std, D, V)),
             **{key: _block_specs(cfg, kind, kinds.count(kind))
                for kind, key in (("dense", "blocks"), ("moe", "moe_blocks")) if kind in kinds}}
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
        gate, up = h.view(-1, 2, h.shape[-1] // 2).unbind(1)
        h = act(gate) * up
    else:
        h = act(h)
    y = h @ p["w_out"].to(dtype)
    return y + p["b_out"].to(dtype) if "b_out" in p else y


def _experts(p) -> list[dict]:
    """Per-expert views of the routed experts' weights (one unbind each, as _layers)."""
    names = [name for name in ("w_in", "w_out", "b_in", "b_out") if name in p]
    return [dict(zip(names, views)) for views in zip(*(p[name].unbind(0) for name in names))]


def _kept(chosen_NA, batch, cfg):
    """Which assignments an expert takes: all when dropless, else per sequence the first C in
    token order."""
    if cfg.capacity_factor is None:
        return torch.ones_like(chosen_NA, dtype=torch.bool)
    n, a = chosen_NA.shape
    onehot = F.one_hot(chosen_NA.reshape(batch, -1), cfg.n_experts)
    position = ((onehot.cumsum(1) - 1) * onehot).sum(-1)
    return (position < moe.capacity(cfg, n // batch)).reshape(n, a)


def topk_moe(p, x_ND, batch, cfg, losses):
    """Softmax router in float32, top_k gates renormalized; each expert on its kept rows. Adds
    the weighted load-balancing and z-losses into `losses`."""
    X, k = cfg.n_experts, cfg.top_k
    logits = x_ND.float() @ p["router"].float()
    probs = logits.softmax(-1)
    gate, chosen = probs.topk(k, dim=-1)
    gate = gate / gate.sum(-1, keepdim=True)
    kept = _kept(chosen, batch, cfg)
    y = torch.zeros_like(x_ND)
    for e, p_e in enumerate(_experts(p)):
        rows, slot = torch.nonzero((chosen == e) & kept, as_tuple=True)
        y = y.index_add(0, rows, mlp(p_e, x_ND[rows], cfg) * gate[rows, slot, None].to(x_ND.dtype))
    load = F.one_hot(chosen, X).sum(1).float().mean(0) / k
    losses["moe_aux"] = losses.get("moe_aux", 0.0) + cfg.aux_loss * X * (load * probs.mean(0)).sum()
    losses["moe_z"] = losses.get("moe_z", 0.0) + cfg.router_z_loss * torch.logsumexp(logits, -1).square().mean()
    return y


def soft_moe(p, x_ND, batch, cfg):
    """Soft MoE: slots mix the sequence (softmax over tokens), tokens mix the slots' outputs."""
    D, X, dtype = cfg.d_model, cfg.n_experts, x_ND.dtype
    x_BTD = x_ND.view(batch, -1, D)
    logits = x_BTD.float() @ p["router"].float()
    slots = torch.einsum("bts,btd->bsd", logits.softmax(1).to(dtype), x_BTD).view(batch, X, -1, D)
    out = torch.stack([mlp(p_e, slots[:, e].reshape(-1, D), cfg).view(batch, -1, D)
                       for e, p_e in enumerate(_experts(p))], 1)
    return torch.einsum("bts,bsd->btd", logits.softmax(2).to(dtype), out.view(batch, -1, D)).reshape(x_ND.shape)


def moe_ffn(p, x_ND, batch, cfg, losses):
    y = soft_moe(p, x_ND, batch, cfg) if cfg.router == "soft" else topk_moe(p, x_ND, batch, cfg, losses)
    return y + mlp(p["shared"], x_ND, cfg) if "shared" in p else y


def block(p, x_ND, rope, batch, cfg, kind="dense", losses=None):
    """Attention then the FFN of its kind, each with a residual, pre- or post-norm (model.block);
    a MoE block adds its auxiliary losses into `losses`."""
    attn = lambda h: attention(p["attn"], h, rope, batch, cfg)
    ff = lambda h: mlp(p["mlp"], h, cfg) if kind == "dense" else moe_ffn(p["mlp"], h, batch, cfg, losses)
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
    """Nested specs -> nested modules holding parameters and submodules (a MoE's `mlp` has both),
    so parameter names are the dotted JAX paths."""
    module = nn.Module()
    for name, spec in specs.items():
        if isinstance(spec, dict):
            module.add_module(name, _module(spec, dtype))
        else:
            module.register_parameter(name, nn.Parameter(torch.empty(spec[0], dtype=dtype)))
    return module


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

    def forward(self, tokens_BT, losses=None):
        """A dict passed as `losses` receives the MoE blocks' auxiliary losses (weighted, summed)."""
        cfg = self.cfg
        losses = {} if losses is None else losses
        params = to_tree(self.named_parameters())
        b, t = tokens_BT.shape
        dtype = DTYPES[cfg.compute_dtype]
        x_ND = F.embedding(tokens_BT.reshape(-1), params["embed"]).to(dtype)
        if cfg.pos == "learned":
            x_ND = (x_ND.view(b, t, -1) + params["pos_embed"][:t].to(dtype)).view(b * t, -1)
        rope = rope_tables(t, self.inv_freq, self.mscale) if cfg.pos == "rope" else None
        stacks = {kind: iter(_layers(params[key])) for kind, key in (("dense", "blocks"), ("moe", "moe_blocks"))
                  if key in params}
        for kind in layer_kinds(cfg):
            x_ND = block(next(stacks[kind]), x_ND, rope, b, cfg, kind, losses)
        if cfg.norm_position == "pre":
            x_ND = norm(params.get("final_norm", {}), x_ND, cfg)
        w_DV = params["embed"].T if cfg.tie_embeddings else params["unembed"]
        # In 16-bit compute PyTorch rounds the logits to 16 bits before this cast; JAX keeps float32.
        logits = (x_ND @ w_DV.to(dtype)).float()[:, : cfg.vocab_size]
        if cfg.logit_softcap is not None:
            logits = cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)
        return logits.view(b, t, -1)

    def loss(self, inputs_BT, targets_BT, mask_BT=None):
        """Mean next-token cross-entropy (+ z_loss * mean logsumexp^2, + the MoE losses), as
        model.loss_fn: an optional mask weights the tokens. Returns (loss, metrics)."""
        aux = {}
        logits_BTV = self(inputs_BT, aux)
        lse_BT = torch.logsumexp(logits_BTV, dim=-1)
        target_BT = logits_BTV.gather(-1, targets_BT[..., None])[..., 0]
        weights_BT = torch.ones_like(lse_BT) if mask_BT is None else mask_BT.float()
        tokens = weights_BT.sum()
        mean = lambda x_BT: (weights_BT * x_BT).sum() / tokens.clamp(min=1.0)
        ce, z = mean(lse_BT - target_BT), mean(torch.square(lse_BT))
        loss = ce + self.cfg.z_loss * z if self.cfg.z_loss else ce
        return loss + sum(aux.values()), {"ce": ce, "z": z, "tokens": tokens, **aux}

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
