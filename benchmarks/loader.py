"""data.py's training loader against the simplest possible reader, raw memmap slicing, on one
random uint16 shard, cold (page cache dropped for the shard) and warm: `python bench.py loader`.
The two alternate `repeats` times and the medians are reported."""
from __future__ import annotations

import importlib.metadata
import os
import tempfile
import time
from pathlib import Path

import numpy as np

import data
from benchmarks import common
from cli import format_table
from configs.base import Config, DataConfig, ModelConfig, TrainConfig

VOCAB = 50257   # GPT-2's: uint16 tokens, as in FineWeb shards


def raw_batches(tokens: np.memmap, batch: int, seq_len: int, seed: int = 0):
    """The baseline: random windows sliced straight from the memmap, stacked as int32, split into
    contiguous inputs and targets (the same copies the loader makes)."""
    rng = np.random.default_rng(seed)
    n_windows = (len(tokens) - 1) // seq_len
    while True:
        starts = rng.integers(0, n_windows, batch) * seq_len
        windows = np.stack([tokens[s:s + seq_len + 1] for s in starts.tolist()]).astype(np.int32)
        yield {"inputs": np.ascontiguousarray(windows[:, :-1]), "targets": np.ascontiguousarray(windows[:, 1:])}


def rate(make_batches, steps: int, tokens_per_step: int, drop: Path | None = None) -> float:
    """Tokens/s over `steps` batches of a fresh iterator (so no earlier prefetch counts); `drop`
    evicts that file from the page cache first (cold)."""
    batches = make_batches()
    if drop is not None:
        fd = os.open(drop, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    start = time.perf_counter()
    for _ in range(steps):
        next(batches)
    return steps * tokens_per_step / (time.perf_counter() - start)


def measure(shard: Path, cfg: Config, args) -> list[dict]:
    """Cold and warm rows: the median tokens/s of raw slicing and of the loader."""
    batch, seq = cfg.train.batch_size, cfg.model.seq_len
    makers = (lambda: raw_batches(data.read_shard(shard), batch, seq), lambda: data.train_batches(cfg))
    rows = []
    for cache, steps, drop in (("cold", args.cold_steps, shard), ("warm", args.steps, None)):
        rates = np.median([[rate(make, steps, batch * seq, drop) for make in makers]
                           for _ in range(args.repeats)], axis=0)
        rows.append({"page_cache": cache, "steps": steps, "raw_tokens_per_s": float(rates[0]),
                     "loader_tokens_per_s": float(rates[1])})
    return rows


def run(args) -> list[dict]:
    """`bench.py loader`: writes the shard to a temporary folder, then measures."""
    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp) / "train_000000.bin"
        data.write_shard(shard, np.random.default_rng(0).integers(0, VOCAB, args.shard_tokens, dtype=np.uint16))
        cfg = Config(model=ModelConfig(vocab_size=VOCAB, seq_len=args.seq), data=DataConfig(path=tmp),
                     train=TrainConfig(batch_size=args.batch))
        rows = measure(shard, cfg, args)
    print(common.header("loader", common.hardware(frameworks=()),
                        f"numpy {np.__version__}, grain {importlib.metadata.version('grain')} · batch {args.batch} "
                        f"x {args.seq}, one {args.shard_tokens * 2 / 1e6:,.1f} MB uint16 shard · "
                        f"data.read_threads={cfg.data.read_threads}, data.prefetch={cfg.data.prefetch} · "
                        f"median of {args.repeats}"))
    table = [("page cache", "steps", "raw memmap slicing (tokens/s)", "loader (tokens/s)", "loader / raw")]
    table += [(r["page_cache"], r["steps"], f"{r['raw_tokens_per_s'] / 1e6:,.1f}M",
               f"{r['loader_tokens_per_s'] / 1e6:,.1f}M", f"{r['loader_tokens_per_s'] / r['raw_tokens_per_s']:.2f}x")
              for r in rows]
    print(format_table(table, right=range(1, 5)))
    return rows
