"""sample.py: the top-k / top-p filters over many draws, generation through the KV cache (greedy
against a full recomputation, YaRN past the trained context, left-padded batches, seeds, one
loop that streams), every one-line error, and the command line end to end on a checkpoint written
by a tiny train.py run (conftest's `tiny_run`)."""
import base64
import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import checkpoint
import model
import runs
import sample
import sampling
import tokenizer
from configs.base import ModelConfig
from conftest import REPO
from sampling import Sampling

GREEDY = Sampling(temperature=0.0)
# GQA, and a vocabulary padded 61 -> 64. A wide embedding spreads the logits, so argmax is never a
# near-tie that float rounding between the cached and the full pass could flip.
CFG = ModelConfig(vocab_size=61, vocab_multiple=64, seq_len=24, n_layers=2, d_model=32, n_heads=4,
                  n_kv_heads=2, embed_std=1.0)
VARIANTS = {
    "gqa-rope": CFG,
    "mha-learned": dataclasses.replace(CFG, n_kv_heads=None, pos="learned"),
    "yarn-past-seq-len": dataclasses.replace(CFG, seq_len=12, yarn_factor=2.0),   # max_len 24
}


@pytest.fixture(scope="module")
def params():
    return model.init_params(CFG, jax.random.key(0))


# --- Sampling filters ----------------------------------------------------------------------------


def allowed_tokens(logits, top_k, top_p) -> set:
    """The reference: the top_k likeliest, then the shortest prefix of them (by probability,
    renormalized) whose mass reaches top_p."""
    order = np.argsort(-logits)[:top_k]
    probs = np.exp(logits[order] - logits[order].max())
    probs /= probs.sum()
    n = np.searchsorted(np.cumsum(probs), top_p) + 1
    return set(order[:n].tolist())


@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (None, 0.6), (12, 0.5), (1, 1.0), (None, 1e-6)])
def test_top_k_and_top_p_never_emit_an_excluded_token(top_k, top_p):
    logits_BV = 2.0 * jax.random.normal(jax.random.key(1), (64, 61))
    kept = np.isfinite(np.asarray(sampling.filter_logits(logits_BV, top_k, top_p)))
    for row, logits in zip(kept, np.asarray(logits_BV, np.float64)):
        assert set(np.flatnonzero(row).tolist()) == allowed_tokens(logits, top_k, top_p)
    # 4000 draws from one row: every token drawn is allowed, and every allowed token is drawn.
    many_BV = jnp.broadcast_to(logits_BV[0], (4000, 61))
    draws = jax.jit(sampling.sample_next, static_argnums=2)(jax.random.key(2), many_BV, Sampling(1.0, top_k, top_p))
    assert set(np.unique(draws).tolist()) == allowed_tokens(np.asarray(logits_BV[0], np.float64), top_k, top_p)


def test_sampling_values_are_checked():
    for kwargs, msg in [(dict(temperature=-0.1), "--temperature -0.1 must be >= 0"),
                        (dict(top_k=0), "--top-k 0 must be >= 1"),
                        (dict(top_p=0.0), r"--top-p 0.0 must be in \(0, 1\]"),
                        (dict(top_p=1.5), r"--top-p 1.5 must be in \(0, 1\]")]:
        with pytest.raises(sampling.SampleError, match=msg):
            Sampling(**kwargs)


# --- Generation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VARIANTS)
def test_greedy_sample_is_the_argmax_of_a_full_recomputation(name):
    cfg = VARIANTS[name]
    params = model.init_params(cfg, jax.random.key(0))
    prompt = [3, 14, 15, 9, 2, 6, 5, 35, 8, 9]
    out = sample.generate(params, cfg, [prompt], 14, GREEDY)[0]
    if cfg.yarn_factor > 1:
        assert len(prompt) + len(out) > cfg.seq_len      # decoded past the trained context
    logits = model.forward(params, jnp.array([prompt + out[:-1]]), cfg)[0][0]
    assert out == np.argmax(logits[len(prompt) - 1:], axis=-1).tolist()


def test_a_batch_of_different_length_prompts_gives_each_row_its_prompt_alone(params):
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [40]]
    batch = sample.generate(params, CFG, prompts, 10, GREEDY)
    assert batch == [sample.generate(params, CFG, [p], 10, GREEDY)[0] for p in prompts]
    # An end-of-text cuts each row at its own first one; the others go on.
    eot = batch[0][3]
    cut = [row[:row.index(eot)] if eot in row else row for row in batch]
    assert sample.generate(params, CFG, prompts, 10, GREEDY, eot=eot) == cut


def test_a_fixed_seed_reproduces_the_output_and_filters_hold_in_the_loop(params):
    prompt = [[7, 7, 1]]
    hot = Sampling(temperature=3.0)
    first = sample.generate(params, CFG, prompt, 16, hot, seed=0)
    assert first == sample.generate(params, CFG, prompt, 16, hot, seed=0)
    assert first != sample.generate(params, CFG, prompt, 16, hot, seed=1)
    assert max(first[0]) < CFG.vocab_size            # the padded ids 61..63 are never drawn
    greedy = sample.generate(params, CFG, prompt, 16, GREEDY)
    assert sample.generate(params, CFG, prompt, 16, Sampling(3.0, top_k=1), seed=5) == greedy


