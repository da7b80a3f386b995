"""The PyTorch twin of model.py: the same architecture read from the same ModelConfig, so one set
of weights gives the same logits in both frameworks. Written as a well-made PyTorch GPT would be,
so the benchmark compares like with like: each layer owns its parameters (per-layer views of a
stacked weight would cost a stack of every gradient per step), biases go through addmm, and the
loss is fused F.cross_entropy. A parameter is one layer of the JAX tree's leaf, in its layout:
"blocks.3.attn.wqkv" is params["blocks"]["attn"]["wqkv"][3], [D, K, G+2, E]. `jax_path` is the
one mapping between the trees; `to_tree`, `GPT.load_params` and `GPT.jax_params` go through it.

This folder has no __init__.py, so `import torch` still finds PyTorch: load this file by path
(benchmarks.common.load_twin). Mixture-of-experts blocks (moe_blocks) follow moe.py's routing,
written again here: each expert runs on the rows that chose it (gathered, then index_add),
capacity in token order per sequence; only sizes (expert_ff, capacity, router width) come from moe.py.

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

DTYPES = {name: getattr(torch, name) for name in ("float32", "bfloat16", "float16", "float64")}
STACKS = {"dense": "blocks", "moe": "moe_blocks"}   # layer kind -> its stack in the JAX tree


# --- Parameters: model.param_specs, one layer at a time ------------------------------------------


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
    """An MLP's weights stacked over the leading axes `lead` (none, or the experts)."""
    D, zeros = cfg.d_model, nn.init.zeros_
    inner = (D, 2, Fh) if cfg.gated else (D, Fh)
    mlp = {"w_in": (lead + inner, hidden(D, math.prod(inner[1:]))), "w_out": (lead + (Fh, D), hidden(Fh, D, out_scale))}
    if cfg.mlp_bias:
        mlp |= {"b_in": (lead + inner[1:], zeros), "b_out": (lead + (D,), zeros)}
    return mlp


def _moe_specs(cfg, hidden, out_scale):
    """The router, the routed experts [X, ...] and the shared experts' one MLP."""
    Fe, width = moe.expert_ff(cfg), moe.router_width(cfg)
    specs = {"router": ((cfg.d_model, width), hidden(cfg.d_model, width)),
             **_mlp_specs(cfg, (cfg.n_experts,), Fe, hidden, out_scale)}
    if cfg.n_shared_experts:
        specs["shared"] = _mlp_specs(cfg, (), cfg.n_shared_experts * Fe, hidden, out_scale)
    return specs


def layer_kinds(cfg) -> list[str]:
    """Each layer's FFN: with experts, every moe_every-th layer (counting from 1) is MoE."""
    return ["moe" if cfg.n_experts and (i + 1) % cfg.moe_every == 0 else "dense" for i in range(cfg.n_layers)]


def _block_specs(cfg, kind):
    """One layer's weights: the JAX block's shapes without the leading layer axis."""
    D, H, K, E, G = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
    out_scale = 0.0 if cfg.zero_init_out else (1 / math.sqrt(2 * cfg.n_layers) if cfg.residual_scale else 1.0)
    hidden = lambda fan_in, fan_out, scale=1.0: _matrix_init(cfg.init, cfg.init_std, fan_in, fan_out, scale)
    zeros = nn.init.zeros_
    attn = {"wqkv": ((D, K, G + 2, E), hidden(D, K * (G + 2) * E)),
            "wo": ((H, E, D), hidden(H * E, D, out_scale))}
    if cfg.attn_bias:
        attn |= {"bqkv": ((K, G + 2, E), zeros), "bo": ((D,), zeros)}
    if cfg.qk_norm and cfg.norm_scale:
        attn |= {"q_norm": ((E,), nn.init.ones_), "k_norm": ((E,), nn.init.ones_)}
    mlp = _mlp_specs(cfg, (), cfg.d_ff, hidden, out_scale) if kind == "dense" else \
        _moe_specs(cfg, hidden, out_scale)
    return {"attn_norm": _norm_specs(cfg, (D,)), "attn": attn,
            "mlp_norm": _norm_specs(cfg, (D,)), "mlp": mlp}


