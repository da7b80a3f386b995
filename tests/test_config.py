"""Presets, overrides and the one-line validation errors of configs/base.py."""
import dataclasses
import json

import pytest

import model
from configs.base import Config, ConfigError, ModelConfig
from configs.load import apply_overrides, config_from_dict, config_to_dict, load_config

PRESET_PARAMS = {
    "gpt2_124m": 124_475_904,     # vocabulary padded to 50304
    "design_40m": 35_763_840,
    "modern_160m": 181_075_968,
    "micro_26m": 25_829_888,
    "quickstart": 3_295_488,
    "dense_tiny": 3_295_488,      # moe_tiny's dense twin: its active parameters less the routers
    "moe_tiny": 9_791_744,        # 8 experts of 352, top-2: 3,303,680 active per token
}


@pytest.mark.parametrize("name", sorted(PRESET_PARAMS))
def test_preset_parameter_count(name):
    cfg = load_config(f"configs/{name}.py")
    assert cfg.name == name
    assert model.count_params(cfg.model) == PRESET_PARAMS[name]


def test_gpt2_unpadded_is_exactly_gpt2_small():
    cfg = load_config("configs/gpt2_124m.py", ["model.vocab_multiple=1"])
    assert model.count_params(cfg.model) == 124_439_808


def test_preset_shapes_follow_their_recipes():
    micro = load_config("configs/micro_26m.py").model
    assert (micro.d_ff, micro.n_kv_heads, micro.head_dim) == (1408, 2, 64)
    modern = load_config("configs/modern_160m.py").model
    assert (modern.d_ff, modern.head_dim, modern.padded_vocab) == (3072, 96, 50304)
    assert model.param_specs(modern)["blocks"].get("attn_norm") is None  # parameter-free norms


def test_overrides_parse_to_field_types():
    cfg = load_config("configs/quickstart.py", [
        "model.n_layers=2", "model.norm_eps=1e-6", "model.qk_norm=true", "model.n_kv_heads=2",
        "model.logit_softcap=30", "model.head_dim=none", "optim.lr=3e-4", "train.steps=1_000",
        "data.path=/tmp/x"])
    m = cfg.model
    assert (m.n_layers, m.norm_eps, m.qk_norm, m.n_kv_heads, m.head_dim) == (2, 1e-6, True, 2, 64)
    assert isinstance(m.logit_softcap, float) and m.logit_softcap == 30.0
    assert (cfg.optim.lr, cfg.train.steps, cfg.data.path) == (3e-4, 1000, "/tmp/x")


def test_dict_round_trip_through_json():
    cfg = load_config("configs/modern_160m.py", ["train.steps=7"])
    assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg


@pytest.mark.parametrize("saved, remat", [(False, "none"), (True, "full")])
def test_a_run_saved_when_remat_was_a_boolean_keeps_its_meaning(saved, remat):
    d = config_to_dict(load_config("configs/quickstart.py"))
    d["model"]["remat"] = saved
    assert config_from_dict(json.loads(json.dumps(d))).model.remat == remat


