"""Hugging Face checkpoints in and out of runs:

    python hf.py import DIR --out runs/NAME [--vocab-multiple N]
    python hf.py export runs/NAME [--step S] --out DIR

Import reads a local transformers directory (config.json; model.safetensors, or shards listed in
model.safetensors.index.json) of GPT-2, Llama (Llama 2/3, SmolLM, TinyLlama), Mistral (no sliding
window) or Qwen3, and writes a run directory that sample.py, evaluate.py and
`train.py --init-from` read. Export writes config.json and model.safetensors that
`AutoModelForCausalLM.from_pretrained` loads. Anything with no counterpart on the other side is a
one-line error naming the field. notes/evaluation.md has the details.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import checkpoint
import cli
import model
import runs
import tokenizer
from configs.base import Config, ConfigError, DataConfig, ModelConfig, TrainConfig
from configs.load import config_to_dict
from hf_files import HFError, read_checkpoint, read_tokenizer, store_tokenizer, write_hf_tokenizer, write_safetensors

ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}
GPT2_ACTS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "silu": "silu"}
GATED_ACTS = {"silu": "swiglu", "gelu": "geglu"}
EXPORT_ACTS = {"gelu_tanh": "gelu_new", "gelu": "gelu", "silu": "silu", "swiglu": "silu", "geglu": "gelu"}
REQUIRED = object()


# --- Configs -------------------------------------------------------------------------------------


def _field(hf: dict, key: str, where: str, default=REQUIRED):
    """config.json's `key`; a missing or null one is `default`, or an error if it has none."""
    value = hf.get(key)
    if value is None and default is REQUIRED:
        raise HFError(f"{where}: missing field {key!r}")
    return default if value is None else value


def _act(table: dict, name, where: str) -> str:
    if name not in table:
        raise HFError(f"{where}: activation {name!r} is not supported here; supported: {', '.join(table)}")
    return table[name]


def _gpt2_fields(hf: dict, where: str) -> dict:
    for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                    ("add_cross_attention", False)):
        if hf.get(key, ok) != ok:
            raise HFError(f"{where}: {key}={hf[key]} is not supported (this model needs {ok})")
    d_model = _field(hf, "n_embd", where)
    return dict(vocab_size=_field(hf, "vocab_size", where), seq_len=_field(hf, "n_positions", where),
                n_layers=_field(hf, "n_layer", where), d_model=d_model, n_heads=_field(hf, "n_head", where),
                d_ff=_field(hf, "n_inner", where, 4 * d_model), norm="layernorm", norm_bias=True,
                norm_eps=_field(hf, "layer_norm_epsilon", where, 1e-5), pos="learned", attn_bias=True,
                mlp=_act(GPT2_ACTS, _field(hf, "activation_function", where, "gelu_new"), f"{where}: activation_function"),
                mlp_bias=True, tie_embeddings=_field(hf, "tie_word_embeddings", where, True))


def _rope_theta(hf: dict, where: str) -> float:
    """Plain RoPE's theta. transformers' YaRN ramps over dimension indices and this model's over
    rotations (layers.rope_frequencies), so their frequencies differ: only unscaled RoPE maps."""
    key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    rope = hf.get(key) or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        why = ("transformers ramps YaRN over dimension indices, this model over rotations"
               if kind == "yarn" else "no such scaling here")
        raise HFError(f"{where}: {key}.rope_type={kind!r} is not supported ({why}); only unscaled RoPE maps")
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise HFError(f"{where}: partial_rotary_factor={partial} is not supported (RoPE covers the whole head)")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _check_window(hf: dict, model_type: str, where: str) -> None:
    window, context = hf.get("sliding_window"), hf.get("max_position_embeddings")
    if model_type == "qwen3" and not hf.get("use_sliding_window"):
        window = None
    if window is not None and (context is None or window < context):
        raise HFError(f"{where}: sliding_window={window} is not supported (attention here is full causal)")
    kinds = set(hf.get("layer_types") or ["full_attention"])
    if kinds != {"full_attention"}:
        raise HFError(f"{where}: layer_types {sorted(kinds)} are not supported; every layer must be full_attention")


