"""The optimizer: optax AdamW for every parameter group, or Muon on the hidden matrices, with one
learning-rate schedule shape scaled by each group's peak. notes/training.md explains the choices.

    tx, schedule = make_optimizer(cfg)     # an optax.GradientTransformation and the base lr by step
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from optax import contrib

import model
from configs.base import Config, OptimConfig

GROUPS = ("hidden", "embed", "unembed", "scalar")


def param_groups(cfg: Config) -> dict:
    """Each parameter's optimizer group: hidden matrices, embeddings, the output heads, or
    scalars (norm gains and biases). A MoE router [D, n_experts] is an output head too (a
    classifier over experts) and trains with the unembedding: AdamW at unembed_lr, never Muon,
    whose equal-singular-value update would move every expert's score direction alike."""
    named = {"embed": "embed", "pos_embed": "embed", "unembed": "unembed", "router": "unembed"}

    def group(path, spec):
        name = getattr(path[-1], "key", None)
        if name in named:
            return named[name]
        return "hidden" if spec.matrix is not None else "scalar"
    return jax.tree_util.tree_map_with_path(group, model.param_specs(cfg.model), is_leaf=model.is_spec)


def lr_schedule(optim: OptimConfig, steps: int, peak: float) -> optax.Schedule:
    """Linear warmup to `peak`, then cosine, linear, constant or warmup-stable-decay down to
    min_lr_ratio x peak at the last step."""
    # The peak is reached at step warmup_steps - 1; decay runs from there (wsd: from the start of
    # its final decay_fraction) to the last step, steps - 1.
    decay_start = max(optim.warmup_steps - 1, 0)
    if optim.schedule == "wsd":
        decay_start = max(decay_start, int(steps * (1 - optim.decay_fraction)) - 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warmup = jnp.minimum(1.0, (step + 1) / max(optim.warmup_steps, 1))
        progress = jnp.clip((step - decay_start) / max(steps - 1 - decay_start, 1), 0.0, 1.0)
        shape = {"cosine": 0.5 * (1 + jnp.cos(jnp.pi * progress)), "linear": 1 - progress,
                 "wsd": 1 - progress, "constant": jnp.ones_like(progress)}[optim.schedule]
        floor = 1.0 if optim.schedule == "constant" else optim.min_lr_ratio
        return peak * warmup * (floor + (1 - floor) * shape)
    return schedule


def make_optimizer(cfg: Config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """optax: AdamW for every group, or Muon on the hidden matrices; decay on matrices only.
    Returns the transformation and the schedule of the base learning rate (for the logs)."""
    optim, steps = cfg.optim, cfg.train.steps
    specs = model.param_specs(cfg.model)

    def adamw(lr, decay):
        return optax.adamw(lr_schedule(optim, steps, lr), optim.b1, optim.b2, optim.eps, weight_decay=decay)
    if optim.name == "muon":
        dims = jax.tree.map(lambda spec: contrib.MuonDimensionNumbers(*spec.matrix) if spec.matrix else None,
                            specs, is_leaf=model.is_spec)
        hidden = contrib.muon(lr_schedule(optim, steps, optim.lr), beta=optim.muon_momentum,
                              weight_decay=optim.weight_decay, muon_weight_dimension_numbers=dims)
    else:
        hidden = adamw(optim.lr, optim.weight_decay)
    tx = optax.multi_transform({
        "hidden": hidden,
        "embed": adamw(optim.embed_lr or optim.lr, optim.weight_decay),
        "unembed": adamw(optim.unembed_lr or optim.lr, optim.weight_decay),
        "scalar": adamw(optim.scalar_lr or optim.lr, 0.0),
    }, param_groups(cfg))
    if optim.clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(optim.clip_norm), tx)
    return tx, lr_schedule(optim, steps, optim.lr)
