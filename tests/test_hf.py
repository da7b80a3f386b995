"""hf.py against transformers, offline: tiny random models of each family built with from_config
(norm gains and biases perturbed, so a mapping error shows in the logits), saved with
save_pretrained, imported, and compared in float32; exports loaded back by from_pretrained with
no missing or unexpected keys; byte-level BPE tokenizers against transformers' own; and one test
per bad input, each a single line naming the culprit."""
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import ByteLevelBPETokenizer, Regex, Tokenizer, pre_tokenizers
from transformers import (AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2Tokenizer, LlamaConfig,
                          MistralConfig, Qwen3Config)

import hf
import hf_files
import model
import runs
import sample
import tokenizer
from conftest import records, run_train
from numerics import assert_close

V = 101     # odd, so vocab_multiple=16 pads it
SIZES = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)
TOKENS = np.random.default_rng(0).integers(0, V, (2, 19))
CASES = {
    "gpt2-tied": (GPT2Config, dict(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4), 1),
    "gpt2-untied-padded": (GPT2Config, dict(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                            n_inner=40, tie_word_embeddings=False), 16),
    "llama-biases-padded": (LlamaConfig, dict(SIZES, num_key_value_heads=2, rope_theta=500.0, rms_norm_eps=1e-5,
                                              attention_bias=True, mlp_bias=True, tie_word_embeddings=True), 16),
    "mistral-mqa": (MistralConfig, dict(SIZES, num_key_value_heads=1, sliding_window=None), 1),
    "qwen3-tied": (Qwen3Config, dict(SIZES, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True), 1),
    "qwen3-untied-biases-padded": (Qwen3Config, dict(SIZES, num_key_value_heads=2, head_dim=8, attention_bias=True,
                                                     rope_theta=2e4, tie_word_embeddings=False), 16),
}


def hf_model(config_class, fields, seed=0):
    """A random transformers model whose norm gains and biases are far from 1 and 0."""
    torch.manual_seed(seed)
    net = AutoModelForCausalLM.from_config(config_class(**fields), attn_implementation="eager").eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("bias") or "norm" in name or ".ln_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (0.0 if name.endswith("bias") else 1.0))
    return net


def hf_logits(net, tokens=TOKENS):
    with torch.no_grad():
        return net(torch.tensor(tokens)).logits.numpy()


def run_params(run):
    cfg, directory, step = runs.find_checkpoint(str(run), None)
    return cfg, runs.restore_params(cfg, directory, step)


def leaves(params):
    import jax
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


@pytest.mark.parametrize("case", CASES)
def test_import_export_round_trip(case, tmp_path):
    """Imported logits match transformers'; the export loads with no missing or unexpected keys and
    the same logits; importing the export again gives the same config and bitwise the same
    parameters (padded rows are zero in both)."""
    config_class, fields, multiple = CASES[case]
    net = hf_model(config_class, fields)
    net.save_pretrained(tmp_path / "hf")
    hf.import_run(tmp_path / "hf", tmp_path / "run", vocab_multiple=multiple)
    cfg, params = run_params(tmp_path / "run")
    assert cfg.model.padded_vocab % multiple == 0 and cfg.model.vocab_size == V
    assert not np.asarray(params["embed"])[V:].any()
    logits, _ = model.forward(params, TOKENS, cfg.model)
    assert_close(logits, hf_logits(net), 1e-5, what=f"{case} imported logits")

    hf.write_hf_dir(params, cfg, tmp_path / "out")
    back, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True,
                                                      attn_implementation="eager")
    assert not any(info.values()), info
    assert_close(hf_logits(back.eval()), hf_logits(net), 1e-5, what=f"{case} exported logits")

    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    again_cfg = hf.model_config(exported, "exported", multiple)
    assert again_cfg == cfg.model
    again = hf.params_from_tensors(hf_files.read_checkpoint(tmp_path / "out", exported["model_type"]), again_cfg, "")
    first, second = leaves(params), leaves(again)
    assert first.keys() == second.keys()
    for name in first:
        assert np.array_equal(first[name], second[name]), name


def test_export_of_a_trained_run(tiny_run, tmp_path):
    """A quickstart-shaped run (RMSNorm, SwiGLU, RoPE, tied, byte tokens padded to 320) exports as
    Llama, with its byte tokenizer as vocab.json + merges.txt."""
    hf.export_run(str(tiny_run), None, tmp_path)
    net, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True, attn_implementation="eager")
    assert not any(info.values()), info
    cfg, params = run_params(tiny_run)
    tokens = TOKENS * 2
    ours, _ = model.forward(params, tokens, cfg.model)
    assert_close(hf_logits(net.eval(), tokens), ours, 1e-5)
    text = "héllo wörld<|endoftext|>"
    assert AutoTokenizer.from_pretrained(tmp_path).encode(text) == \
        tokenizer.get_tokenizer("bytes").encode(text, allowed_special="all")