def param_specs(cfg) -> dict:
    """Nested dict of (shape, init) mirroring model.param_specs; "blocks" and "moe_blocks" hold one
    layer's specs. A parameter-free norm is an empty group, a module without parameters."""
    D, V = cfg.d_model, cfg.padded_vocab
    kinds = layer_kinds(cfg)
    specs = {"embed": ((V, D), _matrix_init(cfg.embed_init, cfg.embed_std, D, V)),
             **{key: _block_specs(cfg, kind) for kind, key in STACKS.items() if kind in kinds}}
    if cfg.pos == "learned":
        specs["pos_embed"] = ((cfg.seq_len, D), _matrix_init(cfg.embed_init, cfg.embed_std, D, cfg.seq_len))
    if cfg.norm_position == "pre":
        specs["final_norm"] = _norm_specs(cfg, (D,))
    if not cfg.tie_embeddings:
        specs["unembed"] = ((D, V), _matrix_init(cfg.unembed_init, cfg.unembed_std, D, V))
    return specs


def jax_path(name: str) -> tuple[tuple[str, ...], int | None]:
    """The single mapping between the trees, name -> (JAX path, layer): "blocks.3.attn.wqkv" ->
    (("blocks", "attn", "wqkv"), 3), params["blocks"]["attn"]["wqkv"][3]; "embed" -> (("embed",), None)."""
    parts = name.split(".")
    if parts[0] in STACKS.values():
        return (parts[0], *parts[2:]), int(parts[1])
    return tuple(parts), None


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
    """(torch name, tensor or array) pairs, e.g. parameters or gradients -> the JAX tree (layers stacked)."""
    by_path = {}
    for name, x in named_tensors:   # a weight's layers in order, as named_parameters() lists them
        by_path.setdefault(jax_path(name)[0], []).append(x)
    stack = lambda xs: torch.stack(xs) if isinstance(xs[0], torch.Tensor) else np.stack(xs)
    return _tree((path, stack(xs) if path[0] in STACKS.values() else xs[0]) for path, xs in by_path.items())


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


def linear(x_ND, w, b=None):
    """x @ w (+ b): the weight as stored, [in, out], read in place; the bias fused by addmm."""
    w = w.to(x_ND.dtype)
    return x_ND @ w if b is None else torch.addmm(b.to(x_ND.dtype).reshape(-1), x_ND, w)


def attention(p, x_ND, rope, batch, cfg):
    """Fused QKV, optional QK-norm, RoPE, causal GQA attention (SDPA), output projection."""
    k, e, d, g = cfg.n_kv_heads, cfg.head_dim, cfg.d_model, cfg.n_heads // cfg.n_kv_heads
    qkv = linear(x_ND, p["wqkv"].reshape(d, -1), p.get("bqkv"))
    qkv_BKCTE = qkv.view(batch, -1, k, g + 2, e).permute(0, 2, 3, 1, 4)
    t = qkv_BKCTE.shape[3]
    q, key, value = qkv_BKCTE.split([g, 1, 1], dim=2)  # one split: its backward is one cat
    # SDPA's enable_gqa pairs query head h with kv head h // G: the JAX [K, G] grouping, flattened.
    q, key, value = q.reshape(batch, k * g, t, e), key.squeeze(2), value.squeeze(2)
    if cfg.qk_norm:
        q, key = rms_norm(q, p.get("q_norm"), cfg.norm_eps), rms_norm(key, p.get("k_norm"), cfg.norm_eps)
    if rope is not None:
        q, key = apply_rope(q, *rope), apply_rope(key, *rope)
    out_BHTE = F.scaled_dot_product_attention(q, key, value, is_causal=True, enable_gqa=g > 1)
    return linear(out_BHTE.transpose(1, 2).reshape(x_ND.shape[0], -1), p["wo"].reshape(-1, d), p.get("bo"))


