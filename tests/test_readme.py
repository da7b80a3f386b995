"""Every command in README.md works as written on a fresh clone, with clean output (issue #17).

Each ```bash line of the README has a runner here (a README command without one fails
`test_every_readme_command_has_a_runner`). Commands run in a copy of the working tree (what a clone
would hold: git's tracked and unignored files, sharing this .venv), through `bash -c`, with the
virtual environment first on PATH as the README asks. Runs are kept tiny by arguments appended to
the command (conftest's TINY model, few steps, few tokens). Commands that need the network get a
dead proxy and must say so in one line (or use what is cached); sbatch and TPU pods are checked through the launchers'
--dry-run; `.ci/run` is skipped (it runs this suite)."""
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from configs.load import load_config
from conftest import REPO, TINY

README = (REPO / "README.md").read_text()
DEAD_PROXY = "http://127.0.0.1:9"     # nothing listens there: any download fails at once


def fenced(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


def readme_commands() -> list[str]:
    """Each ```bash line, comments dropped, spacing normalized (quoting kept)."""
    lines = [line for block in fenced("bash") for line in block.splitlines() if line.strip()]
    return list(dict.fromkeys(shlex.join(shlex.split(line, comments=True)) for line in lines))


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """The working tree as a fresh clone has it: no data/, no runs/, this session's .venv."""
    root = tmp_path_factory.mktemp("clone")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True)
    if listed.returncode:
        pytest.skip(f"not a git checkout, so no clone to copy ({listed.stderr.strip()})")
    for name in filter(None, listed.stdout.split("\0")):
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    (root / ".venv").symlink_to(Path(sys.executable).parent.parent)
    return root


@pytest.fixture(scope="module")
def env():
    """An active venv and the CPU; pip may not reach an index."""
    venv = Path(sys.executable).parent
    return {**os.environ, "PATH": f"{venv}:{os.environ['PATH']}", "VIRTUAL_ENV": str(venv.parent),
            "JAX_PLATFORMS": "cpu", "PIP_NO_INDEX": "1"}


