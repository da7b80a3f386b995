"""The device mesh, and where every parameter, optimizer slot and batch lives on it.

The only module that knows about devices. Parameters carry logical axis names (model.param_specs);
one small rules table per strategy maps those names onto the mesh axes data, fsdp and tensor.
A dimension that does not divide its mesh axis falls back to replication, and the table says so.
"""
from __future__ import annotations

import math
import types

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

import model
from configs.base import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")
RULES = {
    "dp": {},                                                         # everything replicated
    "fsdp": {"embed": "fsdp"},                                        # ZeRO-3 style, along d_model
    "tp": {"heads": "tensor", "kv_heads": "tensor", "mlp": "tensor"},  # Megatron column/row split
}


class ShardingError(ConfigError):
    """A one-line problem with the mesh or the rules, raised before anything compiles."""


def rules_for(strategy: str) -> dict:
    """The union of the named strategies' rules, e.g. "fsdp+tp" (validated by MeshConfig)."""
    rules = {}
    for part in strategy.split("+"):
        rules.update(RULES[part])
    return rules


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices; a size of -1 takes the devices left over."""
    devices = jax.devices() if devices is None else devices
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes and len(devices) % fixed == 0:
        sizes[sizes.index(-1)] = len(devices) // fixed
    if math.prod(sizes) != len(devices):
        given = " x ".join(f"{n}={s}" for n, s in zip(MESH_AXES, [cfg.data, cfg.fsdp, cfg.tensor]))
        raise ShardingError(f"mesh {given} does not match the {len(devices)} devices; set mesh.data, mesh.fsdp "
                            f"and mesh.tensor so their product is {len(devices)} (one may be -1)")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def partition_spec(name: str, spec: model.ParamSpec, rules: dict, mesh) -> tuple[PartitionSpec, str]:
    """The parameter's PartitionSpec and a note on any dimension left replicated. `mesh` is a Mesh,
    or any object whose `shape` maps axis names to sizes (for planning without devices)."""
    parts, used, notes = [], set(), []
    for dim, axis in zip(spec.shape, spec.axes):
        mesh_axis = rules.get(axis)
        if mesh_axis is not None and mesh_axis in used:
            raise ShardingError(f"sharding rules map two axes of {name} {spec.axes} onto mesh axis {mesh_axis!r}")
        used.add(mesh_axis)
        size = mesh.shape[mesh_axis] if mesh_axis else 1
        if size > 1 and dim % size:
            notes.append(f"{axis}={dim} % {mesh_axis}={size}: replicated")
        parts.append(mesh_axis if size > 1 and dim % size == 0 else None)
    return PartitionSpec(*parts), "; ".join(notes)


def param_shardings(model_cfg, strategy: str, mesh: Mesh) -> dict:
    rules = rules_for(strategy)
    def one(path, spec):
        return NamedSharding(mesh, partition_spec(jax.tree_util.keystr(path), spec, rules, mesh)[0])
    return jax.tree_util.tree_map_with_path(one, model.param_specs(model_cfg), is_leaf=model.is_spec)


def state_shardings(abstract_state: dict, params: dict, mesh: Mesh) -> dict:
    """Optimizer slots shaped like a parameter (Adam's moments, Muon's momentum) follow it: their
    tree path ends with the parameter's path. The rest (counts, step, RNG) is replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    shapes = dict(jax.tree_util.tree_flatten_with_path(abstract_state["params"])[0])
    by_path = {path: (sharding, shapes[path].shape)
               for path, sharding in jax.tree_util.tree_flatten_with_path(params)[0]}

    def slot(path, leaf):
        for start in range(len(path)):
            sharding, shape = by_path.get(tuple(path[start:]), (None, None))
            if sharding is not None and shape == leaf.shape:
                return sharding
        return replicated
    opt = jax.tree_util.tree_map_with_path(slot, abstract_state["opt_state"])
    return {**{k: replicated for k in abstract_state}, "params": params, "opt_state": opt}


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch rows split over every data-parallel device: data x fsdp."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def check_batch(batch_size: int, grad_accum: int, mesh: Mesh) -> None:
    """Every micro-batch must split evenly over the data-parallel devices (data x fsdp)."""
    dp, micro = mesh.shape["data"] * mesh.shape["fsdp"], batch_size // grad_accum
    if micro % dp:
        raise ShardingError(f"train.batch_size={batch_size} (micro-batches of {micro} with train.grad_accum="
                            f"{grad_accum}) does not divide over the data-parallel size {dp} (mesh data x "
                            f"fsdp); use a batch size that is a multiple of {dp * grad_accum}")


