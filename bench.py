"""The benchmarks, one subcommand each; the code is in benchmarks/, the results in notes/benchmarks.md.

    python bench.py train (--suite | --config configs/NAME.py) [section.field=value ...]
        [--batch 4 --seq 256] [--steps N] [--warmup 2] [--dtype float32|bfloat16]
        [--modes jit,eager,compile] [--repeats 1] [--layouts] [--avx2]   # JAX vs the twin
    python bench.py loader [--steps 500] [--cold-steps 50] [--repeats 3] [--batch 64] [--seq 1024]
        [--shard-tokens 100000000]                                   # data.py's loader vs raw memmap
    python bench.py decode [--config configs/NAME.py [section.field=value ...]] [--batches 1,16]
        [--prompt 128] [--new 128] [--repeats 3] [--quantize int8]   # sample.py vs the bandwidth bound
    python bench.py decode --target runs/BIG --draft runs/SMALL [--lookahead 2,4,8]   # speculative
    python bench.py mesh [--config configs/NAME.py] [section.field=value ...] [--batch 8] [--seq 256]
        [--steps 5] [--warmup 2]                                     # dp vs fsdp, simulated devices
    python bench.py profile [--config configs/NAME.py] [section.field=value ...] [--batch 8] [--seq 256]
        [--steps 3] [--warmup 2] [--dtype D] [--avx2] [--twin]       # a step's time per op category
    python bench.py ab [--config configs/NAME.py] [section.field=value ...] --variant base
        --variant NAME:section.field=value,xla_cpu_...=value [--rounds 12] [--batch 8] [--seq 256]
        [--warmup 2] [--dtype float32|bfloat16]                      # settings paired in one process

train, mesh, profile and ab take --malloc hugepages|default|tuned: the glibc malloc settings their
worker processes start with (MALLOCS in benchmarks/common.py). The default, hugepages, is how
scripts/quickstart.sh runs train.py.

Every subcommand takes --json FILE (its rows, as measured) and ends by saying how busy other
processes kept the machine: on a shared machine, rerun when that is ~0. Speed is measured here,
never asserted in tests.
"""
from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

import quantize
from benchmarks import common
from benchmarks.train_step import MODES
from cli import Parser
from configs.base import ConfigError

RUNNERS = {"train": "benchmarks.train_step", "loader": "benchmarks.loader", "decode": "benchmarks.decode",
           "mesh": "benchmarks.mesh", "profile": "benchmarks.profile", "ab": "benchmarks.ab"}


def positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a positive integer")
    return value


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0")
    return value


def positive_list(text: str) -> tuple[int, ...]:
    return tuple(positive(part) for part in text.split(","))


def modes(text: str) -> tuple[str, ...]:
    picked = tuple(dict.fromkeys(text.split(",")))
    if not set(picked) <= set(MODES):
        raise argparse.ArgumentTypeError(f"{text!r}: give a comma-separated subset of {','.join(MODES)}")
    return picked


def add_dtype(p) -> None:
    p.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="compute dtype (default float32 on a CPU, bfloat16 on a GPU)")


def add_malloc(p) -> None:
    p.add_argument("--malloc", choices=tuple(common.MALLOCS), default="hugepages", help="the glibc "
                   "malloc settings the workers start with (MALLOCS in benchmarks/common.py)")


def add_train(commands, shared) -> None:
    p = commands.add_parser("train", parents=[shared], help="a training step: JAX vs the PyTorch twin")
    p.add_argument("--config", help="a preset file, e.g. configs/design_40m.py")
    p.add_argument("--suite", action="store_true", help="the standard presets at sizes fitting the device")
    p.add_argument("overrides", nargs="*", help="section.field=value (with --suite: applied to every preset)")
    p.add_argument("--batch", type=positive, help="sequences per step (default 4; --config only)")
    p.add_argument("--seq", type=positive, help="tokens per sequence (default 256, or the context if shorter)")
    p.add_argument("--steps", type=positive, help="timed steps (default 10; 5 with --suite)")
    p.add_argument("--warmup", type=non_negative, default=2, help="untimed steps after the first (default 2)")
    p.add_argument("--repeats", type=positive, default=1, help="workers per mode, interleaved across modes; "
                   "each figure is their median (on a shared machine whose speed drifts)")
    add_dtype(p)
    p.add_argument("--modes", type=modes, default=MODES,
                   help="comma-separated: jit (JAX), eager, compile (PyTorch); default all three")
    p.add_argument("--layouts", action="store_true", help="JAX only, under each attention backend (attn_impl)")
    add_malloc(p)
    p.add_argument("--avx2", action="store_true", help="cap both frameworks' kernels at AVX2 (AVX2_ENV in "
                   "benchmarks/common.py): a laptop's picture on an AVX-512 CPU")


