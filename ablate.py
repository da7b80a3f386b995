"""Ablation studies: python ablate.py studies/NAME.py [--max-minutes M] [--report-only]

A study file defines `study = Study(...)`: a base preset, overrides every cell shares, named cells
(each a list of overrides) and seeds. Each (cell, seed) is an ordinary train.py run directory,
runs/STUDY/CELL-seedS, so every tool works on it. Finished cells are skipped and interrupted ones
resume from their checkpoints, so a killed study continues where it stopped. At the end the
runner prints a results table and writes runs/STUDY/results.md and a figure beside it.
"""
from __future__ import annotations

import ctypes
import importlib.util
import json
import math
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cli
import model
import plot
from configs.base import Config, ConfigError
from configs.load import config_to_dict, load_config, run_config

REPO = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Study:
    name: str                                    # its runs go to runs/<name>/
    base: str                                    # a preset, e.g. configs/quickstart.py
    cells: dict[str, tuple[str, ...]]            # cell name -> its section.field=value overrides
    seeds: tuple[int, ...] = (0,)
    common: tuple[str, ...] = ()                 # overrides every cell shares (budget, eval cadence)
    tokens: int | None = None                    # train every cell on this many tokens
    claim: str = ""                              # what the study tests, quoted in the report
    runs_root: str = "runs"


def load_study(path) -> Study:
    """Execute a study file and take its `study`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"_study_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    study = getattr(module, "study", None)
    if not isinstance(study, Study):
        raise ConfigError(f"study file {str(path)!r} must define `study = Study(...)` (from ablate import Study)")
    if not study.cells or not study.seeds:
        raise ConfigError(f"study {study.name!r} in {path} needs at least one cell and one seed")
    return study


def cell_overrides(study: Study, cell: str, seed: int) -> list[str]:
    """The overrides of one run; a token budget becomes train.steps at the cell's batch shape."""
    overrides = [*study.common, *study.cells[cell], f"train.seed={seed}",
                 f"train.run_dir={run_dir(study, cell, seed)}"]
    if study.tokens:
        cfg = load_config(study.base, overrides)
        per_step = cfg.train.batch_size * cfg.model.seq_len
        overrides.append(f"train.steps={max(1, study.tokens // per_step)}")
    return overrides


def run_dir(study: Study, cell: str, seed: int) -> Path:
    return Path(study.runs_root) / study.name / f"{cell}-seed{seed}"


def plan(study: Study) -> list[tuple[str, int, Config]]:
    """Every (cell, seed) with its validated config: a bad override fails here, in one line naming
    the cell, before any cell starts."""
    runs = []
    for cell in study.cells:
        for seed in study.seeds:
            try:
                runs.append((cell, seed, load_config(study.base, cell_overrides(study, cell, seed))))
            except ConfigError as err:
                raise ConfigError(f"study {study.name!r}, cell {cell!r}: {err}") from None
    return runs


def finished(cfg: Config) -> bool:
    """A run is finished once its metrics hold the last step (train.py saves it before logging ends)."""
    try:
        return any(record["step"] == cfg.train.steps for record in plot.read_records(cfg.train.run_dir))
    except ConfigError:
        return False


def _stop_with_parent() -> None:
    """Linux: the cell gets SIGTERM (save and exit) if the runner dies, even by kill -9, so a
    rerun never finds a second train.py writing the same run directory."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _identity(cfg: Config) -> str:
    """A run's config without its name and directory: equal identities train identically."""
    config = config_to_dict(cfg)
    config.pop("name")
    config["train"].pop("run_dir")
    return json.dumps(config, sort_keys=True)


def finished_twin(cfg: Config, runs_root) -> Path | None:
    """A finished run of any study with this very config (the base cell recurs across studies):
    training is deterministic, so copying it equals training it again."""
    want = _identity(cfg)
    for config_file in sorted(Path(runs_root).glob("*/*/config.json")):
        try:
            other = run_config(config_file.parent, flag="")
        except ConfigError:
            continue
        if config_file.parent != Path(cfg.train.run_dir) and _identity(other) == want and finished(other):
            return config_file.parent
    return None


