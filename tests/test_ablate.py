"""ablate.py and plot.py: a 2-cell study runs, skips finished cells, resumes a stopped one; the
plotted data equals the runs' logs; bad input fails in one line before anything runs."""
import json
import shutil
import subprocess
import sys

import pytest

import ablate
import plot
from conftest import REPO, TINY, records
from configs.base import ConfigError


def write_study(tmp_path, corpus, cells=None, seeds=(0,), steps=2):
    cells = cells or {"rms": [], "layernorm": ["model.norm=layernorm"]}
    common = [*TINY, f"data.path={corpus}", f"train.steps={steps}", "eval.every=2", "train.ckpt_every=1"]
    path = tmp_path / "tiny_study.py"
    path.write_text(
        "from ablate import Study\n"
        f"study = Study(name='tiny', base={str(REPO / 'configs/quickstart.py')!r}, cells={cells!r},\n"
        f"              seeds={tuple(seeds)!r}, common={tuple(common)!r}, runs_root={str(tmp_path / 'runs')!r},\n"
        "              claim='RMSNorm matches LayerNorm')\n")
    return path


def run_ablate(study_path, *args):
    return subprocess.run([sys.executable, "ablate.py", str(study_path), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def test_study_runs_skips_and_resumes(corpus, tmp_path):
    cells = {"rms": [], "layernorm": ["model.norm=layernorm"], "rms-again": []}
    path = write_study(tmp_path, corpus, cells=cells, steps=3)
    study = ablate.load_study(path)
    # A cell killed after its first step: the study resumes it from its checkpoint.
    stopped = ablate.run_dir(study, "rms", 0)
    cmd = [sys.executable, "train.py", "--config", study.base, *ablate.cell_overrides(study, "rms", 0),
           "--stop-after", "1"]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    first = run_ablate(path)
    assert first.returncode == 0, first.stderr
    assert "tiny/rms-seed0: done" in first.stdout and "tiny/layernorm-seed0: done" in first.stdout
    assert "resuming from step 1" in (stopped / "ablate.log").read_text()
    # The same config in another cell is copied, not trained again: training is deterministic.
    assert "tiny/rms-again-seed0: the same config already ran as" in first.stdout
    assert records(ablate.run_dir(study, "rms-again", 0)) == records(stopped)
    assert [r["step"] for r in records(stopped)][-1] == 3
    second = run_ablate(path)
    assert "tiny/rms-seed0: finished, skipped" in second.stdout
    assert "tiny/layernorm-seed0: finished, skipped" in second.stdout
    table = (tmp_path / "runs" / "tiny" / "results.md").read_text()
    assert "| rms | `(base)` | 1 |" in table and "| layernorm | `model.norm=layernorm` | 1 |" in table
    assert (tmp_path / "runs" / "tiny" / "tiny.png").stat().st_size > 1000


def test_unknown_override_fails_before_any_cell_runs(corpus, tmp_path):
    path = write_study(tmp_path, corpus, cells={"ok": [], "typo": ["model.norm_typ=layernorm"]})
    proc = run_ablate(path)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: study 'tiny', cell 'typo': unknown key 'model.norm_typ'; did you mean")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs" / "tiny").exists()


def test_a_token_budget_sets_each_cells_steps(corpus, tmp_path):
    path = write_study(tmp_path, corpus, cells={"b4": ["train.batch_size=4"], "b8": ["train.batch_size=8"]})
    study = ablate.load_study(path)
    study = ablate.Study(**{**study.__dict__, "tokens": 32 * 8 * 6})
    steps = {cell: cfg.train.steps for cell, _, cfg in ablate.plan(study)}
    assert steps == {"b4": 12, "b8": 6}


def test_plotted_data_equals_the_logs(tiny_run, tmp_path):
    logged = records(tiny_run)
    data = plot.curves(tiny_run, "loss", "tokens")
    assert data["loss"] == ([r["tokens"] for r in logged], [r["loss"] for r in logged])
    vals = [r for r in logged if "val_loss" in r]
    assert data["val_loss"] == ([r["tokens"] for r in vals], [r["val_loss"] for r in vals])
    steps, norms = plot.curves(tiny_run, "grad_norm", "step")["grad_norm"]
    assert steps == [r["step"] for r in logged] and norms == [r["grad_norm"] for r in logged]


def test_resumed_logs_keep_the_last_record_of_each_step(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    again = json.loads(lines[-1]) | {"loss": 123.0}
    (run / "metrics.jsonl").write_text("\n".join(lines + [json.dumps(again), '{"step": 9, "lo']) + "\n")
    last = plot.read_records(run)[-1]
    assert last["step"] == again["step"] and last["loss"] == 123.0


def test_plot_x_in_flops_is_tokens_times_the_models_flops_per_token(tiny_run):
    import model
    from configs.load import run_config
    cfg = run_config(tiny_run, flag="").model
    series = plot.curves(tiny_run, "loss", x="flops")
    for name in ("loss", "val_loss"):
        kept = [record for record in records(tiny_run) if name in record]
        by_step = {record["step"]: record["tokens"] for record in kept}
        assert series[name][0] == [by_step[step] * model.flops_per_token(cfg, cfg.seq_len) for step in sorted(by_step)]

def test_plot_writes_a_png_with_a_legend_from_config_differences(tiny_run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_run, other)
    config = json.loads((other / "config.json").read_text())
    config["optim"]["lr"] = 0.5
    (other / "config.json").write_text(json.dumps(config))
    assert plot.labels([tiny_run, other]) == [f"lr={json.loads((tiny_run / 'config.json').read_text())['optim']['lr']}",
                                              "lr=0.5"]
    proc = subprocess.run([sys.executable, "plot.py", str(tiny_run), str(other), "--x", "time",
                           "--out", str(tmp_path / "fig.png")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, message", [
    (["{run}", "--metric", "perplexity"], "error: --metric 'perplexity': {run} logs none; choose one of"),
    (["{empty}"], "error: {empty}: no metrics.jsonl"),
    (["{run}", "--x", "epochs"], "error: argument --x: invalid choice: 'epochs'"),
    (["{run}", "{broken}"], "error: {broken}: {broken}/config.json is not readable JSON"),
])
def test_plot_bad_input_is_one_line(tiny_run, tmp_path, args, message):
    broken = shutil.copytree(tiny_run, tmp_path / "broken")
    (broken / "config.json").write_text("{bad")
    names = {"run": str(tiny_run), "empty": str(tmp_path / "empty"), "broken": str(broken)}
    (tmp_path / "empty").mkdir()
    args = [a.format(**names) for a in args]
    proc = subprocess.run([sys.executable, "plot.py", *args, "--out", str(tmp_path / "x.png")], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith(message.format(**names))


def test_study_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        ablate.load_study(tmp_path / "nope.py")
    (tmp_path / "bad.py").write_text("study = 3\n")
    with pytest.raises(ConfigError, match=r"must define `study = Study\(...\)`"):
        ablate.load_study(tmp_path / "bad.py")


def test_a_training_run_draws_its_loss_curve(tiny_run):
    """train.py redraws runs/NAME/loss.png at each checkpoint, so a quickstart user sees a picture."""
    png = tiny_run / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_mtime >= (tiny_run / "checkpoints" / "4").stat().st_mtime
