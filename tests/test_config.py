"""Presets, overrides and the one-line validation errors of configs/base.py."""
import dataclasses
import json

import pytest

import model
from configs.base import (Config, ConfigError, ModelConfig, apply_overrides, config_from_dict,
                          config_to_dict, load_config)

PRESET_PARAMS = {
    "gpt2_124m": 124_475_904,     # vocabulary padded to 50304
    "design_40m": 35_763_840,
    "modern_160m": 181_075_968,
    "micro_26m": 25_829_888,
    "quickstart": 3_295_488,
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
    assert (micro.ff_size, micro.kv_heads, micro.head_size) == (1408, 2, 64)
    modern = load_config("configs/modern_160m.py").model
    assert (modern.ff_size, modern.head_size, modern.padded_vocab) == (3072, 96, 50304)
    assert model.param_specs(modern)["blocks"].get("attn_norm") is None  # parameter-free norms


def test_overrides_parse_to_field_types():
    cfg = load_config("configs/quickstart.py", [
        "model.n_layers=2", "model.norm_eps=1e-6", "model.qk_norm=true", "model.n_kv_heads=2",
        "model.logit_softcap=30", "model.head_dim=none", "optim.lr=3e-4", "train.steps=1_000",
        "data.path=/tmp/x"])
    m = cfg.model
    assert (m.n_layers, m.norm_eps, m.qk_norm, m.n_kv_heads, m.head_dim) == (2, 1e-6, True, 2, None)
    assert isinstance(m.logit_softcap, float) and m.logit_softcap == 30.0
    assert (cfg.optim.lr, cfg.train.steps, cfg.data.path) == (3e-4, 1000, "/tmp/x")


def test_dict_round_trip_through_json():
    cfg = load_config("configs/modern_160m.py", ["train.steps=7"])
    assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg


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
    (["model.norm_bias=true"], "model.norm_bias=True needs model.norm='layernorm'"),
    (["model.yarn_factor=4", "model.pos=learned"], "model.yarn_factor=4.0 needs model.pos='rope'"),
    (["model.head_dim=7"], "model.head_dim=7 must be even for RoPE"),
    (["mesh.data=-1", "mesh.fsdp=-1"], "mesh: at most one of data, fsdp, tensor may be -1"),
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
    assert ModelConfig(d_model=512, n_heads=8, mlp="gelu").ff_size == 2048
    assert ModelConfig(d_model=512, n_heads=8, mlp="swiglu").ff_size == 1408
    assert ModelConfig(d_model=512, n_heads=8, mlp="swiglu", d_ff_rule="4x").ff_size == 2048
    assert ModelConfig(d_model=320, n_heads=5, d_ff=854).ff_size == 854
    assert ModelConfig(vocab_size=257, vocab_multiple=64).padded_vocab == 320
    assert ModelConfig(d_model=64, n_heads=4, head_dim=32).head_size == 32
    assert ModelConfig(seq_len=128, yarn_factor=4.0).max_len == 512
