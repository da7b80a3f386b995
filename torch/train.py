"""The PyTorch twin of optimizer.py and train.train_step: the optimizer a Config describes and one
training step, for the benchmark (`python bench.py train`) and tests/test_torch_parity.py.

AdamW (torch's fused kernel) with optimizer.py's parameter groups (weight decay on matrices only,
each group at its own peak lr), the same lr schedule by step, and global-norm clipping before the
update. Muon has no twin. Load this file by path, like torch/model.py: benchmarks.common.load_twin("train").

    opt, schedule = make_optimizer(module, cfg)
    step = make_step(module, opt, schedule, cfg.optim.clip_norm)     # step(inputs, targets) -> loss
"""
from __future__ import annotations

import math

import jax
import torch

import optimizer


def lr_factor(optim, steps: int, step: int) -> float:
    """optimizer.lr_schedule(optim, steps, peak)(step) / peak, in plain Python: the same warmup and
    decay shapes, with no JAX computation in PyTorch's process."""
    decay_start = max(optim.warmup_steps - 1, 0)
    if optim.schedule == "wsd":
        decay_start = max(decay_start, int(steps * (1 - optim.decay_fraction)) - 1)
    warmup = min(1.0, (step + 1) / max(optim.warmup_steps, 1))
    progress = min(max((step - decay_start) / max(steps - 1 - decay_start, 1), 0.0), 1.0)
    shape = {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress,
             "wsd": 1 - progress, "constant": 1.0}[optim.schedule]
    floor = 1.0 if optim.schedule == "constant" else optim.min_lr_ratio
    return warmup * (floor + (1 - floor) * shape)


def group_settings(optim) -> dict[str, tuple[float, float]]:
    """Each group's (peak lr, weight decay), as optimizer.make_optimizer sets them."""
    return {"hidden": (optim.lr, optim.weight_decay),
            "embed": (optim.embed_lr or optim.lr, optim.weight_decay),
            "unembed": (optim.unembed_lr or optim.lr, optim.weight_decay),
            "scalar": (optim.scalar_lr or optim.lr, 0.0)}


def group_names(cfg) -> dict[str, str]:
    """optimizer.param_groups by JAX path joined by dots (GPT.named_jax_parameters' names)."""
    flat = jax.tree_util.tree_flatten_with_path(optimizer.param_groups(cfg))[0]
    return {".".join(key.key for key in path): group for path, group in flat}


def make_optimizer(module: torch.nn.Module, cfg) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """torch.optim.AdamW over the config's groups, and the schedule that sets every group's lr."""
    optim = cfg.optim
    if optim.name != "adamw":
        raise ValueError(f"optim.name={optim.name!r}: the PyTorch twin has AdamW only; set optim.name=adamw")
    names = group_names(cfg)
    members = {group: [] for group in optimizer.GROUPS}
    for name, param in module.named_jax_parameters():
        members[names[name]].append(param)
    settings = group_settings(optim)
    groups = [{"params": params, "lr": settings[group][0], "weight_decay": settings[group][1], "name": group}
              for group, params in members.items() if params]
    # Fused: one kernel per parameter group, the same update as the per-tensor loop (optax's adamw).
    opt = torch.optim.AdamW(groups, betas=(optim.b1, optim.b2), eps=optim.eps, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(optim, cfg.train.steps, step))
    return opt, schedule


def make_step(module: torch.nn.Module, opt, schedule, clip_norm: float | None, loss_fn=None):
    """step(inputs, targets) -> loss: forward and loss (loss_fn, default module.loss; the
    benchmark passes torch.compile(module.loss)), backward, clipping, the AdamW update, next lr."""
    loss_fn = loss_fn or module.loss
    params = list(module.parameters())

    def step(inputs, targets):
        loss, _ = loss_fn(inputs, targets)
        loss.backward()
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step