def test_decoding_is_one_loop_that_streams_each_token(params, monkeypatch):
    traces = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: traces.append(1) or forward(*a, **k))
    streamed = []
    out = sample.generate(params, CFG, [[1, 2, 3, 4, 5, 6, 7]], 15, Sampling(1.0), seed=3,
                          on_token=lambda token_B: streamed.append(int(token_B[0])))
    assert streamed == out[0] and len(out[0]) == 15
    assert len(traces) == 2          # the prefill and the loop body, whatever the number of tokens


def test_streamer_decodes_utf8_across_tokens_and_stops_at_eot(capsys):
    enc = tokenizer.get_tokenizer("bytes")
    streamer = sample.Streamer(enc, stop_at=enc.eot_token)
    printed = []
    for token in [*"né".encode(), enc.eot_token, *b"after"]:
        streamer(np.array([token]))
        printed.append(capsys.readouterr().out)
    streamer.close()
    assert printed == ["n", "", "é", "", "", "", "", "", ""]     # 'é' is two byte tokens
    assert capsys.readouterr().out == "\n"


def test_an_id_the_tokenizer_lacks_prints_as_its_number(capsys):
    """A model vocabulary wider than its tokenizer: an untrained model draws the extra ids freely.
    Streamed or not, they print as <|id:N|> and the sample goes on."""
    args = ["--config", "configs/quickstart.py", "--random-init", "model.vocab_size=4000", "model.n_layers=1",
            "model.d_model=32", "model.n_heads=2", "model.seq_len=32", "--tokenizer", "bytes", "--prompt", "a",
            "--max-new-tokens", "20", "--temperature", "3"]
    sample.main(args)
    streamed = capsys.readouterr().out
    assert streamed.startswith("a") and "<|id:" in streamed
    sample.main(args + ["--num-samples", "2"])
    assert capsys.readouterr().out.split("---\n")[0] == streamed
    assert sample.token_bytes(tokenizer.get_tokenizer("bytes"), 3999) == b"<|id:3999|>"


# --- Errors --------------------------------------------------------------------------------------

RANDOM = ["--config", "configs/quickstart.py", "--random-init", "model.n_layers=1", "model.d_model=32",
          "model.n_heads=2", "model.seq_len=32", "--tokenizer", "bytes"]


@pytest.fixture
def no_loading(monkeypatch):
    """Errors must come before any parameters are restored, initialized or compiled."""
    def refuse(*args, **kwargs):
        raise AssertionError("parameters loaded before the inputs were checked")
    monkeypatch.setattr(model, "init_params", refuse)
    monkeypatch.setattr(runs, "restore_params", refuse)
    monkeypatch.setattr(checkpoint, "restore", refuse)


def fails(argv, match):
    with pytest.raises(SystemExit, match=match) as err:
        sample.main(argv)
    assert str(err.value).startswith("error: ") and "\n" not in str(err.value)


