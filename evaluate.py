"""Evaluate a run's checkpoint: python evaluate.py --run runs/NAME --task val|hellaswag|mc --data PATH

    python evaluate.py --run runs/NAME [--step S] --task val --data DIR [section.field=value ...]
    python evaluate.py --run runs/NAME [--step S] --task hellaswag|mc --data FILE.jsonl
        [--max-items N] [--batch-size N] [--tokenizer bytes|gpt2|PATH]
    python evaluate.py --task hellaswag --data data/hellaswag_val.jsonl --download

val: loss and bits per byte over the validation shards in DIR (data.val_tokens of them, batched
by train.batch_size: override either). hellaswag: the official hellaswag_val.jsonl, scored
completion-style as llm.c does; mc: any jsonl of {context, endings, label}, text or token ids.
Both print acc_norm and acc on their own lines. --download fetches HellaSwag (needs a network).
Scoring is tasks.py; notes/evaluation.md explains it.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Callable

import jax

import cli
import data
import model
import quantize
import runs
import sharding
import tasks
import tokenizer
from configs.base import Config, ConfigError
from configs.load import apply_overrides


def parse_args(argv=None):
    parser = cli.Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a run directory, e.g. runs/quickstart")
    parser.add_argument("--step", type=int, help="the checkpoint step (default: the latest)")
    parser.add_argument("--task", required=True, choices=("val", "hellaswag", "mc"))
    parser.add_argument("--data", required=True, help="val: a directory of token shards; else a .jsonl file")
    parser.add_argument("--max-items", type=int, help="score the first N items only")
    parser.add_argument("--batch-size", type=int, help="items per batch (default: the run's eval.batch_size)")
    parser.add_argument("--tokenizer", help="bytes | gpt2 | PATH.tiktoken (default: the run's)")
    parser.add_argument("--download", action="store_true", help="hellaswag: fetch the official file to --data first")
    parser.add_argument("--quantize", help="score with weight-only quantized weights (sample.py's): int8")
    parser.add_argument("overrides", nargs="*", help="section.field=value applied to the run's config")
    return parser.parse_intermixed_args(argv)


def check_args(args) -> None:
    for flag in ("max_items", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise tasks.TaskError(f"--{flag.replace('_', '-')} {value} must be >= 1")
    if args.download and args.task != "hellaswag":
        raise tasks.TaskError(f"--download fetches HellaSwag; it needs --task hellaswag, not {args.task}")
    if args.quantize is not None:
        quantize.check_scheme(args.quantize)
    if not args.run and not args.download:
        raise tasks.TaskError("--run is required (a run directory, e.g. runs/quickstart)")


def load(args) -> tuple[Config, object, Callable[[], dict]]:
    """The run's config (with overrides), its mesh, and a loader of its sharded parameters (called
    once every input has been checked; without --step, the newest step that reads back whole)."""
    cfg, directory, step = runs.find_checkpoint(args.run, args.step)
    cfg = apply_overrides(cfg, args.overrides)
    mesh = sharding.make_mesh(cfg.mesh)
    shardings = sharding.param_shardings(cfg.model, cfg.mesh.strategy, mesh)
    print(f"{args.run} step {step}: {model.count_params(cfg.model):,} parameters, {jax.device_count()} device(s)")

    def load_params():
        params = runs.load_params(cfg, directory, args.step, shardings)[1]
        return quantize.quantize_params(params, cfg.model, args.quantize) if args.quantize else params
    return cfg, mesh, load_params


def evaluate_val(cfg: Config, mesh, load_params, path: str) -> dict[str, float]:
    """Mean loss over the validation shards of `path`, and bits per byte when its tokenizer is known."""
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=path))
    sharding.check_batch(cfg.train.batch_size, 1, mesh)
    process = (jax.process_index(), jax.process_count())
    local = data.val_batches(cfg, *process)
    text_bytes = data.val_bytes(cfg)
    where = sharding.batch_sharding(mesh)
    rows = cfg.train.batch_size
    batches = [{name: jax.make_array_from_process_local_data(where, part, (rows, *part.shape[1:]))
                for name, part in batch.items()} for batch in local]

    def summed(params, batch):
        _, metrics = model.loss_fn(params, batch, cfg.model)
        return metrics["ce"] * metrics["tokens"], metrics["tokens"]
    step = jax.jit(summed, out_shardings=sharding.replicated(mesh))
    params = load_params()
    total, tokens = 0.0, 0.0
    for batch in batches:
        nll, count = step(params, batch)
        total, tokens = total + float(nll), tokens + float(count)
    result = {"val_loss": total / tokens}
    if text_bytes:
        result["val_bpb"] = total / (math.log(2) * text_bytes)
    print(f"val on {path}: {int(tokens):,} tokens")
    return result


def evaluate_task(cfg: Config, mesh, load_params, args) -> dict[str, float]:
    """acc_norm and acc of a multiple-choice file, with its throughput."""
    enc, why = tokenizer.for_model_or_reason(cfg, args.tokenizer, tokenizer.FLAG_HINT)
    items = tasks.read_items(args.data, args.task, enc, why, cfg.model, args.max_items)
    params = load_params()
    scorer = tasks.Scorer(cfg.model, mesh)
    start = time.perf_counter()
    scores = tasks.score_items(scorer, params, items, args.batch_size or cfg.eval.batch_size)
    seconds = time.perf_counter() - start
    print(f"{args.task} on {args.data}: {len(items):,} items in {seconds:.1f}s ({len(items) / seconds:,.1f} "
          f"items/s; {scorer.compile_seconds:.1f}s compiling {len(scorer.compiled)} batch shapes)")
    return tasks.accuracy(items, scores)


def evaluate_main(args) -> None:
    check_args(args)
    if args.download and not Path(args.data).is_file():
        tasks.download_hellaswag(args.data)
        print(f"downloaded {tasks.HELLASWAG_URL} to {args.data}")
    if not args.run:
        return
    cfg, mesh, load_params = load(args)
    if args.task == "val":
        result = evaluate_val(cfg, mesh, load_params, args.data)
    else:
        result = evaluate_task(cfg, mesh, load_params, args)
    for name, value in result.items():
        print(f"{name} {value:.4f}")


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        evaluate_main(args)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
