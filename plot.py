"""Loss curves from runs' metrics.jsonl, as PNG files:

    python plot.py runs/A runs/B ... [--x step|tokens|time|flops] [--metric loss|val_loss|...] --out FILE.png

`curves` reads the data and `draw` draws it, so what is plotted can be checked against the logs
apart from the drawing. The legend names each run by the config fields in which the runs differ.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import cli
import model
from configs.base import ConfigError
from configs.load import config_to_dict, run_config

X_AXES = ("step", "tokens", "time", "flops")
SMOOTHED_POINTS = 20   # the train-loss EMA averages over about len/20 records; val points are raw


def read_records(run_dir) -> list[dict]:
    """A run's logged records by step. A resumed run logs again the steps after its last
    checkpoint, so the last record of each step wins."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no metrics.jsonl (not a train.py run directory, or it has not logged yet)")
    by_step, lines = {}, path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                continue    # a line cut short by a kill; every earlier line is whole
            raise ConfigError(f"{path}:{number}: not a JSON record") from None
        by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]


def _x_values(records: list[dict], x: str, flops_per_token: float | None) -> list[float]:
    if x in ("step", "tokens"):
        return [record[x] for record in records]
    if x == "time":   # step_time is the mean over the steps since the previous record
        total, previous, out = 0.0, 0, []
        for record in records:
            total += record["step_time"] * (record["step"] - previous)
            previous = record["step"]
            out.append(total)
        return out
    return [record["tokens"] * flops_per_token for record in records]


def curves(run_dir, metric: str = "loss", x: str = "step") -> dict[str, tuple[list, list]]:
    """{series: (xs, ys)} of one run: for `loss`, the train loss and the validation loss
    (`val_loss`); for any other metric, that metric alone. Only records holding the metric count."""
    if x not in X_AXES:
        raise ConfigError(f"--x {x!r} is not valid; choose one of {', '.join(X_AXES)}")
    records = read_records(run_dir)
    names = [metric, "val_loss"] if metric == "loss" else [metric]
    known = sorted({key for record in records for key in record})
    if metric not in known:
        raise ConfigError(f"--metric {metric!r}: {run_dir} logs none; choose one of {', '.join(known)}")
    per_token = None
    if x == "flops":
        cfg = run_config(run_dir, flag="").model
        per_token = model.flops_per_token(cfg, cfg.seq_len)
    out = {}
    for name in names:
        kept = [record for record in records if name in record]
        if kept:
            out[name] = (_x_values(kept, x, per_token), [record[name] for record in kept])
    return out


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def labels(run_dirs) -> list[str]:
    """Each run's legend: the config fields whose values differ between the runs (the run
    directory's name when they all agree, or for a single run)."""
    configs = [_flat(config_to_dict(run_config(run, flag=""))) for run in run_dirs]
    differing = [key for key in configs[0] if key not in ("name", "train.run_dir")
                 and len({json.dumps(c.get(key)) for c in configs}) > 1]
    if len(run_dirs) < 2 or not differing:
        return [Path(run).name for run in run_dirs]
    return [", ".join(f"{key.split('.', 1)[1]}={c.get(key)}" for key in differing) for c in configs]


def smooth(values: list[float]) -> list[float]:
    """Debiased exponential moving average (tensorboard's smoothing) whose span is a fixed
    fraction of the curve, so a run logged every step and one logged every 25 look alike."""
    weight = max(0.0, 1.0 - SMOOTHED_POINTS / max(len(values), 1))
    out, average = [], 0.0
    for i, value in enumerate(values, 1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** i) if weight else value)
    return out


def draw(series: list[tuple[str, dict]], out, metric: str = "loss", x: str = "step", title: str = "") -> Path:
    """One figure of every run's curves: (label, curves(...)) pairs -> a PNG at `out`."""
    import matplotlib
    matplotlib.use("Agg")   # headless: no display is needed or wanted
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, data) in enumerate(series):
        color = colors[i % len(colors)]
        for name, (xs, ys) in data.items():
            if name == "val_loss" and metric == "loss":
                ax.plot(xs, ys, "o--", color=color, markersize=3, linewidth=1, label=f"{label} (val)")
            else:
                ys = smooth(ys) if metric == "loss" else ys
                ax.plot(xs, ys, color=color, linewidth=1.4, label=f"{label} (train)" if metric == "loss" else label)
    ax.set_xlabel({"time": "time (s)", "flops": "training FLOPs"}.get(x, x))
    ax.set_ylabel(metric)
    _set_limits(ax, series)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def _set_limits(ax, series) -> None:
    """Clip the first steps' high loss so the differences at the end stay visible."""
    tails = [ys[len(ys) // 5:] for _, data in series for _, ys in data.values() if len(ys) > 4]
    values = [y for tail in tails for y in tail if math.isfinite(y)]
    if values:
        low, high = min(values), max(values)
        ax.set_ylim(low - 0.05 * (high - low + 1e-9), high + 0.3 * (high - low + 1e-9))


def plot_runs(run_dirs, out, metric: str = "loss", x: str = "step", title: str = "") -> Path:
    data = [curves(run, metric, x) for run in run_dirs]
    return draw(list(zip(labels(run_dirs), data)), out, metric, x, title)


def main(argv=None) -> None:
    parser = cli.Parser(description="Plot runs' loss curves into a PNG.")
    parser.add_argument("runs", nargs="+", help="train.py run directories")
    parser.add_argument("--x", default="step", choices=X_AXES)
    parser.add_argument("--metric", default="loss", help="loss (train + val), val_loss, grad_norm, lr, ...")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    try:
        print(plot_runs(args.runs, args.out, args.metric, args.x, args.title))
    except ConfigError as err:
        raise SystemExit(f"error: {err}")


if __name__ == "__main__":
    main()