@pytest.mark.parametrize("extra, match", [
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt", "x" * 31], r"prompt \(32 tokens .*\+ 1 new tokens = 33 > the context of 32 tokens \(model.seq_len\)"),
    (["--prompt", "abc", "--max-new-tokens", "29"], "= 33 > the context of 32"),
    (["model.seq_len=16", "model.yarn_factor=2", "--prompt", "x" * 20, "--max-new-tokens", "12"],
     r"= 33 > the context of 32 tokens \(YaRN: 2 x 16\)"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0 must be >= 1"),
    (["--temperature", "-1"], "--temperature -1.0 must be >= 0"),
    (["--top-p", "0"], r"--top-p 0.0 must be in \(0, 1\]"),
    (["--top-p", "1.2"], r"--top-p 1.2 must be in \(0, 1\]"),
    (["--top-k", "0"], "--top-k 0 must be >= 1"),
    (["--top-k", "x"], "argument --top-k: invalid int value: 'x'"),
    (["--num-samples", "0"], "--num-samples 0 must be >= 1"),
    (["--step", "3"], "--step needs --run"),
    (["--quantize", "int4"], "--quantize int4: unknown scheme; valid: int8"),
    (["--prompt-file", "/nonexistent/prompt.txt"], "--prompt-file /nonexistent/prompt.txt: no such file"),
])
def test_bad_inputs_fail_in_one_line_before_loading(no_loading, extra, match):
    fails(RANDOM + extra, match)


def test_a_missing_bad_or_too_wide_tokenizer_fails_in_one_line(tmp_path, no_loading):
    no_flag = RANDOM[:-2] + ["model.vocab_size=300", f"data.path={tmp_path}"]   # RANDOM ends --tokenizer bytes
    fails(no_flag, r"tokenizer.json is missing; pass --tokenizer bytes\|gpt2\|PATH.tiktoken")
    fails(RANDOM + ["model.vocab_size=100"], "'bytes' has 257 ids but model.vocab_size is 100; pass --tokenizer")
    (tmp_path / "tokenizer.json").write_text("{not json")
    fails(no_flag, r"tokenizer.json is not a readable tokenizer record")


def test_an_empty_prompt_file_and_a_missing_run_or_step_fail_in_one_line(tmp_path, tiny_run, no_loading):
    (tmp_path / "empty.txt").write_text("")
    fails(RANDOM + ["--prompt-file", str(tmp_path / "empty.txt")], "empty.txt is empty")
    fails(["--run", str(tmp_path / "nope")], "no train.py run there")
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "config.json").write_text((tiny_run / "config.json").read_text())
    fails(["--run", str(tmp_path / "fresh")], "no checkpoints yet")
    fails(["--run", str(tiny_run), "--step", "2"], "--step 2: .* has checkpoints at steps 4, 8$")


# --- End to end ----------------------------------------------------------------------------------


def test_sample_py_streams_from_a_trained_checkpoint_end_to_end(tiny_run, capsys):
    args = ["--run", str(tiny_run), "--prompt", "the model", "--max-new-tokens", "12", "--temperature", "0"]
    proc = subprocess.run([sys.executable, "sample.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr
    streamed = proc.stdout
    assert streamed.startswith("the model") and streamed.endswith("\n")
    # Two samples at once are not streamed; greedy, each is the streamed one.
    sample.main(args + ["--num-samples", "2", "--step", "8"])
    assert capsys.readouterr().out == streamed + "---\n" + streamed


# --- Speculative decoding from the command line (the algorithm: tests/test_speculative.py) ------

TINY_PRESET = """from configs.base import Config, DataConfig, ModelConfig
config = Config(model=ModelConfig(vocab_size={vocab}, seq_len=32, n_layers=1, d_model=16, n_heads=2),
                data=DataConfig(path="data/stdlib"))
"""


def draft_preset(tmp_path, vocab=257):
    path = tmp_path / f"draft{vocab}.py"
    path.write_text(TINY_PRESET.format(vocab=vocab))
    return str(path)


def test_a_draft_leaves_greedy_output_unchanged(tmp_path, capsys):
    args = RANDOM + ["--prompt", "ab", "--max-new-tokens", "12", "--temperature", "0"]
    sample.main(args)
    plain = capsys.readouterr().out
    sample.main(args + ["--draft-config", draft_preset(tmp_path), "--lookahead", "3"])
    captured = capsys.readouterr()
    assert captured.out == plain and "draft tokens accepted" in captured.err


@pytest.mark.parametrize("extra, match", [
    (["--lookahead", "2"], "--lookahead needs a draft"),
    (["--draft-config", "DRAFT", "--lookahead", "0"], "--lookahead 0 must be >= 1"),
    (["--draft-config", "DRAFT4000"], "draft vocabulary mismatch: the draft's model.vocab_size is 4000 but the target's is 257"),
    (["--draft-config", "DRAFT", "--prompt", "x" * 20, "--max-new-tokens", "8"],
     r"draft context mismatch: prompt \(21 tokens\) \+ 8 new tokens \+ --lookahead 4 = 33 > the draft's context of 32"),
])
def test_bad_draft_inputs_fail_in_one_line_before_loading(tmp_path, no_loading, extra, match):
    extra = [{"DRAFT": draft_preset(tmp_path), "DRAFT4000": draft_preset(tmp_path, 4000)}.get(x, x) for x in extra]
    fails(RANDOM + extra, match)


def test_a_draft_with_another_tokenizer_fails_in_one_line(tmp_path, corpus, no_loading):
    """Target and draft each decode with their data's tokenizer: bytes, and a 200-rank file."""
    other = tmp_path / "other"
    other.mkdir()
    ranks = "".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(200))
    (other / "tiny.tiktoken").write_text(ranks)
    tokenizer.write_meta(other, "tiny.tiktoken", 200, 201)
    draft = tmp_path / "draft.py"
    draft.write_text(TINY_PRESET.format(vocab=257).replace('"data/stdlib"', repr(str(other))))
    target = RANDOM[:RANDOM.index("--tokenizer")] + [f"data.path={corpus}"]
    fails(target + ["--draft-config", str(draft)],
          r"draft tokenizer mismatch: the draft decodes with 'tiny' \(201 ids\) but the target with 'bytes'")


def test_int8_weights_decode_and_report_the_memory_saved(capsys):
    """The logit error bound is tests/test_quantize.py's; here the command line end to end."""
    sample.main(RANDOM + ["--prompt", "ab", "--max-new-tokens", "6", "--quantize", "int8"])
    captured = capsys.readouterr()
    assert captured.out.startswith("ab") and "quantized: parameters" in captured.err