@pytest.mark.parametrize("overrides, message", [
    (["model.n_heads=8", "model.n_kv_heads=3"], "model.n_heads=8 is not divisible by model.n_kv_heads=3; valid n_kv_heads: [1, 2, 4, 8]"),
    (["model.n_heads=3"], "model.d_model=256 is not divisible by model.n_heads=3"),
    (["model.n_layer=4"], "unknown key 'model.n_layer'; did you mean 'n_layers'?"),
    (["modle.n_layers=4"], "unknown config section 'modle'; did you mean 'model'?"),
    (["model.n_layers=four"], "override model.n_layers='four': expected int"),
    (["model.n_layers=2.5"], "override model.n_layers='2.5': expected int"),
    (["model.qk_norm=maybe"], "override model.qk_norm='maybe': expected bool"),
    (["model.compute_dtype=float33"], "model.compute_dtype='float33' is not valid; choose one of 'float32', 'bfloat16'"),
    (["model.param_dtype=int32"], "model.param_dtype='int32' is not valid"),
    (["model.mlp=swish"], "model.mlp='swish' is not valid; choose one of 'swiglu'"),
    (["model.n_layers=0"], "model.n_layers=0 must be positive"),
    (["model.loss_chunks=-1"], "model.loss_chunks=-1 must be >= 0 (0: blocks from the batch's shape, 1: one block)"),
    (["model.norm_bias=true"], "model.norm_bias=True needs model.norm='layernorm'"),
    (["model.yarn_factor=4", "model.pos=learned"], "model.yarn_factor=4.0 needs model.pos='rope'"),
    (["model.head_dim=7"], "model.head_dim=7 must be even for RoPE"),
    (["mesh.data=-1", "mesh.fsdp=-1"], "mesh: at most one of data, fsdp, tensor, expert may be -1"),
    (["model.n_experts=4", "model.top_k=5"], "model.top_k=5 exceeds model.n_experts=4; choose top_k <= n_experts"),
    (["model.n_experts=4", "model.moe_every=0"], "model.moe_every=0 must be positive"),
    (["model.n_experts=4", "model.capacity_factor=0"], "model.capacity_factor=0.0 must be positive"),
    (["model.n_experts=4", "model.moe_every=3"], "model.n_layers=4 is not a multiple of model.moe_every=3"),
    (["model.router=hash"], "model.router='hash' is not valid; choose one of 'topk_softmax', 'soft'"),
    (["model.remat=true"], "model.remat='true' is not valid; choose one of 'none', 'dots', 'full'"),
    (["eval.tasks=hellaswag"], "eval.tasks entry 'hellaswag' is not of the form NAME=PATH"),
    (["train.steps"], "override 'train.steps' is not of the form section.field=value"),
])
def test_invalid_overrides_fail_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config("configs/quickstart.py", overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_wrong_type_in_a_preset_names_the_field():
    with pytest.raises(ConfigError, match=r"model.n_layers='4' has type str; expected int"):
        ModelConfig(n_layers="4")
    with pytest.raises(ConfigError, match=r"model.qk_norm=1 has type int; expected bool"):
        ModelConfig(qk_norm=1)


def test_unknown_key_in_a_saved_config_is_suggested():
    d = config_to_dict(Config())
    d["model"]["d_modle"] = d["model"].pop("d_model")
    with pytest.raises(ConfigError, match=r"unknown key 'model.d_modle'; did you mean 'd_model'\?"):
        config_from_dict(d)


def test_missing_config_file_and_missing_config_variable(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.py")
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(ConfigError, match="must define a module-level `config"):
        load_config(tmp_path / "empty.py")


def test_configs_are_frozen_and_revalidated_on_replace():
    cfg = ModelConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.n_layers = 3
    with pytest.raises(ConfigError, match="n_kv_heads"):
        dataclasses.replace(cfg, n_kv_heads=5)
    assert apply_overrides(Config(), []) == Config()


def test_derived_sizes():
    assert ModelConfig(d_model=512, n_heads=8, mlp="gelu").d_ff == 2048
    assert ModelConfig(d_model=512, n_heads=8, mlp="swiglu").d_ff == 1408
    assert ModelConfig(d_model=512, n_heads=8, mlp="silu").d_ff == 2048
    assert ModelConfig(d_model=512, n_heads=8, mlp="swiglu", d_ff_rule="4x").d_ff == 2048
    assert ModelConfig(d_model=320, n_heads=5, d_ff=854).d_ff == 854
    assert ModelConfig(vocab_size=257, vocab_multiple=64).padded_vocab == 320
    assert ModelConfig(d_model=64, n_heads=4, head_dim=32).head_dim == 32
    assert ModelConfig(d_model=64, n_heads=4).n_kv_heads == 4
    assert ModelConfig(seq_len=128, yarn_factor=4.0).max_len == 512


def test_derived_sizes_follow_overrides_and_replace():
    """A derived size is derived again from the new values; a given one is kept."""
    base = ModelConfig(d_model=256, n_heads=4, mlp="gelu")
    assert (base.head_dim, base.n_kv_heads, base.d_ff) == (64, 4, 1024)
    wider = dataclasses.replace(base, d_model=512, n_heads=8)
    assert (wider.head_dim, wider.n_kv_heads, wider.d_ff) == (64, 8, 2048)
    gated = dataclasses.replace(base, mlp="swiglu")
    assert gated.d_ff == 704
    cfg = load_config("configs/quickstart.py", ["model.n_heads=8"])
    assert cfg.model.head_dim == 32 and cfg.model.n_kv_heads == 8
    fixed = dataclasses.replace(ModelConfig(d_model=256, n_heads=4, head_dim=32), n_heads=8)
    assert fixed.head_dim == 32
    # A saved config holds the derived values as plain numbers and loads back equal.
    saved = config_from_dict(json.loads(json.dumps(config_to_dict(cfg))))
    assert saved == cfg and saved.model.head_dim == 32


@pytest.mark.parametrize("override", ["optim.lr=nan", "optim.lr=inf", "model.norm_eps=nan",
                                      "model.rope_theta=-inf", "train.peak_flops=nan",
                                      "optim.lr=1e39"])   # beyond float32: inf in the step
def test_non_finite_floats_are_rejected_naming_the_field(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}=.* must be a finite number"):
        load_config("configs/quickstart.py", [override])


def test_mlp_kinds_name_an_implemented_activation():
    import layers
    from configs.base import MLPS
    assert {activation for activation, _ in MLPS.values()} <= set(layers.ACTIVATIONS)
    assert ModelConfig(mlp="swiglu").activation == "silu" and ModelConfig(mlp="swiglu").gated
    assert not ModelConfig(mlp="silu").gated


def test_mesh_axes_come_from_one_table():
    from configs.base import MeshConfig
    assert MeshConfig.axes() == ("data", "fsdp", "tensor", "expert")
    assert MeshConfig(fsdp=2).sizes() == {"data": -1, "fsdp": 2, "tensor": 1, "expert": 1}
