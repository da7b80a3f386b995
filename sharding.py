"""The device mesh, and where every parameter, optimizer slot and batch lives on it.

The only module that knows about devices. Parameters carry logical axis names (model.param_specs);
one small rules table per strategy maps those names onto the mesh axes (the int fields of
MeshConfig: data, fsdp, tensor, expert). A dimension that does not divide its mesh axis falls back
to replication, and the placement table says so; the expert axis must divide n_experts.

Expert parallelism: every strategy splits the experts' stacked weights over the `expert` axis (a
no-op at expert=1), and the batch is split over it too, as an extra data-parallel axis (as
MaxText does), so no device idles outside the MoE layers. XLA's partitioner places the dispatch;
the model names no devices.
"""
from __future__ import annotations

import math
import types

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

import cli
import model
import parameters
from configs.base import STRATEGIES, ConfigError, MeshConfig
from configs.load import load_config, preset_names, preset_path

MESH_AXES = MeshConfig.axes()
RULES = {
    "dp": {"expert": "expert"},                                       # all but experts replicated
    "fsdp": {"embed": "fsdp", "expert": "expert"},                    # ZeRO-3 style, along d_model
    "tp": {"heads": "tensor", "kv_heads": "tensor", "mlp": "tensor",  # Megatron column/row split
           "expert": "expert"},
}




class ShardingError(ConfigError):
    """A one-line problem with the mesh or the rules, raised before anything compiles."""


def check_rules(rules_table: dict) -> None:
    """Every strategy is one the config accepts, and every rule maps a known logical axis onto a
    mesh axis: a misspelled name would otherwise replicate silently."""
    if set(rules_table) != set(STRATEGIES):
        raise ShardingError(f"sharding.RULES has strategies {sorted(rules_table)}; configs.base.STRATEGIES "
                            f"lists {sorted(STRATEGIES)}")
    for strategy, rules in rules_table.items():
        for logical, mesh_axis in rules.items():
            if logical not in parameters.LOGICAL_AXES or mesh_axis not in MESH_AXES:
                raise ShardingError(f"sharding.RULES[{strategy!r}] maps {logical!r} -> {mesh_axis!r}; logical "
                                    f"axes: {', '.join(sorted(parameters.LOGICAL_AXES))}; mesh axes: {', '.join(MESH_AXES)}")


check_rules(RULES)


def rules_for(strategy: str) -> dict:
    """The union of the named strategies' rules, e.g. "fsdp+tp" (validated by MeshConfig)."""
    rules = {}
    for part in strategy.split("+"):
        rules.update(RULES[part])
    return rules


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices; a size of -1 takes the devices left over."""
    devices = jax.devices() if devices is None else devices
    given = cfg.sizes()
    sizes = list(given.values())
    fixed = math.prod(size for size in sizes if size != -1)
    if -1 in sizes and len(devices) % fixed == 0:
        sizes[sizes.index(-1)] = len(devices) // fixed
    if math.prod(sizes) != len(devices):
        text = " x ".join(f"{axis}={size}" for axis, size in given.items())
        names = ", ".join(f"mesh.{axis}" for axis in MESH_AXES)
        raise ShardingError(f"mesh {text} does not match the {len(devices)} devices; set {names} so their "
                            f"product is {len(devices)} (one may be -1)")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def partition_spec(name: str, spec: parameters.ParamSpec, rules: dict, mesh) -> tuple[PartitionSpec, str]:
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


def check_experts(model_cfg, mesh) -> None:
    """The expert axis splits the experts evenly (without experts it is one more data axis)."""
    size = mesh.shape["expert"]
    if size > 1 and model_cfg.n_experts and model_cfg.n_experts % size:
        divisors = [d for d in range(1, model_cfg.n_experts + 1) if model_cfg.n_experts % d == 0]
        raise ShardingError(f"mesh.expert={size} does not divide model.n_experts={model_cfg.n_experts}; "
                            f"use mesh.expert in {divisors}")


def param_shardings(model_cfg, strategy: str, mesh: Mesh) -> dict:
    check_experts(model_cfg, mesh)
    rules = rules_for(strategy)
    def one(path, spec):
        return NamedSharding(mesh, partition_spec(jax.tree_util.keystr(path), spec, rules, mesh)[0])
    return jax.tree_util.tree_map_with_path(one, model.param_specs(model_cfg), is_leaf=model.is_spec)


def state_shardings(abstract_state: dict, params: dict, mesh: Mesh) -> dict:
    """Optimizer slots shaped like a parameter (Adam's moments, Muon's momentum) follow it: their
    tree path ends with the parameter's path. The rest (counts, the step) is replicated."""
    shapes = dict(jax.tree_util.tree_flatten_with_path(abstract_state["params"])[0])
    by_path = {path: (sharding, shapes[path].shape)
               for path, sharding in jax.tree_util.tree_flatten_with_path(params)[0]}

    def slot(path, leaf):
        for start in range(len(path)):
            sharding, shape = by_path.get(tuple(path[start:]), (None, None))
            if sharding is not None and shape == leaf.shape:
                return sharding
        return replicated(mesh)
    opt = jax.tree_util.tree_map_with_path(slot, abstract_state["opt_state"])
    return {**{name: replicated(mesh) for name in abstract_state}, "params": params, "opt_state": opt}


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array: scalars, metrics, the step counter."""
    return NamedSharding(mesh, PartitionSpec())


DATA_AXES = ("data", "fsdp", "expert")    # the batch's rows split over these


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch rows split over every data-parallel device: data x fsdp x expert."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXES))


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways batch_sharding splits the rows."""
    return math.prod(mesh.shape[axis] for axis in DATA_AXES)