def _llama_fields(hf: dict, model_type: str, where: str) -> dict:
    _check_window(hf, model_type, where)
    d_model, heads = _field(hf, "hidden_size", where), _field(hf, "num_attention_heads", where)
    return dict(vocab_size=_field(hf, "vocab_size", where), seq_len=_field(hf, "max_position_embeddings", where),
                n_layers=_field(hf, "num_hidden_layers", where), d_model=d_model, n_heads=heads,
                n_kv_heads=_field(hf, "num_key_value_heads", where, heads),
                head_dim=_field(hf, "head_dim", where, d_model // heads), norm="rmsnorm",
                norm_eps=_field(hf, "rms_norm_eps", where, 1e-6), pos="rope", rope_theta=_rope_theta(hf, where),
                qk_norm=model_type == "qwen3",
                attn_bias=model_type != "mistral" and bool(hf.get("attention_bias")),
                mlp=_act(GATED_ACTS, _field(hf, "hidden_act", where, "silu"), f"{where}: hidden_act"),
                d_ff=_field(hf, "intermediate_size", where),
                mlp_bias=model_type == "llama" and bool(hf.get("mlp_bias")),
                tie_embeddings=_field(hf, "tie_word_embeddings", where, False))


def model_config(hf: dict, where: str, vocab_multiple: int = 1) -> ModelConfig:
    """The ModelConfig of a transformers config.json (its dict); `where` names the file."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise HFError(f"{where}: model_type {model_type!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    for arch in hf.get("architectures") or []:
        if arch != ARCHITECTURES[model_type]:
            raise HFError(f"{where}: architectures {arch!r} is not supported; expected {ARCHITECTURES[model_type]}")
    fields = _gpt2_fields(hf, where) if model_type == "gpt2" else _llama_fields(hf, model_type, where)
    try:
        return ModelConfig(**fields, vocab_multiple=vocab_multiple)
    except ConfigError as e:
        raise HFError(f"{where}: no valid model config: {e}") from None


def _exportable(cfg: ModelConfig, family: str) -> None:
    """One line naming the first field that `family` (gpt2, llama or qwen3) cannot represent."""
    needs = {"norm_position": "pre", "logit_softcap": None, "yarn_factor": 1.0, "n_experts": 0, "norm_scale": True}
    if family == "gpt2":
        needs |= {"norm": "layernorm", "norm_bias": True, "attn_bias": True, "mlp_bias": True, "qk_norm": False,
                  "n_kv_heads": cfg.n_heads, "head_dim": cfg.d_model // cfg.n_heads}
    else:
        needs |= {"norm": "rmsnorm"} | ({"mlp_bias": False} if family == "qwen3" else {})
    for name, value in needs.items():
        if getattr(cfg, name) != value:
            raise HFError(f"model.{name}={getattr(cfg, name)!r} has no counterpart in "
                          f"{ARCHITECTURES[family]} (it needs {value!r})")
    acts = GPT2_ACTS if family == "gpt2" else GATED_ACTS
    if cfg.mlp not in acts.values():
        raise HFError(f"model.mlp={cfg.mlp!r} has no counterpart in {ARCHITECTURES[family]}; "
                      f"supported: {', '.join(sorted(set(acts.values())))}")


def hf_config(cfg: ModelConfig, eot: int | None) -> dict:
    """config.json for transformers: GPT-2 for learned positions, else Llama (Qwen3 with QK-norm)."""
    family = "gpt2" if cfg.pos == "learned" else "qwen3" if cfg.qk_norm else "llama"
    if cfg.pos == "none":
        raise HFError("model.pos='none' has no counterpart in GPT-2 or Llama")
    _exportable(cfg, family)
    common = {"architectures": [ARCHITECTURES[family]], "model_type": family, "vocab_size": cfg.vocab_size,
              "tie_word_embeddings": cfg.tie_embeddings, "dtype": "float32", "bos_token_id": eot,
              "eos_token_id": eot}
    if family == "gpt2":
        return common | {"n_positions": cfg.seq_len, "n_embd": cfg.d_model, "n_layer": cfg.n_layers,
                         "n_head": cfg.n_heads, "n_inner": cfg.d_ff, "layer_norm_epsilon": cfg.norm_eps,
                         "activation_function": EXPORT_ACTS[cfg.mlp],
                         "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0}
    # rope_theta beside rope_parameters: transformers 4 reads the one, 5 the other.
    return common | {"max_position_embeddings": cfg.seq_len, "hidden_size": cfg.d_model,
                     "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
                     "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
                     "intermediate_size": cfg.d_ff, "rms_norm_eps": cfg.norm_eps,
                     "hidden_act": EXPORT_ACTS[cfg.mlp],
                     "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
                     "rope_theta": cfg.rope_theta, "attention_bias": cfg.attn_bias, "mlp_bias": cfg.mlp_bias}


# --- Tensors -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One checkpoint tensor as a piece of one parameter: `hf` is its name ("{i}": the layer),
    `path` the parameter's keys, `index` the piece (after the layer axis). The stored layout
    joins the piece's first `n_in` axes (the matrix input) and the rest (its output), after
    reordering the axes by `perm`; `linear` stores it [out, in] (torch Linear) rather than
    [in, out] (GPT-2's Conv1D, embeddings); n_in=0 stores it flat (vectors)."""
    hf: str
    path: tuple
    index: tuple = ()
    n_in: int = 0
    linear: bool = False
    perm: tuple | None = None

    def hf_shape(self, piece_shape) -> tuple:
        shape = [piece_shape[a] for a in self.perm] if self.perm else list(piece_shape)
        if not self.n_in:
            return (math.prod(shape),)
        matrix = (math.prod(shape[:self.n_in]), math.prod(shape[self.n_in:]))
        return matrix[::-1] if self.linear else matrix

    def to_hf(self, piece: np.ndarray) -> np.ndarray:
        x = piece.transpose(self.perm) if self.perm else piece
        x = x.reshape(math.prod(x.shape[:self.n_in]), -1) if self.n_in else x.reshape(-1)
        return x.T if self.linear else x

    def from_hf(self, x: np.ndarray, piece_shape) -> np.ndarray:
        shape = [piece_shape[a] for a in self.perm] if self.perm else piece_shape
        x = (x.T if self.linear else x).reshape(shape)
        return x.transpose(np.argsort(self.perm)) if self.perm else x


def _gpt2_entries(cfg: ModelConfig) -> list[Entry]:
    block, layer = ("blocks",), "transformer.h.{i}."
    entries = [Entry("transformer.wte.weight", ("embed",), (slice(0, cfg.vocab_size),), 1),
               Entry("transformer.wpe.weight", ("pos_embed",), (), 1)]
    for hf_norm, norm in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
        entries += [Entry(f"{layer}{hf_norm}.{w}", block + (norm, ours)) for w, ours in (("weight", "scale"), ("bias", "bias"))]
    entries += [Entry(layer + "attn.c_attn.weight", block + ("attn", "wqkv"), (), 1, perm=(0, 2, 1, 3)),
                Entry(layer + "attn.c_attn.bias", block + ("attn", "bqkv"), (), perm=(1, 0, 2)),
                Entry(layer + "attn.c_proj.weight", block + ("attn", "wo"), (), 2),
                Entry(layer + "attn.c_proj.bias", block + ("attn", "bo")),
                Entry(layer + "mlp.c_fc.weight", block + ("mlp", "w_in"), (), 1),
                Entry(layer + "mlp.c_fc.bias", block + ("mlp", "b_in")),
                Entry(layer + "mlp.c_proj.weight", block + ("mlp", "w_out"), (), 1),
                Entry(layer + "mlp.c_proj.bias", block + ("mlp", "b_out")),
                Entry("transformer.ln_f.weight", ("final_norm", "scale")),
                Entry("transformer.ln_f.bias", ("final_norm", "bias"))]
    return entries


def _llama_entries(cfg: ModelConfig) -> list[Entry]:
    g, all_, layer = cfg.n_heads // cfg.n_kv_heads, slice(None), "model.layers.{i}."
    attn, mlp = ("blocks", "attn"), ("blocks", "mlp")
    entries = [Entry("model.embed_tokens.weight", ("embed",), (slice(0, cfg.vocab_size),), 1),
               Entry(layer + "input_layernorm.weight", ("blocks", "attn_norm", "scale")),
               Entry(layer + "post_attention_layernorm.weight", ("blocks", "mlp_norm", "scale")),
               Entry("model.norm.weight", ("final_norm", "scale"))]
    for name, part in (("q", slice(0, g)), ("k", g), ("v", g + 1)):
        entries.append(Entry(f"{layer}self_attn.{name}_proj.weight", attn + ("wqkv",), (all_, all_, part), 1, True))
        if cfg.attn_bias:
            entries.append(Entry(f"{layer}self_attn.{name}_proj.bias", attn + ("bqkv",), (all_, part)))
    entries.append(Entry(layer + "self_attn.o_proj.weight", attn + ("wo",), (), 2, True))
    if cfg.attn_bias:
        entries.append(Entry(layer + "self_attn.o_proj.bias", attn + ("bo",)))
    if cfg.qk_norm:
        entries += [Entry(f"{layer}self_attn.{n}_norm.weight", attn + (f"{n}_norm",)) for n in ("q", "k")]
    for name, part in (("gate", 0), ("up", 1)):
        entries.append(Entry(f"{layer}mlp.{name}_proj.weight", mlp + ("w_in",), (all_, part), 1, True))
        if cfg.mlp_bias:
            entries.append(Entry(f"{layer}mlp.{name}_proj.bias", mlp + ("b_in",), (part,)))
    entries.append(Entry(layer + "mlp.down_proj.weight", mlp + ("w_out",), (), 1, True))
    if cfg.mlp_bias:
        entries.append(Entry(layer + "mlp.down_proj.bias", mlp + ("b_out",)))
    return entries


def entries(cfg: ModelConfig) -> list[Entry]:
    """Every checkpoint tensor of the config's transformers counterpart."""
    found = _gpt2_entries(cfg) if cfg.pos == "learned" else _llama_entries(cfg)
    if not cfg.tie_embeddings:
        found.append(Entry("lm_head.weight", ("unembed",), (slice(None), slice(0, cfg.vocab_size)), 1, True))
    return found


def _layers(entry: Entry, cfg: ModelConfig):
    """(checkpoint name, index into the parameter) for each layer the entry covers."""
    if "{i}" not in entry.hf:
        return [(entry.hf, entry.index)]
    return [(entry.hf.format(i=i), (i, *entry.index)) for i in range(cfg.n_layers)]


def params_from_tensors(tensors: dict, cfg: ModelConfig, where: str) -> dict:
    """The parameter tree from checkpoint tensors (any float dtype, read as float32); padded
    vocabulary rows are zero. Missing, misshapen or unexpected tensors fail in one line."""
    params = jax.tree.map(lambda spec: np.zeros(spec.shape, np.float32), model.param_specs(cfg), is_leaf=model.is_spec)
    used = set()
    for entry in entries(cfg):
        leaf = functools.reduce(dict.get, entry.path, params)
        for name, index in _layers(entry, cfg):
            if name not in tensors:
                raise HFError(f"{where}: tensor {name!r} is missing")
            piece_shape = leaf[index].shape
            if tuple(tensors[name].shape) != entry.hf_shape(piece_shape):
                raise HFError(f"{where}: tensor {name!r} has shape {list(tensors[name].shape)}; the config "
                              f"gives {list(entry.hf_shape(piece_shape))}")
            leaf[index] = entry.from_hf(np.asarray(tensors[name], np.float32), piece_shape)
            used.add(name)
    extra = sorted(set(tensors) - used)
    if extra:
        raise HFError(f"{where}: tensor {extra[0]!r} is not part of this config ({len(extra)} unexpected)")
    return params


def tensors_from_params(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The checkpoint tensors of a parameter tree (padded vocabulary rows dropped), float32."""
    out = {}
    for entry in entries(cfg):
        leaf = np.asarray(functools.reduce(dict.get, entry.path, params), np.float32)
        for name, index in _layers(entry, cfg):
            out[name] = np.ascontiguousarray(entry.to_hf(leaf[index]))
    return out


# --- Import and export ---------------------------------------------------------------------------


def _import_tokenizer(source: Path, out: Path, cfg: ModelConfig) -> str:
    """Store the source's tokenizer in the run if it converts, else a note of why; says which."""
    directory = out / "tokenizer"
    try:
        enc = read_tokenizer(source)
        if enc.n_vocab > cfg.vocab_size:
            raise HFError(f"tokenizer has {enc.n_vocab} ids, more than vocab_size={cfg.vocab_size}")
        store_tokenizer(enc, directory)
        return f"tokenizer: {enc.n_vocab} ids as tiktoken ranks in {directory}"
    except HFError as e:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / tokenizer.NO_TOKENIZER_NOTE).write_text(f"hf.py import: {e}\n")
        return f"no tokenizer: {e}; sample.py needs --tokenizer, evaluate.py token ids"


def import_run(source: Path, out: Path, vocab_multiple: int = 1) -> Config:
    """A run directory at `out` from the transformers directory `source`: config.json, an Orbax
    checkpoint at step 0 and the tokenizer where it converts. The optimizer state is a
    placeholder: sample.py, evaluate.py and --init-from restore the parameters alone."""
    config_path = source / "config.json"
    if not config_path.is_file():
        raise HFError(f"{config_path}: no such file (import needs a transformers model directory)")
    if out.exists() and any(out.iterdir()):
        raise HFError(f"--out {out} exists and is not empty; choose a new run directory")
    if vocab_multiple < 1:
        raise HFError(f"--vocab-multiple {vocab_multiple} must be >= 1")
    try:
        hf = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise HFError(f"{config_path}: not valid JSON ({e})") from None
    mcfg = model_config(hf, str(config_path), vocab_multiple)
    params = params_from_tensors(read_checkpoint(source, hf["model_type"]), mcfg, str(source))
    cfg = Config(name=out.name, model=mcfg, data=DataConfig(path=str(out / "tokenizer")),
                 train=TrainConfig(run_dir=str(out)))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
    state = {"params": jax.tree.map(jnp.asarray, params), "opt_state": {"placeholder": jnp.zeros((), jnp.int32)},
             "step": jnp.zeros((), jnp.int32)}
    with checkpoint.checkpoint_manager(out / "checkpoints", cfg.train.keep_checkpoints) as manager:
        checkpoint.save(manager, state, cfg)
        manager.wait_until_finished()
    print(f"imported {source} ({ARCHITECTURES[hf['model_type']]}, {model.count_params(mcfg):,} parameters) to {out}")
    print(_import_tokenizer(source, out, mcfg))
    return cfg


def write_hf_dir(params, cfg: Config, out: Path) -> None:
    """config.json, model.safetensors and, for a GPT-2-shaped tokenizer, vocab.json + merges.txt."""
    enc, reason = tokenizer.for_model_or_reason(cfg)
    hf = hf_config(cfg.model, enc.eot_token if enc else None)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "model.safetensors", tensors_from_params(params, cfg.model))
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    print(f"wrote {hf['architectures'][0]} to {out}")
    try:
        if enc is None:
            raise HFError(reason)
        write_hf_tokenizer(enc, out)
        print(f"tokenizer: vocab.json and merges.txt ({enc.n_vocab} ids)")
    except HFError as e:
        print(f"no tokenizer written: {e}")