ACTIVATIONS = {   # keyed as layers.ACTIVATIONS; the config's MLP kind names one and its gating
    "silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu2": lambda x: F.relu(x).square()}


def mlp(p, x_ND, cfg):
    """act(x W_in) W_out, or act(x W_gate) * (x W_up) W_out from one [D, 2, F] weight."""
    h = linear(x_ND, p["w_in"].reshape(cfg.d_model, -1), p.get("b_in"))
    act = ACTIVATIONS[cfg.activation]
    if cfg.gated:
        gate, up = h.view(-1, 2, h.shape[-1] // 2).unbind(1)
        return linear(act(gate) * up, p["w_out"], p.get("b_out"))
    return linear(act(h), p["w_out"], p.get("b_out"))


def _experts(p) -> list[dict]:
    """Per-expert views of the routed experts' weights. One unbind per weight: its backward is a
    single stack, where indexing expert e would add a full-size zero gradient for every expert."""
    names = [name for name in ("w_in", "w_out", "b_in", "b_out") if name in p]
    return [dict(zip(names, views)) for views in zip(*(p[name].unbind(0) for name in names))]


def _kept(chosen_NA, batch, cfg):
    """Which assignments an expert takes: all when dropless, else per sequence the first C in order."""
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


# --- The module ----------------------------------------------------------------------------------


def _module(specs: dict, dtype, module=None) -> nn.Module:
    """Nested specs -> nested modules holding parameters and submodules (a MoE's `mlp` has both),
    so parameter names are the dotted JAX paths; block stacks become a ModuleList of layers."""
    module = nn.Module() if module is None else module
    for name, spec in specs.items():
        if isinstance(spec, list):
            module.add_module(name, nn.ModuleList(_module(layer, dtype) for layer in spec))
        elif isinstance(spec, dict):
            module.add_module(name, _module(spec, dtype))
        else:
            module.register_parameter(name, nn.Parameter(torch.empty(spec[0], dtype=dtype)))
    return module


def _params(module: nn.Module) -> dict:
    """A module's parameters as a nested dict, for the layer functions above."""
    return _tree((tuple(name.split(".")), p) for name, p in module.named_parameters())


class GPT(nn.Module):
    """tokens [B, T] -> float32 logits [B, T, vocab_size], like model.forward."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        specs, kinds = param_specs(cfg), layer_kinds(cfg)
        stacks = {key: [specs[key]] * kinds.count(kind) for kind, key in STACKS.items() if key in specs}
        _module(specs | stacks, DTYPES[cfg.param_dtype], self)
        inits = {path: init for path, (_, init) in _flatten(specs)}
        with torch.no_grad():
            for name, param in self.named_parameters():
                inits[jax_path(name)[0]](param)
        inv_freq, self.mscale = layers.rope_frequencies(cfg)   # NumPy, shared with JAX
        # A buffer, not a parameter: it follows .to(device) and stays out of the parameter tree.
        self.register_buffer("inv_freq", torch.tensor(inv_freq, dtype=torch.float32), persistent=False)

    def named_jax_parameters(self):
        """(the JAX path joined by dots, parameter) pairs: every layer's weight under one name."""
        return ((".".join(jax_path(name)[0]), p) for name, p in self.named_parameters())

    def hidden(self, tokens_BT, losses: dict):
        """The last layer's (final-normed) activations [N, D]; MoE blocks add into `losses`."""
        cfg, (b, t) = self.cfg, tokens_BT.shape
        dtype = DTYPES[cfg.compute_dtype]
        x_ND = F.embedding(tokens_BT.reshape(-1), self.embed).to(dtype)
        if cfg.pos == "learned":
            x_ND = (x_ND.view(b, t, -1) + self.pos_embed[:t].to(dtype)).view(b * t, -1)
        rope = rope_tables(t, self.inv_freq, self.mscale) if cfg.pos == "rope" else None
        stacks = {kind: iter(getattr(self, key)) for kind, key in STACKS.items() if hasattr(self, key)}
        for kind in layer_kinds(cfg):
            x_ND = block(_params(next(stacks[kind])), x_ND, rope, b, cfg, kind, losses)
        if cfg.norm_position == "pre":
            x_ND = norm(_params(self.final_norm), x_ND, cfg)
        return x_ND

    def logits(self, x_ND):
        """Float32 logits [N, vocab_size]: only the real vocabulary's rows of the output matrix are
        multiplied, so padded rows get no probability and the logits need no slicing copy."""
        cfg, V = self.cfg, self.cfg.vocab_size
        w_DV = self.embed[:V].T if cfg.tie_embeddings else self.unembed[:, :V]
        # In 16-bit compute PyTorch rounds the logits to 16 bits before this cast; JAX keeps float32.
        logits = (x_ND @ w_DV.to(x_ND.dtype)).float()
        if cfg.logit_softcap is not None:
            logits = cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)
        return logits

    def forward(self, tokens_BT, losses=None):
        """A dict passed as `losses` receives the MoE blocks' auxiliary losses (weighted, summed)."""
        b, t = tokens_BT.shape
        return self.logits(self.hidden(tokens_BT, {} if losses is None else losses)).view(b, t, -1)

    def loss(self, inputs_BT, targets_BT, mask_BT=None):
        """Mean next-token cross-entropy (+ z_loss * mean logsumexp^2, + the MoE losses), as
        model.loss_fn: an optional mask weights the tokens. Returns (loss, metrics)."""
        aux = {}
        logits_NV = self.logits(self.hidden(inputs_BT, aux))
        targets_N = targets_BT.reshape(-1)
        ce_N = F.cross_entropy(logits_NV, targets_N, reduction="none")
        weights_N = torch.ones_like(ce_N) if mask_BT is None else mask_BT.reshape(-1).float()
        tokens = weights_N.sum()
        mean = lambda x_N: (weights_N * x_N).sum() / tokens.clamp(min=1.0)
        # z is logged either way, as JAX does; it is differentiated only when it is in the loss. The
        # log-sum-exp is the cross-entropy plus the target's logit: no second pass over [N, V].
        with torch.set_grad_enabled(torch.is_grad_enabled() and bool(self.cfg.z_loss)):
            z = mean(torch.square(ce_N + logits_NV.gather(1, targets_N[:, None])[:, 0]))
        ce = mean(ce_N)
        loss = ce + self.cfg.z_loss * z if self.cfg.z_loss else ce
        return loss + sum(aux.values()), {"ce": ce, "z": z, "tokens": tokens, **aux}

    @torch.no_grad()
    def load_params(self, params: dict) -> None:
        """Copy in a JAX parameter tree (NumPy arrays or anything np.asarray takes)."""
        given = {".".join(path): np.asarray(x) for path, x in _flatten(params)}
        meta = to_tree((name, p.to("meta")) for name, p in self.named_parameters())  # shapes, no copies
        own = {".".join(path): tuple(x.shape) for path, x in _flatten(meta)}
        if given.keys() != own.keys():
            raise ValueError(f"parameters not in this model: {sorted(given.keys() - own.keys())}; "
                             f"missing: {sorted(own.keys() - given.keys())}")
        for name in (name for name, array in given.items() if array.shape != own[name]):
            raise ValueError(f"{name}: shape {given[name].shape} does not match {own[name]}")
        for name, param in self.named_parameters():
            path, layer = jax_path(name)
            array = given[".".join(path)] if layer is None else given[".".join(path)][layer]
            # PyTorch cannot read NumPy's bfloat16 (ml_dtypes); float32 holds it exactly.
            param.copy_(torch.tensor(array.astype(np.float32) if array.dtype.name == "bfloat16" else array))

    def jax_params(self) -> dict:
        """The parameters as the JAX tree of NumPy arrays (bfloat16 comes back as float32: NumPy has none)."""
        widen = lambda x: x.float() if x.dtype == torch.bfloat16 else x
        return to_tree((name, widen(p.detach().cpu()).numpy()) for name, p in self.named_parameters())