def check_batch(batch_size: int, grad_accum: int, mesh: Mesh) -> None:
    """Every micro-batch must split evenly over the data-parallel devices (data x fsdp x expert)."""
    dp, micro = data_parallel_size(mesh), batch_size // grad_accum
    if micro % dp:
        raise ShardingError(f"train.batch_size={batch_size} (micro-batches of {micro} with train.grad_accum="
                            f"{grad_accum}) does not divide over the data-parallel size {dp} (mesh data x "
                            f"fsdp x expert); use a batch size that is a multiple of {dp * grad_accum}")


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
    lines = [cli.format_table(rows)]
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
    activations of one sequence at full context in bf16 with nothing recomputed (remat=none: an
    upper bound), L T (34 D + 5 H T) (Korthikanti et al., 2022), plus float32 logits and their
    gradient, 2 T V 4."""
    sizes = {axis: 1 for axis in MESH_AXES} | ({"data": devices} if strategy == "dp" else {"fsdp": devices})
    plan = types.SimpleNamespace(shape=sizes)
    rules = rules_for(strategy)
    params = 0
    for name, spec in model.flat_specs(model_cfg):
        pspec, _ = partition_spec(name, spec, rules, plan)
        factor = math.prod(sizes[a] for a in pspec if a)
        params += math.prod(spec.shape) // factor * np.dtype(spec.dtype).itemsize
    L, T, D, H, V = (model_cfg.n_layers, model_cfg.seq_len, model_cfg.d_model, model_cfg.n_heads,
                     model_cfg.padded_vocab)
    activations = L * T * (34 * D + 5 * H * T) + 2 * T * V * 4
    return {"params": params, "opt_state": 2 * params, "activations": activations}


def memory_table(presets=None) -> str:
    """A markdown table of memory_per_device for every preset, dp and fsdp, at 8, 64, 256 devices."""
    lines = ["| preset | strategy | devices | params | opt state | activations (1 seq) | total |",
             "|---|---|---|---|---|---|---|"]
    gib = lambda b: f"{b / 2**30:.2f} GiB" if b >= 2**28 else f"{b / 2**20:.1f} MiB"
    for name in presets or preset_names():
        cfg = load_config(preset_path(name)).model
        for strategy in ("dp", "fsdp"):
            for devices in (8, 64, 256):
                m = memory_per_device(cfg, strategy, devices)
                lines.append(f"| `{name}` | {strategy} | {devices} | {gib(m['params'])} | {gib(m['opt_state'])} | "
                             f"{gib(m['activations'])} | {gib(sum(m.values()))} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(memory_table())
