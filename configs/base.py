"""Frozen, validated configuration dataclasses, one section each: model, data, optim, train, mesh,
eval.

Every dataclass validates itself on construction (and again on every `dataclasses.replace`), so a
bad value fails in one line before anything is built. Loading presets and overrides is
configs/load.py.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

REPO_ROOT = Path(__file__).resolve().parent.parent
FLOAT32_MAX = 3.4028234663852886e38   # float fields must fit the float32 step
FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")
STRATEGIES = ("dp", "fsdp", "tp")    # sharding.RULES has one table for each


class ConfigError(ValueError):
    """A one-line message naming the config key at fault and what is valid."""


def _fail(msg: str) -> typing.NoReturn:
    raise ConfigError(msg)


def _choice(section: str, name: str, value, options) -> None:
    if value not in options:
        _fail(f"{section}.{name}={value!r} is not valid; choose one of {', '.join(map(repr, options))}")


def _positive(section: str, obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and value <= 0:
            _fail(f"{section}.{name}={value!r} must be positive")


def _type_ok(value, hint) -> tuple[bool, object]:
    """Does `value` fit the type `hint`? Returns (ok, value coerced: int -> float)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            ok, coerced = _type_ok(value, arg)
            if ok:
                return True, coerced
        return False, value
    if hint is type(None):
        return value is None, value
    if origin is tuple:
        item = typing.get_args(hint)[0]
        return isinstance(value, tuple) and all(_type_ok(v, item)[0] for v in value), value
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if dataclasses.is_dataclass(hint):
        return isinstance(value, hint), value
    return isinstance(value, hint), value


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


class _Derived(int):
    """A size the config derived from others (e.g. head_dim = d_model // n_heads), not one it was
    given. It behaves as the int it is; the mark lets `dataclasses.replace` and overrides derive it
    afresh from the new values instead of carrying the old derivation along."""


class _Validated:
    """Type-checks every field against its annotation, rejects non-finite floats, then runs
    `validate`."""

    section: ClassVar[str] = ""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            hint = typing.get_type_hints(type(self))[f.name]
            value = getattr(self, f.name)
            if isinstance(value, _Derived):
                value = None
            ok, coerced = _type_ok(value, hint)
            if not ok:
                _fail(f"{self.section}.{f.name}={value!r} has type {type(value).__name__}; "
                      f"expected {_type_name(hint)}")
            if isinstance(coerced, float) and not abs(coerced) <= FLOAT32_MAX:   # NaN fails too
                _fail(f"{self.section}.{f.name}={coerced!r} must be a finite number within float32's range "
                      f"(|value| <= {FLOAT32_MAX:.4g}): the step computes in float32")
            object.__setattr__(self, f.name, coerced)
        self.validate()

    def validate(self) -> None:
        pass

    def derive(self, name: str, value: int) -> None:
        """Fill a field left as None with the value derived from the others, once."""
        if getattr(self, name) is None:
            object.__setattr__(self, name, _Derived(value))


# MLP kinds: name -> (activation, gated). A gated MLP is act(x W_gate) * (x W_up) W_out.
# layers.ACTIVATIONS implements each activation; tests/np_reference.py and torch/model.py each
# implement them again, independently.
MLPS = {
    "swiglu": ("silu", True),
    "geglu": ("gelu", True),
    "silu": ("silu", False),
    "gelu": ("gelu", False),
    "gelu_tanh": ("gelu_tanh", False),   # Hugging Face's gelu_new (GPT-2)
    "relu2": ("relu2", False),
}