def add_others(commands, shared) -> None:
    p = commands.add_parser("loader", parents=[shared], help="data.py's loader vs raw memmap slicing")
    p.add_argument("--steps", type=positive, default=500, help="warm batches per measurement")
    p.add_argument("--cold-steps", type=positive, default=50, help="batches per measurement, page cache dropped")
    p.add_argument("--repeats", type=positive, default=3)
    p.add_argument("--batch", type=positive, default=64)
    p.add_argument("--seq", type=positive, default=1024)
    p.add_argument("--shard-tokens", type=positive, default=100_000_000, help="tokens in the random shard")
    p = commands.add_parser("decode", parents=[shared], help="sample.py's prefill and decode vs the bandwidth bound")
    p.add_argument("--config", help="a preset file (default: quickstart and design_40m)")
    p.add_argument("overrides", nargs="*", help="section.field=value")
    p.add_argument("--batches", type=positive_list, default=(1, 16), help="comma-separated batch sizes")
    p.add_argument("--prompt", type=positive, default=128, help="prompt tokens")
    p.add_argument("--new", type=positive, default=128, help="new tokens (at least 2)")
    p.add_argument("--repeats", type=positive, default=3)
    p.add_argument("--quantize", choices=quantize.SCHEMES, help="also time the same weights quantized")
    p.add_argument("--target", help="speculative decoding: a trained run to decode ...")
    p.add_argument("--draft", help="... with this smaller run drafting (same tokenizer)")
    p.add_argument("--lookahead", type=positive_list, default=(2, 4, 8), help="draft tokens per round")
    p = commands.add_parser("mesh", parents=[shared], help="train.py's step under dp and fsdp, simulated devices")
    p.add_argument("--config", help="a preset file (default configs/quickstart.py)")
    p.add_argument("overrides", nargs="*", help="section.field=value")
    p.add_argument("--batch", type=positive, default=8)
    p.add_argument("--seq", type=positive, default=256)
    p.add_argument("--steps", type=positive, default=5)
    p.add_argument("--warmup", type=non_negative, default=2)
    add_malloc(p)
    p = commands.add_parser("profile", parents=[shared], help="where a training step's time goes, per op category (JAX; --twin: and PyTorch)")
    p.add_argument("--config", help="a preset file (default configs/small_6x384.py)")
    p.add_argument("overrides", nargs="*", help="section.field=value")
    p.add_argument("--batch", type=positive, default=8)
    p.add_argument("--seq", type=positive, default=256)
    p.add_argument("--steps", type=positive, default=3, help="traced steps")
    p.add_argument("--warmup", type=non_negative, default=2)
    add_dtype(p)
    add_malloc(p)
    p.add_argument("--avx2", action="store_true", help="cap the kernels at AVX2 (AVX2_ENV in benchmarks/common.py)")
    p.add_argument("--twin", action="store_true", help="the PyTorch twin's eager step beside JAX's (CPU only)")
    p = commands.add_parser("ab", parents=[shared], help="JAX steps under several settings, paired in one process")
    p.add_argument("--config", help="a preset file (default configs/small_6x384.py)")
    p.add_argument("overrides", nargs="*", help="section.field=value, for every variant")
    p.add_argument("--variant", action="append", help="NAME or NAME:ITEM,ITEM (section.field=value or "
                   "xla_...=value); repeat it; the first is the baseline (default: one 'base')")
    p.add_argument("--batch", type=positive, default=8)
    p.add_argument("--seq", type=positive, default=256)
    p.add_argument("--rounds", type=positive, default=12, help="paired rounds, one step of every variant each")
    add_dtype(p)
    p.add_argument("--warmup", type=non_negative, default=2)
    add_malloc(p)


def parse_args(argv=None):
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shared = Parser(add_help=False)
    shared.add_argument("--json", help="write the rows to this file")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,loader,decode,mesh,profile,ab}")
    add_train(commands, shared)
    add_others(commands, shared)
    args, extra = parser.parse_known_args(argv)
    # Overrides may come after options too: `train --config F --steps 3 model.n_layers=2`.
    unknown = [item for item in extra if item.startswith("-") or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides += extra
    if args.command == "train":
        if args.suite and args.config:
            parser.error("train: give --config or --suite, not both")
        if not (args.config or args.suite or args.layouts):
            parser.error("train: give --config configs/NAME.py, --suite or --layouts")
        if not args.config and (args.batch or args.seq):
            parser.error("train: --batch and --seq go with --config; the suite's sizes are fixed "
                         "(SUITE in benchmarks/train_step.py)")
        args.steps = args.steps or (10 if args.config else 5)
    if args.command == "decode" and args.new < 2:
        parser.error("decode: --new must be at least 2 (one prefill token, then decoding)")
    if args.command == "decode" and bool(args.target) != bool(args.draft):
        parser.error("decode: --target and --draft go together (speculative decoding)")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        parser.error(f"--json {args.json}: its folder does not exist")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if hasattr(args, "malloc"):  # the commands that spawn workers: before any worker starts
        common.use_malloc(args.malloc)
    if getattr(args, "avx2", False):
        common.cap_at_avx2()
    mark = common.load_mark()
    try:
        rows = importlib.import_module(RUNNERS[args.command]).run(args)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    print("\n" + common.contention(mark))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
        print(f"wrote {len(rows)} rows to {args.json}")


if __name__ == "__main__":
    main()
