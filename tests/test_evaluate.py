"""Multiple-choice scoring (tasks.py) and evaluate.py: scores against a float64 computation from
model.forward, answers known by construction, padding and bucketing, one-line errors for bad
jsonl, the val / hellaswag / mc commands on a trained run (also over two devices), and the
eval.tasks of a training run logged beside its validation loss."""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import evaluate
import model
import runs
import sharding
import tasks
import tokenizer
from configs.base import Config, DataConfig, EvalConfig, MeshConfig, ModelConfig
from conftest import REPO, records, run_train
from numerics import assert_close

CFG = ModelConfig(vocab_size=64, seq_len=128, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2)
RNG = np.random.default_rng(0)


def mesh():
    return sharding.make_mesh(MeshConfig())


def random_items(n, shortest=2, longest=30, endings=4):
    draw = lambda lo, hi: tuple(int(t) for t in RNG.integers(0, CFG.vocab_size, int(RNG.integers(lo, hi + 1))))
    return [tasks.Item(draw(shortest, longest), tuple(draw(1, 8) for _ in range(endings)), int(RNG.integers(endings)))
            for _ in range(n)]


def reference_scores(params, items, cfg=CFG):
    """Each ending's summed loss and token count in float64, from model.forward on its row alone."""
    forward = jax.jit(model.forward, static_argnums=2)
    out = []
    for item in items:
        rows = []
        for ending in item.endings:
            tokens = np.array(item.context + ending)
            logits, _ = forward(params, tokens[None], cfg)
            logp = jax.nn.log_softmax(np.asarray(logits[0, :-1], np.float64), axis=-1)
            nll = -np.asarray(logp)[np.arange(len(tokens) - 1), tokens[1:]][-len(ending):]
            rows.append((nll.sum(), len(ending)))
        out.append(np.array(rows))
    return out


def test_scores_match_a_float64_reference():
    params = model.init_params(CFG, jax.random.key(1))
    # Endings of different lengths (so mean and total losses rank differently), rows of few lengths.
    draw = lambda n: tuple(int(t) for t in RNG.integers(0, CFG.vocab_size, n))
    items = [tasks.Item(draw(4), (draw(1), draw(3), draw(2), draw(4)), 2),
             tasks.Item(draw(6), (draw(2), draw(1), draw(3)), 0),
             tasks.Item(draw(5), (draw(3), draw(1)), 1)]
    scores = tasks.score_items(tasks.Scorer(CFG, mesh()), params, items, batch_size=2)
    expected = reference_scores(params, items)
    for got, want in zip(scores, expected):
        assert_close(got, want, 1e-5)
    labels = np.array([item.label for item in items])
    assert tasks.accuracy(items, scores) == {
        "acc_norm": float(np.mean([np.argmin(w[:, 0] / w[:, 1]) for w in expected] == labels)),
        "acc": float(np.mean([np.argmin(w[:, 0]) for w in expected] == labels))}


def test_known_answers():
    """Blocks that start as the identity (zero output projections) and large tied embeddings make a
    model that predicts the token it just read. Repeating the context is then the right ending;
    and an ending of many easy tokens and one hard one wins on mean loss but loses on total to
    the hard token alone, so acc_norm and acc part ways as they should."""
    cfg = dataclasses.replace(CFG, zero_init_out=True)
    params = model.init_params(cfg, jax.random.key(0))
    params["embed"] = params["embed"] * 30.0
    logits, _ = model.forward(params, np.array([[3, 7, 9]]), cfg)
    assert np.argmax(logits[0], axis=-1).tolist() == [3, 7, 9]
    items = [tasks.Item((3, 3, 3, 3), ((3, 3), (7, 9), (11, 5), (8, 2)), 0),
             tasks.Item((3, 3, 3, 3), ((3,) * 8 + (9,), (9,)), 0)]
    scores = tasks.score_items(tasks.Scorer(cfg, mesh()), params, items, batch_size=4)
    assert tasks.accuracy(items, scores) == {"acc_norm": 1.0, "acc": 0.5}