def test_gpt2_as_the_hub_stores_it(tmp_path):
    """openai-community/gpt2's model.safetensors names tensors without "transformer." and carries
    each layer's causal-mask buffer attn.bias; both import."""
    net = hf_model(GPT2Config, dict(vocab_size=V, n_positions=16, n_embd=16, n_layer=2, n_head=2))
    net.save_pretrained(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    tensors = {name.removeprefix("transformer."): np.array(a) for name, a in hf_files.read_safetensors(weights).items()}
    tensors |= {f"h.{i}.attn.bias": np.tril(np.ones((1, 1, 16, 16), np.float32)) for i in range(2)}
    hf_files.write_safetensors(weights, tensors)
    hf.import_run(tmp_path / "hf", tmp_path / "run")
    cfg, params = run_params(tmp_path / "run")
    assert_close(model.forward(params, TOKENS[:, :16], cfg.model)[0], hf_logits(net, TOKENS[:, :16]), 1e-5)


# --- Tokenizers ----------------------------------------------------------------------------------

TEXTS = ["Hello world, it's 2024! Ünïcödé text, with   spaces\tand\nnewlines. don't we'll 12345 numbers.",
         "the quick brown fox jumps over the lazy dog " * 5]
SAMPLE = "Hello there, it's 1999 — Ünïcödé  wörld!\n\n  don't   stop <|endoftext|> the end"


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A GPT-2 directory with a tiny byte-level BPE (vocab.json + merges.txt, <|endoftext|> last)."""
    directory = tmp_path_factory.mktemp("gpt2")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXTS * 3, vocab_size=340, min_frequency=1, show_progress=False)
    bpe.save_model(str(directory))
    vocab = json.loads((directory / "vocab.json").read_text())
    vocab[tokenizer.EOT_TEXT] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    hf_model(GPT2Config, dict(vocab_size=len(vocab), n_positions=64, n_embd=32, n_layer=1, n_head=2,
                              bos_token_id=len(vocab) - 1, eos_token_id=len(vocab) - 1)).save_pretrained(directory)
    return directory


def test_gpt2_tokenizer_is_imported_and_exported(gpt2_dir, tmp_path, capsys):
    reference = GPT2Tokenizer.from_pretrained(gpt2_dir)
    hf.import_run(gpt2_dir, tmp_path / "run")
    capsys.readouterr()
    enc = tokenizer.load_tokenizer(tmp_path / "run" / "tokenizer")   # how sample.py finds a run's tokenizer
    assert enc.encode(SAMPLE, allowed_special="all") == reference.encode(SAMPLE)
    assert enc.eot_token == reference.eos_token_id
    sample.main(["--run", str(tmp_path / "run"), "--prompt", "the quick", "--max-new-tokens", "4",
                 "--temperature", "0"])
    assert capsys.readouterr().out.startswith("the quick")
    hf.export_run(str(tmp_path / "run"), None, tmp_path / "out")
    assert GPT2Tokenizer.from_pretrained(tmp_path / "out").encode(SAMPLE) == reference.encode(SAMPLE)


def test_tokenizer_json_conversions(gpt2_dir, tmp_path):
    """A ByteLevel tokenizer.json converts exactly; a Split(regex) + ByteLevel one (Llama 3, Qwen)
    converts exactly too, but a run's tokenizer record cannot hold its regex, so it is refused."""
    GPT2Tokenizer.from_pretrained(gpt2_dir).save_pretrained(tmp_path / "fast")
    path = tmp_path / "fast" / "tokenizer.json"
    reference = Tokenizer.from_file(str(path))
    assert hf_files.tokenizer_json_encoding(path).encode(SAMPLE, allowed_special="all") == reference.encode(SAMPLE).ids
    split = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    reference.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    reference.save(str(tmp_path / "llama3.json"))
    enc = hf_files.tokenizer_json_encoding(tmp_path / "llama3.json")
    assert enc.encode(SAMPLE, allowed_special="all") == reference.encode(SAMPLE).ids
    with pytest.raises(hf_files.HFError, match="another regex than GPT-2's") as err:
        hf_files.store_tokenizer(enc, tmp_path / "stored")
    assert "\n" not in str(err.value)
    # SmolLM's digits-apart pre-tokenizer has no single-regex form: refused, saying why.
    reference.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
    reference.save(str(tmp_path / "smollm.json"))
    with pytest.raises(hf_files.HFError, match="pre_tokenizer Digits [+] ByteLevel has no tiktoken equivalent"):
        hf_files.tokenizer_json_encoding(tmp_path / "smollm.json")


def test_init_from_an_imported_model(corpus, tmp_path):
    """train.py --init-from takes an imported GPT-2's parameters (a config of the same shapes)."""
    hf_model(GPT2Config, dict(vocab_size=257, n_positions=32, n_embd=32, n_layer=2, n_head=2)).save_pretrained(tmp_path / "hf")
    hf.main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "gpt2"), "--vocab-multiple", "64"])
    shapes = ["model.norm=layernorm", "model.norm_bias=true", "model.pos=learned", "model.attn_bias=true",
              "model.mlp=gelu_tanh", "model.mlp_bias=true", "train.steps=1"]
    proc = run_train(corpus, tmp_path / "tuned", *shapes, extra=["--init-from", str(tmp_path / "gpt2")])
    assert "initialized parameters from" in proc.stdout
    assert records(tmp_path / "tuned")[-1]["step"] == 1