def bytes_per_device(shape, dtype, sharding: NamedSharding) -> int:
    return math.prod(sharding.shard_shape(tuple(shape))) * np.dtype(dtype).itemsize


def table(model_cfg, strategy: str, mesh: Mesh, abstract_state: dict, shardings: dict) -> str:
    """Each parameter's shape, partition spec and bytes per device, with per-device totals."""
    rules = rules_for(strategy)
    rows = [("parameter", "shape", "spec", "bytes/device", "note")]
    for name, spec in model.flat_specs(model_cfg):
        pspec, note = partition_spec(name, spec, rules, mesh)
        nbytes = bytes_per_device(spec.shape, spec.dtype, NamedSharding(mesh, pspec))
        rows.append((name, "x".join(map(str, spec.shape)), str(tuple(pspec)), f"{nbytes:,}", note))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    for item in ("params", "opt_state"):
        total = sum(bytes_per_device(a.shape, a.dtype, s) for a, s in
                    zip(jax.tree.leaves(abstract_state[item]), jax.tree.leaves(shardings[item])))
        lines.append(f"{item} per device: {total:,} bytes ({total / 2**20:,.1f} MiB)")
    mesh_text = " x ".join(f"{n}={s}" for n, s in mesh.shape.items())
    return f"mesh {mesh_text}, strategy {strategy}\n" + "\n".join(lines)


# --- Planning ------------------------------------------------------------------------------------


def memory_per_device(model_cfg, strategy: str, devices: int) -> dict:
    """Estimated bytes per device for AdamW training, with all devices on the fsdp axis (or the data
    axis under dp): parameters, optimizer state (two moments in the parameter dtype), and the
    activations of one sequence at full context in bf16 without remat, L T (34 D + 5 H T)
    (Korthikanti et al., 2022), plus float32 logits and their gradient, 2 T V 4."""
    sizes = {"data": devices if strategy == "dp" else 1, "fsdp": 1 if strategy == "dp" else devices,
             "tensor": 1}
    plan = types.SimpleNamespace(shape=sizes)
    rules = rules_for(strategy)
    params = 0
    for name, spec in model.flat_specs(model_cfg):
        pspec, _ = partition_spec(name, spec, rules, plan)
        factor = math.prod(sizes[a] for a in pspec if a)
        params += math.prod(spec.shape) // factor * np.dtype(spec.dtype).itemsize
    c = model_cfg
    activations = c.n_layers * c.seq_len * (34 * c.d_model + 5 * c.n_heads * c.seq_len) \
        + 2 * c.seq_len * c.padded_vocab * 4
    return {"params": params, "opt_state": 2 * params, "activations": activations}


def memory_table(presets=("quickstart", "micro_26m", "design_40m", "gpt2_124m", "modern_160m")) -> str:
    """A markdown table of memory_per_device for every preset, dp and fsdp, at 8, 64, 256 devices."""
    from configs.base import REPO_ROOT, load_config
    lines = ["| preset | strategy | devices | params | opt state | activations (1 seq) | total |",
             "|---|---|---|---|---|---|---|"]
    gib = lambda b: f"{b / 2**30:.2f} GiB" if b >= 2**28 else f"{b / 2**20:.1f} MiB"
    for name in presets:
        cfg = load_config(REPO_ROOT / "configs" / f"{name}.py").model
        for strategy in ("dp", "fsdp"):
            for devices in (8, 64, 256):
                m = memory_per_device(cfg, strategy, devices)
                lines.append(f"| `{name}` | {strategy} | {devices} | {gib(m['params'])} | {gib(m['opt_state'])} | "
                             f"{gib(m['activations'])} | {gib(sum(m.values()))} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(memory_table())