def test_padding_and_batching_leave_scores_unchanged():
    params = model.init_params(CFG, jax.random.key(2))
    item = random_items(1, 3, 6)
    longer = random_items(3, 40, 100)
    scorer = tasks.Scorer(CFG, mesh())
    alone = tasks.score_items(scorer, params, item, batch_size=1)[0]
    together = tasks.score_items(scorer, params, longer + item + longer, batch_size=3)[3]
    assert_close(together, alone, 1e-6)


def test_a_few_compiles_for_many_lengths():
    items = random_items(12, 2, 110)
    scorer = tasks.Scorer(CFG, mesh())
    tasks.score_items(scorer, model.init_params(CFG, jax.random.key(3)), items, batch_size=2)
    assert {shape[1] for shape in scorer.compiled} <= {32, 64, 128}
    assert tasks.bucket_length(129, 1000) == 256 and tasks.bucket_length(900, 1000) == 1000


# --- Bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("line, schema, culprit", [
    ('{"context": [1, 2], "endings": [[3], [4]]}', "mc", ":2: no 'label' field; the mc schema is {context, endings, label}"),
    ('{"context": [1, 2], "endings": [[3], [4]], "label": 2}', "mc", ":2: label 2 must be an integer in [0, 2)"),
    ('{"context": [1, 2], "endings": [[3]], "label": 0}', "mc", ":2: 'endings' must be a list of at least 2"),
    ('{"context": [1, 99], "endings": [[3], [4]], "label": 0}', "mc", ":2: context: token id 99 is outside"),
    ('{"context": [1, 2], "endings": [[3], []], "label": 0}', "mc", ":2: endings[1] is empty"),
    ('{"context": "text", "endings": [[3], [4]], "label": 0}', "mc", ":2: context is text but the run has no "
                                                                     "tokenizer (none here); give token ids"),
    ('{"context": [1], "endings": [[3], [4]], "label": 0}', "hellaswag", ":1: no 'ctx' field"),
    ("{not json", "mc", ":2: not valid JSON"),
])
def test_bad_jsonl_is_one_line(tmp_path, line, schema, culprit):
    path = tmp_path / "items.jsonl"
    path.write_text('{"context": [1], "endings": [[2], [3]], "label": 1}\n' + line + "\n")
    with pytest.raises(tasks.TaskError) as err:
        tasks.read_items(path, schema, None, "none here", CFG)
    assert str(err.value).startswith(str(path)) and culprit in str(err.value) and "\n" not in str(err.value)


def test_missing_task_file_fails_before_training(tmp_path):
    cfg = Config(model=CFG, eval=EvalConfig(tasks=(f"hellaswag={tmp_path / 'nope.jsonl'}",)))
    with pytest.raises(tasks.TaskError, match=r"^eval.tasks hellaswag: .*nope.jsonl: no such file$"):
        tasks.TaskRunner(cfg, mesh())


# --- The command line and training ---------------------------------------------------------------


def write_tasks(folder):
    """A HellaSwag-format file (text, scored with the run's byte tokenizer) and an mc file of ids."""
    hellaswag = [{"ctx": "the model learns to", "endings": ["predict next token", "data the from", "text to",
                                                            "learns model the"], "label": 0},
                 {"ctx": "next token from", "endings": ["text data.", "the the the", "model", "to"], "label": 0},
                 {"ctx": "predict the", "endings": ["next token.", "token next", "from learns", "data"], "label": 0}]
    (folder / "hellaswag.jsonl").write_text("".join(json.dumps(item) + "\n" for item in hellaswag))
    mc = [{"context": [116, 104, 101, 32], "endings": [[109, 111], [120, 122, 122]], "label": 0},
          {"context": [100, 97, 116, 97], "endings": [[32, 116], [255], [0, 1]], "label": 1}]
    (folder / "mc.jsonl").write_text("".join(json.dumps(item) + "\n" for item in mc))
    return folder / "hellaswag.jsonl", folder / "mc.jsonl"


def printed(out: str) -> dict[str, float]:
    return {line.split()[0]: float(line.split()[1]) for line in out.splitlines()
            if line.split() and line.split()[0] in ("acc_norm", "acc", "val_loss", "val_bpb")}