# --- Bad inputs ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    hf_model(LlamaConfig, dict(SIZES, num_key_value_heads=2)).save_pretrained(directory)
    return directory


def import_error(source, tmp_path) -> str:
    with pytest.raises(SystemExit) as err:
        hf.main(["import", str(source), "--out", str(tmp_path / "run")])
    message = str(err.value)
    assert message.startswith("error: ") and "\n" not in message, message
    assert not (tmp_path / "run").exists()
    return message


def edited(llama_dir, tmp_path, **changes) -> Path:
    """A copy of the Llama directory with config.json fields changed (None: removed)."""
    copy = tmp_path / "edited"
    shutil.copytree(llama_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config.update(changes)
    (copy / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return copy


@pytest.mark.parametrize("changes, culprit", [
    (dict(model_type="bert"), "model_type 'bert'"),
    (dict(architectures=["LlamaForSequenceClassification"]), "LlamaForSequenceClassification"),
    (dict(model_type="mistral", sliding_window=16, architectures=None), "sliding_window=16"),
    (dict(model_type="qwen3", use_sliding_window=True, sliding_window=8, architectures=None), "sliding_window=8"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}), "rope_type='llama3'"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), "rope_type='yarn'"),
    (dict(rope_parameters=None, rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling.rope_type='linear'"),
    (dict(hidden_act="relu"), "hidden_act"),
    (dict(hidden_size=None), "'hidden_size'"),
    (dict(intermediate_size=40), "'model.layers.0.mlp.gate_proj.weight' has shape [48, 32]"),
    (dict(attention_bias=True), "'model.layers.0.self_attn.q_proj.bias' is missing"),
    (dict(num_hidden_layers=1), "'model.layers.1.input_layernorm.weight' is not part of this config"),
])
def test_bad_config_is_one_line(llama_dir, tmp_path, changes, culprit):
    assert culprit in import_error(edited(llama_dir, tmp_path, **changes), tmp_path)


def test_gpt2_layer_scaled_attention_is_refused(tmp_path):
    hf_model(GPT2Config, dict(vocab_size=V, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                              scale_attn_by_inverse_layer_idx=True)).save_pretrained(tmp_path / "hf")
    assert "scale_attn_by_inverse_layer_idx=True" in import_error(tmp_path / "hf", tmp_path)


def test_missing_files_are_one_line(llama_dir, tmp_path):
    assert "config.json: no such file" in import_error(tmp_path / "nowhere", tmp_path)
    copy = edited(llama_dir, tmp_path)
    (copy / "model.safetensors").unlink()
    assert "no model.safetensors or model.safetensors.index.json" in import_error(copy, tmp_path)


@pytest.mark.parametrize("damage, culprit", [
    (lambda raw: struct.pack("<Q", 10**12) + raw[8:], "corrupt safetensors header: its length"),
    (lambda raw: raw[:8] + b"{not json" + raw[17:], "corrupt safetensors header: not valid JSON"),
    (lambda raw: raw[:4], "too short for a safetensors file"),
    (lambda raw: raw[:len(raw) // 2], "needs"),
])
def test_corrupt_safetensors_is_one_line(llama_dir, tmp_path, damage, culprit):
    copy = edited(llama_dir, tmp_path)
    weights = copy / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    message = import_error(copy, tmp_path)
    assert culprit in message and "model.safetensors" in message


def test_sharded_checkpoints_are_read(llama_dir, tmp_path):
    net = AutoModelForCausalLM.from_pretrained(llama_dir, attn_implementation="eager").eval()
    net.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    hf.import_run(tmp_path / "sharded", tmp_path / "run")
    cfg, params = run_params(tmp_path / "run")
    assert_close(model.forward(params, TOKENS, cfg.model)[0], hf_logits(net), 1e-5)


def test_unexportable_config_is_one_line(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    config = json.loads((run / "config.json").read_text())
    config["model"]["logit_softcap"] = 15.0
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as err:
        hf.main(["export", str(run), "--out", str(tmp_path / "out")])
    assert str(err.value) == ("error: model.logit_softcap=15.0 has no counterpart in LlamaForCausalLM "
                              "(it needs None)")