@dataclass(frozen=True)
class ModelConfig(_Validated):
    section: ClassVar[str] = "model"
    # Size.
    vocab_size: int = 50257
    vocab_multiple: int = 1          # pad the embedding rows to a multiple of this (e.g. 64)
    seq_len: int = 1024              # trained context length
    n_layers: int = 12
    d_model: int = 768
    n_heads: int = 12
    n_kv_heads: int | None = None    # None: n_heads (MHA); 1: MQA; else GQA
    head_dim: int | None = None      # None: d_model // n_heads
    # Norms.
    norm: str = "rmsnorm"            # rmsnorm | layernorm
    norm_scale: bool = True          # learnable scale (gain)
    norm_bias: bool = False          # LayerNorm bias
    norm_eps: float = 1e-5
    norm_position: str = "pre"       # pre | post
    # Positions.
    pos: str = "rope"                # rope | learned | none
    rope_theta: float = 10000.0
    yarn_factor: float = 1.0         # 1: YaRN off; s > 1 stretches RoPE to s x the original context
    yarn_original_len: int | None = None   # None: seq_len
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: float | None = None       # None: 0.1 ln(s) + 1
    # Attention.
    qk_norm: bool = False
    attn_bias: bool = False          # biases on the QKV and output projections
    attn_impl: str = "auto"          # auto (layers.attention_backend) | einsum | xla | cudnn
    # MLP.
    mlp: str = "swiglu"              # a key of MLPS: swiglu | geglu | silu | gelu | gelu_tanh | relu2
    d_ff: int | None = None          # None: derived by d_ff_rule
    d_ff_rule: str = "auto"          # auto (8/3 for gated, 4 otherwise) | 4x | 8/3
    d_ff_multiple: int = 64          # the 8/3 rule rounds up to this
    mlp_bias: bool = False
    # Embeddings and output.
    tie_embeddings: bool = True
    logit_softcap: float | None = None     # cap * tanh(logits / cap)
    z_loss: float = 0.0                    # coefficient of mean(logsumexp^2)
    loss_chunks: int = 0                   # the loss in k sequence blocks, never all logits; 0: auto (cross_entropy.py)
    # Init.
    init: str = "normal"             # normal | xavier | fan_in, for hidden matrices
    init_std: float = 0.02
    embed_init: str = "normal"       # normal | xavier | fan_in
    embed_std: float = 0.02
    unembed_init: str = "normal"     # untied output head
    unembed_std: float = 0.02
    residual_scale: bool = True      # residual-output projections x 1/sqrt(2 n_layers)
    zero_init_out: bool = False      # residual-output projections start at zero
    # Numerics and memory.
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: str = "dots"              # none | dots (keep weight-matmul outputs, recompute the rest) | full
    # Mixture of experts (n_experts > 0): every moe_every-th block's MLP is a routed MoE.
    n_experts: int = 0               # 0: dense model
    top_k: int = 2                   # experts per token (topk_softmax router)
    expert_ff: int | None = None     # each expert's hidden size; None: d_ff
    n_shared_experts: int = 0        # always-on experts beside the routed ones
    moe_every: int = 1               # 1: every block is MoE; k: blocks k, 2k, ... are
    router: str = "topk_softmax"     # topk_softmax (Switch/Mixtral) | soft (Soft MoE)
    capacity_factor: float | None = None   # None: dropless; c: each expert takes c * top_k * N / E tokens
    aux_loss: float = 0.01           # load-balancing loss coefficient (Switch/GShard form)
    router_z_loss: float = 0.001     # router z-loss coefficient (ST-MoE)

    def validate(self) -> None:
        s = self.section
        _positive(s, self, "vocab_size", "vocab_multiple", "seq_len", "n_layers", "d_model", "n_heads",
                  "n_kv_heads", "head_dim", "norm_eps", "rope_theta", "d_ff", "d_ff_multiple",
                  "init_std", "embed_std", "unembed_std", "yarn_original_len", "logit_softcap")
        _choice(s, "norm", self.norm, ("rmsnorm", "layernorm"))
        _choice(s, "norm_position", self.norm_position, ("pre", "post"))
        _choice(s, "pos", self.pos, ("rope", "learned", "none"))
        _choice(s, "attn_impl", self.attn_impl, ("auto", "einsum", "xla", "cudnn"))
        _choice(s, "remat", self.remat, ("none", "dots", "full"))
        _choice(s, "mlp", self.mlp, tuple(MLPS))
        _choice(s, "d_ff_rule", self.d_ff_rule, ("auto", "4x", "8/3"))
        for name in ("init", "embed_init", "unembed_init"):
            _choice(s, name, getattr(self, name), ("normal", "xavier", "fan_in"))
        for name in ("param_dtype", "compute_dtype"):
            _choice(s, name, getattr(self, name), FLOAT_DTYPES)
        self.derive_sizes()
        if self.norm_bias and self.norm != "layernorm":
            _fail(f"{s}.norm_bias=True needs {s}.norm='layernorm' (RMSNorm has no bias)")
        if self.n_heads % self.n_kv_heads:
            valid = [k for k in range(1, self.n_heads + 1) if self.n_heads % k == 0]
            _fail(f"{s}.n_heads={self.n_heads} is not divisible by {s}.n_kv_heads={self.n_kv_heads}; "
                  f"valid n_kv_heads: {valid}")
        if self.pos == "rope" and self.head_dim % 2:
            _fail(f"{s}.head_dim={self.head_dim} must be even for RoPE")
        if self.yarn_factor < 1.0:
            _fail(f"{s}.yarn_factor={self.yarn_factor} must be >= 1 (1 disables YaRN)")
        if self.yarn_factor > 1.0 and self.pos != "rope":
            _fail(f"{s}.yarn_factor={self.yarn_factor} needs {s}.pos='rope', got {self.pos!r}")
        if self.yarn_beta_fast <= self.yarn_beta_slow:
            _fail(f"{s}.yarn_beta_fast={self.yarn_beta_fast} must exceed yarn_beta_slow={self.yarn_beta_slow}")
        if self.z_loss < 0:
            _fail(f"{s}.z_loss={self.z_loss} must be >= 0")
        if self.loss_chunks < 0:
            _fail(f"{s}.loss_chunks={self.loss_chunks} must be >= 0 (0: blocks from the batch's shape, 1: one block)")
        self.validate_moe()

    def validate_moe(self) -> None:
        s = self.section
        _choice(s, "router", self.router, ("topk_softmax", "soft"))
        _positive(s, self, "top_k", "expert_ff", "moe_every", "capacity_factor")
        for name in ("n_experts", "n_shared_experts", "aux_loss", "router_z_loss"):
            if getattr(self, name) < 0:
                _fail(f"{s}.{name}={getattr(self, name)} must be >= 0")
        if not self.n_experts:
            return
        if self.top_k > self.n_experts:
            _fail(f"{s}.top_k={self.top_k} exceeds {s}.n_experts={self.n_experts}; choose top_k <= n_experts")
        if self.n_layers % self.moe_every:
            _fail(f"{s}.n_layers={self.n_layers} is not a multiple of {s}.moe_every={self.moe_every}")

    def derive_sizes(self) -> None:
        """n_kv_heads, head_dim and d_ff, when not given, derived once from the other fields."""
        s = self.section
        if self.head_dim is None and self.d_model % self.n_heads:
            _fail(f"{s}.d_model={self.d_model} is not divisible by {s}.n_heads={self.n_heads}; "
                  f"pick n_heads dividing d_model or set {s}.head_dim")
        self.derive("n_kv_heads", self.n_heads)
        self.derive("head_dim", self.d_model // self.n_heads)
        rule = self.d_ff_rule if self.d_ff_rule != "auto" else ("8/3" if self.gated else "4x")
        multiple = self.d_ff_multiple
        self.derive("d_ff", 4 * self.d_model if rule == "4x" else
                    multiple * math.ceil(int(8 * self.d_model / 3) / multiple))

    @property
    def activation(self) -> str:
        return MLPS[self.mlp][0]

    @property
    def gated(self) -> bool:
        return MLPS[self.mlp][1]

    @property
    def padded_vocab(self) -> int:
        return self.vocab_multiple * math.ceil(self.vocab_size / self.vocab_multiple)

    @property
    def max_len(self) -> int:
        """Longest sequence the positions support: YaRN stretches RoPE by its factor."""
        if self.yarn_factor > 1.0:
            return int((self.yarn_original_len or self.seq_len) * self.yarn_factor)
        return self.seq_len


@dataclass(frozen=True)
class DataConfig(_Validated):
    section: ClassVar[str] = "data"
    path: str = "data/stdlib"        # directory of .bin token shards
    val_tokens: int = 524_288        # fixed evaluation budget, read in order from the val shards
    doc_aligned: bool = False        # every window starts at an end-of-text token
    read_threads: int = 1            # grain threads reading ahead; 0: read on the training thread
    prefetch: int = 8                # batches grain reads ahead of the training step

    def validate(self) -> None:
        if not self.path:
            _fail("data.path is empty; give the directory holding the .bin shards")
        _positive(self.section, self, "val_tokens")
        for name in ("read_threads", "prefetch"):
            if getattr(self, name) < 0:
                _fail(f"data.{name}={getattr(self, name)} must be >= 0")


@dataclass(frozen=True)
class OptimConfig(_Validated):
    section: ClassVar[str] = "optim"
    name: str = "adamw"              # adamw | muon (Muon on the hidden matrices, AdamW on the rest)
    lr: float = 3e-4                 # peak lr of the hidden matrices (Muon's lr under muon)
    embed_lr: float | None = None    # None: lr (token and position embeddings)
    unembed_lr: float | None = None  # None: lr (the untied output head)
    scalar_lr: float | None = None   # None: lr (norm gains and biases)
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1        # decoupled, on matrices only (not on gains and biases)
    muon_momentum: float = 0.95
    schedule: str = "cosine"         # cosine | linear | constant | wsd (warmup-stable-decay)
    warmup_steps: int = 0
    decay_fraction: float = 0.2      # wsd: the final fraction of the steps that decays
    min_lr_ratio: float = 0.1        # the schedule ends at min_lr_ratio x peak
    clip_norm: float | None = 1.0    # global-norm clipping; None: off

    def validate(self) -> None:
        s = self.section
        _choice(s, "name", self.name, ("adamw", "muon"))
        _choice(s, "schedule", self.schedule, ("cosine", "linear", "constant", "wsd"))
        _positive(s, self, "lr", "embed_lr", "unembed_lr", "scalar_lr", "eps", "clip_norm")
        for name in ("b1", "b2", "muon_momentum", "min_lr_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                _fail(f"{s}.{name}={getattr(self, name)} must be in [0, 1]")
        if not 0.0 < self.decay_fraction <= 1.0:
            _fail(f"{s}.decay_fraction={self.decay_fraction} must be in (0, 1]")
        if self.weight_decay < 0 or self.warmup_steps < 0:
            _fail(f"{s}.weight_decay and {s}.warmup_steps must be >= 0")


@dataclass(frozen=True)
class TrainConfig(_Validated):
    section: ClassVar[str] = "train"
    steps: int = 1000
    batch_size: int = 8              # global batch, in sequences
    grad_accum: int = 1              # micro-batches per step (each batch_size / grad_accum)
    log_every: int = 10
    ckpt_every: int = 500
    keep_checkpoints: int = 3        # the last K are kept
    run_dir: str = ""                # "": runs/<config name>
    seed: int = 0
    peak_flops: float | None = None  # per-device peak FLOP/s for MFU; None: from the device table

    def validate(self) -> None:
        _positive(self.section, self, "steps", "batch_size", "grad_accum", "log_every",
                  "ckpt_every", "keep_checkpoints", "peak_flops")
        if self.batch_size % self.grad_accum:
            _fail(f"train.batch_size={self.batch_size} is not divisible by train.grad_accum="
                  f"{self.grad_accum}; use a batch size that is a multiple of it")


@dataclass(frozen=True)
class MeshConfig(_Validated):
    """The device mesh: every int field is one mesh axis, in mesh order (the one table of axes;
    a new axis is one field here plus its rules in sharding.RULES)."""
    section: ClassVar[str] = "mesh"
    data: int = -1                   # -1: the devices left over
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1                  # expert parallelism: MoE experts split over this axis
    strategy: str = "dp"             # dp | fsdp | tp, or a combination such as fsdp+tp

    @classmethod
    def axes(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.type in (int, "int"))

    def sizes(self) -> dict[str, int]:
        return {axis: getattr(self, axis) for axis in self.axes()}

    def validate(self) -> None:
        parts = self.strategy.split("+")
        if not all(part in STRATEGIES for part in parts) or len(set(parts)) != len(parts):
            _fail(f"mesh.strategy={self.strategy!r} is not valid; use one of {', '.join(STRATEGIES)} "
                  f"or a '+' combination such as 'fsdp+tp'")
        for axis, size in self.sizes().items():
            if size == 0 or size < -1:
                _fail(f"mesh.{axis}={size} must be a positive size or -1 (fill the remaining devices)")
        if sum(size == -1 for size in self.sizes().values()) > 1:
            _fail(f"mesh: at most one of {', '.join(self.axes())} may be -1")


@dataclass(frozen=True)
class EvalConfig(_Validated):
    section: ClassVar[str] = "eval"
    every: int = 200                 # validation loss (and the tasks) every this many steps, and at the end
    tasks: tuple[str, ...] = ()      # NAME=PATH.jsonl: hellaswag=..., or any multiple-choice jsonl
    max_items: int | None = None     # items per task; None: all of them
    batch_size: int = 16             # items per evaluation batch

    def validate(self) -> None:
        _positive(self.section, self, "every", "max_items", "batch_size")
        for task in self.tasks:
            name, sep, path = task.partition("=")
            if not sep or not name or not path:
                _fail(f"eval.tasks entry {task!r} is not of the form NAME=PATH (e.g. hellaswag=data/hellaswag_val.jsonl)")


@dataclass(frozen=True)
class Config(_Validated):
    section: ClassVar[str] = "config"
    name: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
