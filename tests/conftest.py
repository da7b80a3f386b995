"""Shared fixtures: tests run on the CPU backend; a byte-level corpus and a tiny trained run are
built once per session and shared by every test module that needs them."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session, its pytest-xdist workers and every train.py
# they start: most tests compile the same tiny model's step, and compiling is most of their time.
# Set here, before JAX is imported, by the first process (workers and subprocesses inherit it).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="jax-test-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
else:
    _CACHE = None

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# A model small enough to train a few steps in seconds; any test adds its own overrides after these.
TINY = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.seq_len=32",
        "train.batch_size=4", "data.val_tokens=256", "train.log_every=1", "eval.every=4"]


def pytest_unconfigure(config):
    if _CACHE:    # only the process that made it removes it
        shutil.rmtree(_CACHE, ignore_errors=True)


def run_train(corpus, run_dir, *overrides, config="configs/quickstart.py", extra=(), check=True,
              devices=None, timeout=300):
    """train.py in a subprocess on the tiny model; `devices` simulates that many CPU devices."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if devices is not None:
        env["JAX_NUM_CPU_DEVICES"] = str(devices)
    cmd = [sys.executable, "train.py", "--config", config, *extra, *TINY, f"data.path={corpus}",
           f"train.run_dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A real byte-level corpus made by `corpus.prepare` from text files (train and val shards)."""
    import corpus as corpus_tool    # the module, under another name than this fixture
    root = tmp_path_factory.mktemp("corpus")
    texts = root / "texts"
    texts.mkdir()
    rng = np.random.default_rng(0)
    words = ["the", "model", "learns", "to", "predict", "next", "token", "from", "text", "data"]
    for i in range(6):
        sentences = [" ".join(rng.choice(words, 8)) + "." for _ in range(300)]
        (texts / f"doc{i}.txt").write_text("\n".join(sentences))
    corpus_tool.prepare(str(texts / "*.txt"), "bytes", root / "shards", val_fraction=0.2, workers=1)
    return root / "shards"


@pytest.fixture(scope="session")
def tiny_run(corpus, tmp_path_factory):
    """A finished 8-step run of the tiny model (checkpoints at 4 and 8): read it, never write it."""
    run = tmp_path_factory.mktemp("tiny_run") / "run"
    run_train(corpus, run, "train.steps=8", "train.ckpt_every=4")
    return run