def run_cell(cfg: Config, overrides: list[str], base: str, deadline: float | None) -> str:
    """train.py in a subprocess; at the deadline it gets SIGTERM, saves and exits (resumable)."""
    cmd = [sys.executable, str(REPO / "train.py"), "--config", base, *overrides]
    log = Path(cfg.train.run_dir) / "ablate.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=_stop_with_parent if sys.platform == "linux" else None)
        try:
            proc.wait(timeout=None if deadline is None else max(deadline - time.time(), 1))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            proc.wait()
            return "stopped at the time cap (resumes on the next invocation)"
    if proc.returncode:
        last = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        return f"failed ({proc.returncode}): {last[0]}"
    return "done"


def summary_row(cell: str, cfgs: list[Config]) -> dict:
    """Final val loss over seeds (mean and std), median tokens/s after the first record, params."""
    finals, speeds = [], []
    for cfg in cfgs:
        records = plot.read_records(cfg.train.run_dir) if Path(cfg.train.run_dir, "metrics.jsonl").is_file() else []
        vals = [record["val_loss"] for record in records if "val_loss" in record]
        if vals and records[-1]["step"] == cfg.train.steps:
            finals.append(vals[-1])
        speeds += [record["tokens_per_s"] for record in records[1:]]
    return {"cell": cell, "seeds": len(finals), "val": finals,
            "mean": statistics.mean(finals) if finals else math.nan,
            "std": statistics.stdev(finals) if len(finals) > 1 else math.nan,
            "tok_s": statistics.median(speeds) if speeds else math.nan,
            "params": model.count_params(cfgs[0].model)}


def report(study: Study, runs: list[tuple[str, int, Config]], out_dir: Path) -> str:
    """The markdown table and the figure (first seed of each cell) of a study."""
    rows = [summary_row(cell, [cfg for c, _, cfg in runs if c == cell]) for cell in study.cells]
    lines = [f"### {study.name}", "", f"Claim: {study.claim}" if study.claim else "", "",
             "| cell | overrides | seeds | final val loss | ± std | tokens/s | params |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        std = "" if math.isnan(row["std"]) else f"{row['std']:.4f}"
        lines.append(f"| {row['cell']} | `{' '.join(study.cells[row['cell']]) or '(base)'}` | {row['seeds']} | "
                     f"{row['mean']:.4f} | {std} | {row['tok_s']:,.0f} | {row['params']:,} |")
    firsts = [(cell, cfg) for cell, seed, cfg in runs if seed == study.seeds[0] and finished(cfg)]
    if firsts:
        data = [(cell, plot.curves(cfg.train.run_dir, "loss", "tokens")) for cell, cfg in firsts]
        figure = plot.draw(data, out_dir / f"{study.name}.png", "loss", "tokens", study.name)
        lines += ["", f"![{study.name}]({figure.name})"]
    text = "\n".join(lines) + "\n"
    (out_dir / "results.md").write_text(text)
    return text


def run_study(study: Study, max_minutes: float | None = None, report_only: bool = False) -> str:
    runs = plan(study)
    deadline = None if max_minutes is None else time.time() + 60 * max_minutes
    for cell, seed, cfg in runs if not report_only else []:
        name = f"{study.name}/{cell}-seed{seed}"
        if finished(cfg):
            print(f"{name}: finished, skipped", flush=True)
            continue
        if deadline is not None and time.time() >= deadline:
            print(f"{name}: not started (time cap)", flush=True)
            continue
        twin = finished_twin(cfg, study.runs_root)
        if twin is not None and not Path(cfg.train.run_dir).exists():
            shutil.copytree(twin, cfg.train.run_dir)
            print(f"{name}: the same config already ran as {twin}; copied", flush=True)
            continue
        print(f"{name}: {run_cell(cfg, cell_overrides(study, cell, seed), study.base, deadline)}", flush=True)
    out_dir = Path(study.runs_root) / study.name
    out_dir.mkdir(parents=True, exist_ok=True)
    return report(study, runs, out_dir)


def main(argv=None) -> None:
    parser = cli.Parser(description="Run an ablation study: every cell and seed, then a table and a figure.")
    parser.add_argument("study", help="a study file, e.g. studies/norms.py")
    parser.add_argument("--max-minutes", type=float, help="stop the study after this much wall-clock time")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the table and figure")
    args = parser.parse_args(argv)
    try:
        print(run_study(load_study(args.study), args.max_minutes, args.report_only))
    except ConfigError as err:
        raise SystemExit(f"error: {err}")


if __name__ == "__main__":
    import ablate   # run as the importable module, so study files' `from ablate import Study` is this Study
    ablate.main()