def export_run(run: str, step: int | None, out: Path) -> None:
    """A run's checkpoint (`step`, else the newest that reads back whole) as a transformers directory."""
    cfg, directory, _ = runs.find_checkpoint(run, step)
    hf_config(cfg.model, None)      # a config with no counterpart fails before anything is read
    step, params = runs.load_params(cfg, directory, step)
    print(f"exporting {run} step {step}:")
    write_hf_dir(params, cfg, out)


def main(argv=None) -> None:
    parser = cli.Parser(description="Hugging Face checkpoints in and out of runs.")
    commands = parser.add_subparsers(dest="command", required=True)
    do_import = commands.add_parser("import", help="a transformers directory -> a run directory")
    do_import.add_argument("source", help="a local transformers model directory (config.json, *.safetensors)")
    do_import.add_argument("--out", required=True, help="the new run directory, e.g. runs/gpt2")
    do_import.add_argument("--vocab-multiple", type=int, default=1,
                           help="pad the vocabulary rows to a multiple of this (e.g. 64, as configs/gpt2_124m.py)")
    do_export = commands.add_parser("export", help="a run's checkpoint -> a transformers directory")
    do_export.add_argument("run", help="a run directory, e.g. runs/quickstart")
    do_export.add_argument("--step", type=int, help="the checkpoint step (default: the newest intact one)")
    do_export.add_argument("--out", required=True, help="the transformers directory to write")
    args = parser.parse_args(argv)
    try:
        if args.command == "import":
            import_run(Path(args.source), Path(args.out), args.vocab_multiple)
        else:
            export_run(args.run, args.step, Path(args.out))
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