def offline(env) -> dict:
    """`env` where every download goes through a proxy that is not there."""
    proxies = {name: DEAD_PROXY for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")}
    return {**env, **proxies, "NO_PROXY": "", "no_proxy": ""}


def run(clone, env, command: str, *extra, timeout=600) -> subprocess.CompletedProcess:
    """The README's command line as written, with `extra` arguments appended."""
    line = " ".join([command, *map(shlex.quote, map(str, extra))])
    return subprocess.run(["bash", "-c", line], cwd=clone, env=env, capture_output=True, text=True, timeout=timeout)


def ok(proc) -> str:
    """A clean success: exit 0, no traceback and no warning on stderr. Returns stdout."""
    assert proc.returncode == 0, f"{proc.args}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr and "WARNING" not in proc.stderr, proc.stderr
    return proc.stdout


def last_line(out: str, pattern: str) -> bool:
    """Is the last line `pattern`, where * stands for an absolute path's leading part?"""
    return re.fullmatch(re.escape(pattern).replace(r"\*", r"/\S+/"), out.splitlines()[-1]) is not None


def one_line_error(proc) -> str:
    assert proc.returncode == 1, f"{proc.args}\n{proc.stdout}\n{proc.stderr}"
    error = proc.stderr.strip()
    assert error.startswith("error: ") and "\n" not in error, error
    return error


# Several runners share these, built once: the README's own commands produce them.
STDLIB = "python corpus.py prepare --input stdlib --tokenizer bytes --out data/stdlib"
QUICKSTART = "bash scripts/quickstart.sh"


@pytest.fixture(scope="module")
def stdlib(clone, env):
    return run(clone, env, STDLIB)


@pytest.fixture(scope="module")
def quickstart(clone, env, stdlib):
    """The quickstart on the tiny model for 2 steps (the script passes its arguments to train.py);
    data/stdlib was built by the README's prepare line, so the script reuses it."""
    return run(clone, env, QUICKSTART, *TINY, "train.steps=2")


# --- Runners, one per README command ------------------------------------------------------------


def ci(ctx, command):
    assert subprocess.run(["bash", "-n", ".ci/run"], cwd=ctx.clone).returncode == 0
    pytest.skip(".ci/run runs this very suite (and installs requirements-dev.txt from the network)")


def quickstart_script(ctx, command):
    assert ctx.stdlib.returncode == 0, ctx.stdlib.stderr
    out = ok(ctx.quickstart)
    assert ctx.quickstart.stderr == ""
    assert last_line(out, "done: 2 steps; checkpoints in *runs/quickstart/checkpoints, logs in runs/quickstart")


def train_synopsis(ctx, command):
    """A synopsis: its placeholders filled in, every flag used."""
    command = "python train.py --config configs/quickstart.py"
    out = ok(run(ctx.clone, ctx.env, command, *TINY, f"data.path={ctx.corpus}", "train.run_dir=runs/synopsis",
                 "train.steps=4", "--init-from", ctx.tiny_run, "--stop-after", "2"))
    assert f"initialized parameters from {ctx.tiny_run / 'checkpoints'} step 8" in out
    assert last_line(out, "stopped after step 2 (--stop-after): checkpoint saved to *runs/synopsis/checkpoints")


def verify(ctx, command):
    ok(ctx.quickstart)
    out = ok(run(ctx.clone, ctx.env, "python checkpoint.py verify runs/quickstart"))
    assert out.splitlines()[-1].split() == ["2", "intact"]


def sample_run(ctx, command):
    ok(ctx.quickstart)
    out = ok(run(ctx.clone, ctx.env, command, "--max-new-tokens", "8"))    # the tiny model's context is 32
    assert out.startswith("def main(") and out.endswith("\n")


def sample_random(ctx, command):
    proc = run(ctx.clone, ctx.env, command)
    assert ok(proc).startswith("Hello") and proc.stderr == ""


def launch_local(ctx, command):
    proc = run(ctx.clone, ctx.env, command, *TINY, "train.batch_size=8", f"data.path={ctx.corpus}",
               "train.run_dir=runs/local", "train.steps=2")
    out = ok(proc)
    assert "[Gloo]" not in out and proc.stderr == ""
    assert last_line(out, "done: 2 steps; checkpoints in *runs/local/checkpoints, logs in runs/local")


def train_args(words: list[str]) -> list[str]:
    """The arguments a launcher passes to train.py, checked to load as a config."""
    args = words[words.index("--config"):]
    load_config(REPO / args[1], args[2:])
    return args


def sbatch(ctx, command):
    """No job is ever submitted from a test: the script's --dry-run prints its srun line."""
    words = shlex.split(command)
    script = next(word for word in words if word.endswith(".sh"))
    args = train_args(words)
    out = ok(run(ctx.clone, ctx.env, f"bash {script} --dry-run", *args))
    assert shlex.split(out) == ["srun", "--kill-on-bad-exit=1", "python", "train.py", *args]


def tpu_pod(ctx, command):
    words = shlex.split(command)
    out = ok(run(ctx.clone, ctx.env, shlex.join([words[0], "--dry-run", *words[1:]])))
    printed = shlex.split(out)
    assert printed[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-pod", "--zone", "us-central2-b"]
    assert printed[-1].endswith("python3 train.py " + " ".join(train_args(words)) + " ")


def fineweb(ctx, command):
    """Offline: the progress line of the first shard, then one line."""
    proc = run(ctx.clone, offline(ctx.env), command, timeout=120)
    *progress, error = proc.stderr.strip().splitlines()
    assert progress == ["[1/9] fineweb_val_000000.bin"] and proc.returncode == 1
    assert error == ("error: cannot reach huggingface.co ([Errno 111] Connection refused); downloading FineWeb "
                     "needs network access")


def train_fineweb(ctx, command):
    error = one_line_error(run(ctx.clone, ctx.env, command, timeout=120))
    assert error == ("error: data.path='data/fineweb10B' has no train shards (*train_*.bin); make them with "
                     "`python corpus.py fineweb --train-shards 8 --out data/fineweb10B` (GPT-2 tokens)")


def prepare_stdlib(ctx, command):
    out = ok(ctx.stdlib)
    assert re.fullmatch(r"data/stdlib: [\d,]+ train tokens from \d+ files, [\d,]+ val tokens from \d+ held-out "
                        r"files, tokenizer 'bytes'\n", out), out


def prepare_texts(ctx, command):
    """GPT-2's tokenizer is downloaded once by tiktoken: offline and uncached, one line says so."""
    for name in ("a/one.txt", "b/c/two.txt"):
        (ctx.clone / "texts" / name).parent.mkdir(parents=True, exist_ok=True)
        (ctx.clone / "texts" / name).write_text("Some text to tokenize. " * 200)
    proc = run(ctx.clone, offline(ctx.env), command)
    if proc.returncode:
        assert "tokenizer 'gpt2' needs network access once" in one_line_error(proc)
    else:
        assert ok(proc).startswith("data/mine: ") and (ctx.clone / "data/mine/train_000000.bin").is_file()


def inspect(ctx, command):
    ok(ctx.stdlib)
    for flags in ([], ["--full"]):
        out = ok(run(ctx.clone, ctx.env, "python corpus.py inspect data/stdlib", *flags))
        assert out.startswith("data/stdlib: tokenizer 'bytes', n_vocab 257, end-of-text 256\n")


def bench_loader(ctx, command):
    out = ok(run(ctx.clone, ctx.env, command, "--steps", "5", "--cold-steps", "2", "--repeats", "1", "--batch", "4",
                 "--seq", "64", "--shard-tokens", "100000"))
    assert "loader / raw" in out


def model_table(ctx, command):
    assert "total parameters: " in ok(run(ctx.clone, ctx.env, command))


RUNNERS = {
    "bash .ci/run": ci,
    QUICKSTART: quickstart_script,
    "python train.py --config configs/NAME.py '[section.field=value' '...]' '[--init-from' 'RUN]' '[--stop-after'"
    " 'N]'": train_synopsis,
    "python checkpoint.py verify runs/NAME": verify,
    "python sample.py --run runs/quickstart --prompt 'def main(' --max-new-tokens 200 --temperature 0.8 --top-k 50":
        sample_run,
    "python sample.py --config configs/quickstart.py --random-init --prompt Hello": sample_random,
    "scripts/launch_local.sh 2 2 --config configs/quickstart.py mesh.strategy=fsdp mesh.data=1 mesh.fsdp=4":
        launch_local,
    "sbatch --nodes=4 scripts/launch_slurm.sh --config configs/gpt2_124m.py mesh.strategy=fsdp mesh.data=1"
    " mesh.fsdp=-1": sbatch,
    "scripts/launch_tpu_pod.sh my-pod us-central2-b -- --config configs/gpt2_124m.py mesh.strategy=fsdp mesh.data=1"
    " mesh.fsdp=-1": tpu_pod,
    "python corpus.py fineweb --train-shards 8 --out data/fineweb10B": fineweb,
    "python train.py --config configs/gpt2_124m.py": train_fineweb,
    STDLIB: prepare_stdlib,
    "python corpus.py prepare --input 'texts/**/*.txt' --tokenizer gpt2 --out data/mine": prepare_texts,
    "python corpus.py inspect data/stdlib '[--full]'": inspect,
    "python bench.py loader": bench_loader,
    "python model.py --config configs/design_40m.py model.n_layers=8 model.qk_norm=true": model_table,
}


def test_every_readme_command_has_a_runner():
    commands = readme_commands()
    assert not set(commands) - set(RUNNERS), f"README commands without a runner: {set(commands) - set(RUNNERS)}"
    assert not set(RUNNERS) - set(commands), f"runners of commands gone from the README: {set(RUNNERS) - set(commands)}"


class Context:
    """What runners use, each built on first use (so a skipped runner builds nothing)."""

    def __init__(self, request):
        self.request = request

    def __getattr__(self, name):
        return self.request.getfixturevalue(name)


@pytest.mark.parametrize("command", RUNNERS, ids=[runner.__name__ for runner in RUNNERS.values()])
def test_readme_command(command, request):
    RUNNERS[command](Context(request), command)


def test_the_python_snippet(clone, env):
    (snippet,) = fenced("python")
    check = "\nassert logits_BTV.shape == (2, 17, cfg.vocab_size) and loss.shape == ()\n"
    proc = subprocess.run([sys.executable, "-c", snippet + check], cwd=clone, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