def test_evaluate_commands(tiny_run, corpus, tmp_path, capsys):
    hellaswag, mc = write_tasks(tmp_path)
    evaluate.main(["--run", str(tiny_run), "--task", "hellaswag", "--data", str(hellaswag)])
    scores = printed(capsys.readouterr().out)
    assert set(scores) == {"acc_norm", "acc"} and all(0 <= v <= 1 for v in scores.values())
    evaluate.main(["--run", str(tiny_run), "--task", "mc", "--data", str(mc), "--max-items", "1"])
    assert set(printed(capsys.readouterr().out)) == {"acc_norm", "acc"}
    evaluate.main(["--run", str(tiny_run), "--task", "val", "--data", str(corpus)])
    val = printed(capsys.readouterr().out)
    trained = [r for r in records(tiny_run) if "val_loss" in r][-1]     # train.py's, at the same step
    assert abs(val["val_loss"] - trained["val_loss"]) <= 1e-4 and abs(val["val_bpb"] - trained["val_bpb"]) <= 1e-4
    evaluate.main(["--run", str(tiny_run), "--task", "val", "--data", str(corpus), "--quantize", "int8"])
    int8 = printed(capsys.readouterr().out)     # int8 weights: close, and not the float model itself
    assert 0 < abs(int8["val_loss"] - val["val_loss"]) <= 0.02 * val["val_loss"]
    # The same scoring with the rows split over two devices.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "2"}
    proc = subprocess.run([sys.executable, "evaluate.py", "--run", str(tiny_run), "--task", "hellaswag",
                           "--data", str(hellaswag), "--batch-size", "1"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "2 device(s)" in proc.stdout and printed(proc.stdout) == scores


def test_evaluate_errors_are_one_line(tiny_run, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"context": [1], "endings": [[2], [3]]}\n')
    for argv, culprit in [(["--task", "mc", "--data", str(tmp_path / "bad.jsonl")], "bad.jsonl:1: no 'label' field"),
                          (["--task", "mc", "--data", "x", "--download"], "--download fetches HellaSwag"),
                          (["--task", "mc", "--data", "x", "--max-items", "0"], "--max-items 0 must be >= 1"),
                          (["--task", "val", "--data", "x", "--quantize", "fp4"], "--quantize fp4: unknown scheme")]:
        with pytest.raises(SystemExit) as err:
            evaluate.main(["--run", str(tiny_run), *argv])
        assert str(err.value).startswith("error: ") and culprit in str(err.value) and "\n" not in str(err.value)


def test_eval_tasks_during_training(corpus, tmp_path):
    hellaswag, mc = write_tasks(tmp_path)
    run = tmp_path / "run"
    run_train(corpus, run, "train.steps=4", f"eval.tasks=hellaswag={hellaswag},quiz={mc}")
    logged = [r for r in records(run) if "val_loss" in r][-1]
    assert logged["step"] == 4
    # The same numbers as scoring the final checkpoint afresh.
    cfg, directory, step = runs.find_checkpoint(str(run), None)
    params = runs.restore_params(cfg, directory, step)
    enc = tokenizer.load_tokenizer(corpus)
    for name, path, schema in (("hellaswag", hellaswag, "hellaswag"), ("quiz", mc, "mc")):
        items = tasks.read_items(path, schema, enc, "", cfg.model)
        scores = tasks.accuracy(items, tasks.score_items(tasks.Scorer(cfg.model, mesh()), params, items, 16))
        assert {key: logged[f"{name}/{key}"] for key in scores} == scores


def test_text_items_need_a_tokenizer_the_run_lacks(tmp_path):
    """A run without a tokenizer (an import whose tokenizer did not convert) says why."""
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / tokenizer.NO_TOKENIZER_NOTE).write_text("hf.py import: no tokenizer.json\n")
    cfg = Config(model=CFG, data=DataConfig(path=str(tmp_path / "tokenizer")))
    enc, why = tokenizer.for_model_or_reason(cfg)
    assert enc is None and why == "hf.py import: no tokenizer.json"
