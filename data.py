"""Token shards, tokenizers and the training input pipeline (see notes/data.md).

Shards are FineWeb10B-format .bin files (a 256 x int32 header, then the tokens), memmapped and
never loaded whole. `train_batches` is a grain pipeline whose order is a pure function of
(seed, step), so resuming needs only the step. The command line builds shards:
`python data.py prepare|fineweb|inspect|bench ...`.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import http.client
import importlib.metadata
import itertools
import json
import math
import multiprocessing
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from functools import lru_cache
from pathlib import Path

import grain
import numpy as np
import tiktoken
import tiktoken.load

from configs.base import Config, ConfigError, DataConfig, ModelConfig, TrainConfig

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
# magic -> (version, token dtype). The uint32 pair is llm.c's, for vocabularies over 65,535.
FORMATS = {20240520: (1, np.dtype(np.uint16)), 20240801: (7, np.dtype(np.uint32))}
MAX_SHARD_TOKENS = 2**31 - 1     # the header stores the count as int32
META_FILE = "tokenizer.json"
EOT_TEXT = "<|endoftext|>"
GPT2_SPLIT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
FINEWEB_URL = "https://huggingface.co/datasets/kjj0/fineweb10B-gpt2/resolve/main/"
FINEWEB_TRAIN_SHARDS = 103
FINEWEB_META = {"tokenizer": "gpt2", "eot": 50256, "n_vocab": 50257}


class DataError(ConfigError):
    """A one-line data problem naming the file or setting at fault. A ConfigError, so entry points
    that already print ConfigError one-liners handle bad data the same way."""


class TruncatedShard(DataError):
    """A shard shorter than its header says: a partial download or an interrupted copy."""


class TokenizerUnavailable(DataError):
    """The tokenizer exists but cannot be loaded here (gpt2 with no network and no tiktoken cache)."""


# --- Shards ---------------------------------------------------------------------------------------


def write_shard(path, tokens) -> None:
    """Write a shard atomically (temp file + rename); uint16 unless a token exceeds 65,535."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not (tokens.size and np.issubdtype(tokens.dtype, np.integer)):
        raise DataError(f"{path}: tokens must be a non-empty 1-D integer array, "
                        f"got {tokens.dtype} {tokens.shape}")
    if tokens.size > MAX_SHARD_TOKENS or tokens.min() < 0 or tokens.max() >= 2**32:
        raise DataError(f"{path}: a shard holds at most {MAX_SHARD_TOKENS:,} token ids in [0, 2**32)")
    magic = 20240520 if tokens.max() <= np.iinfo(np.uint16).max else 20240801
    version, dtype = FORMATS[magic]
    header = np.zeros(HEADER_INTS, np.int32)
    header[:3] = magic, version, tokens.size
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.astype(dtype, copy=False).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def shard_header(path) -> tuple[np.dtype, int]:
    """Validate a shard's header against its file size; returns (token dtype, token count)."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise TruncatedShard(f"{path} is truncated: {size} bytes, "
                             f"shorter than the {HEADER_BYTES}-byte header")
    magic, version, count = (int(v) for v in np.fromfile(path, np.int32, 3))
    if magic not in FORMATS:
        valid = ", ".join(f"{m} ({d.name})" for m, (_, d) in FORMATS.items())
        raise DataError(f"{path}: magic {magic} is not a token shard's; expected one of {valid}")
    expected_version, dtype = FORMATS[magic]
    if version != expected_version:
        raise DataError(f"{path}: version {version} is not supported for magic {magic}; "
                        f"expected {expected_version}")
    body = size - HEADER_BYTES
    if body < count * dtype.itemsize:
        raise TruncatedShard(f"{path} is truncated: the header promises {count:,} tokens "
                             f"({count * dtype.itemsize:,} bytes) but only {body:,} bytes follow it")
    if count <= 0 or body != count * dtype.itemsize:
        raise DataError(f"{path}: the header's token count {count:,} disagrees with the file size ({body:,} "
                        f"bytes after the header = {body / dtype.itemsize:,.1f} {dtype.name} tokens)")
    return dtype, count


def read_shard(path) -> np.memmap:
    """A read-only memmap over a validated shard's tokens."""
    dtype, count = shard_header(path)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))


def find_shards(data_dir, split: str) -> list[Path]:
    """The `split` ("train" or "val") shards of a directory, sorted by name."""
    return sorted(Path(data_dir).glob(f"*{split}_*.bin"))


# --- Tokenizers -----------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def get_tokenizer(name: str) -> tiktoken.Encoding:
    """A tiktoken.Encoding for "gpt2", "bytes" or the path of a .tiktoken ranks file."""
    if name == "bytes":
        # No merges, so any split of the text encodes to its UTF-8 bytes; long pieces are faster.
        return tiktoken.Encoding(name="bytes", pat_str=r"[\s\S]{1,256}",
                                 mergeable_ranks={bytes([b]): b for b in range(256)},
                                 special_tokens={EOT_TEXT: 256})
    if name == "gpt2":
        try:
            return tiktoken.get_encoding("gpt2")
        except OSError as e:
            raise TokenizerUnavailable(f"tokenizer 'gpt2' needs network access once (or a filled "
                                       f"TIKTOKEN_CACHE_DIR): {str(e).splitlines()[0][:160]}") from None
    if name.endswith(".tiktoken") and Path(name).is_file():
        return _ranks_file_encoding(name)
    raise DataError(f"unknown tokenizer {name!r}; expected 'gpt2', 'bytes' or the path of an existing "
                    f".tiktoken ranks file")


def _ranks_file_encoding(path: str) -> tiktoken.Encoding:
    """A ranks file carries no split pattern or special tokens: use GPT-2's split, and put
    end-of-text after the last rank."""
    try:
        ranks = tiktoken.load.load_tiktoken_bpe(path)
    except (ValueError, IndexError) as e:
        raise DataError(f"{path} is not a .tiktoken ranks file (lines of '<base64 token> <rank>'): "
                        f"{e}") from None
    if not ranks:
        raise DataError(f"{path} is an empty .tiktoken ranks file")
    return tiktoken.Encoding(name=Path(path).stem, pat_str=GPT2_SPLIT, mergeable_ranks=ranks,
                             special_tokens={EOT_TEXT: max(ranks.values()) + 1})


def read_meta(data_dir) -> dict:
    """The tokenizer record written beside the shards: {"tokenizer", "eot", "n_vocab"}."""
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        raise DataError(f"{path} is missing; shards made by `python data.py prepare` or `fineweb` carry it")
    return json.loads(path.read_text())


def load_tokenizer(data_dir) -> tiktoken.Encoding:
    """The encoding that wrote the shards in `data_dir`; a ranks file is stored beside them."""
    name = read_meta(data_dir)["tokenizer"]
    return get_tokenizer(name if name in ("gpt2", "bytes") else str(Path(data_dir) / name))


def _write_meta(data_dir: Path, name: str, enc: tiktoken.Encoding) -> None:
    meta = {"tokenizer": name, "eot": enc.eot_token, "n_vocab": enc.n_vocab}
    (data_dir / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")


# --- The loader -----------------------------------------------------------------------------------

_M64 = 2**64
_ROUND_KEYS = [np.uint64((r + 1) * 0x9E3779B97F4A7C15 % _M64) for r in range(4)]


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a fast, well-mixed hash of uint64 arrays (the products wrap)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _feistel(x: np.ndarray, keys: np.ndarray, a: int, b: int) -> np.ndarray:
    """A keyed bijection of range(a * b): a Feistel network over the digits (x // b, x % b)."""
    left, right, p, q = x // np.uint64(b), x % np.uint64(b), a, b
    for round_key in _ROUND_KEYS:
        f = _mix(right ^ keys ^ round_key) % np.uint64(p)
        left, right, p, q = right, (left + f) % np.uint64(p), q, p
    return left * np.uint64(q) + right


def shuffled_windows(positions: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Window id at each global position of the stream: epoch e = position // n is a permutation
    of range(n) keyed by (seed, e). Each id is computed on its own, vectorized, so no permutation
    is stored and any step costs O(batch): grain's per-index shuffle is a Python call per window."""
    epoch, index = np.divmod(np.asarray(positions, np.uint64), np.uint64(n))
    keys = _mix(_mix(epoch) ^ np.uint64(seed % _M64))
    a = math.isqrt(n - 1) + 1
    b = -(-n // a)              # a * b >= n and a * b - n < a: cycle walking rarely loops
    ids = _feistel(index, keys, a, b)
    while (outside := ids >= n).any():
        ids[outside] = _feistel(ids[outside], keys[outside], a, b)
    return ids.astype(np.int64)


def _doc_starts(tokens: np.ndarray, window: int, eot: int) -> np.ndarray:
    """Greedy windows that begin at end-of-text tokens: the next starts at the first end-of-text at
    or after the previous window's last token, so no target repeats within an epoch; the rest of a
    document longer than a window is skipped."""
    eots = np.flatnonzero(tokens == eot)
    eots = eots[eots + window <= len(tokens)]
    following = np.searchsorted(eots, eots + window - 1).tolist()
    picked, i = [], 0
    while i < len(eots):
        picked.append(i)
        i = following[i]
    return eots[picked]


class WindowSource:
    """grain random-access source over memmapped shards: window i is `window` consecutive tokens
    of one shard, numbered shard by shard. Windows never cross shards; consecutive windows share
    one token, so each token is a target once per epoch."""

    def __init__(self, shards: list[np.ndarray], window: int, eot: int | None = None):
        self.window = window
        # Plain ndarray views of the memmaps: slicing np.memmap costs several times more per window.
        self._tokens = [np.asarray(s).view(np.ndarray) for s in shards]
        self._starts = [None if eot is None else _doc_starts(t, window, eot) for t in self._tokens]
        counts = [(len(t) - 1) // (window - 1) if s is None else len(s)
                  for t, s in zip(self._tokens, self._starts)]
        self._offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, index: int) -> np.ndarray:
        return self.read([index])[0]

    def read(self, ids) -> np.ndarray:
        """Windows `ids` as one int32 [len(ids), window] array: one slice copy per window."""
        ids = np.asarray(ids, np.int64)
        shards = np.searchsorted(self._offsets, ids, side="right") - 1
        local = ids - self._offsets[shards]
        out = np.empty((len(ids), self.window), np.int32)
        for row, (s, j) in enumerate(zip(shards.tolist(), local.tolist())):
            start = j * (self.window - 1) if self._starts[s] is None else int(self._starts[s][j])
            out[row] = self._tokens[s][start:start + self.window]
        return out


class StepBatches(grain.MapDataset):
    """grain dataset whose element `step` is this process's rows of the global batch at `step`,
    read from the window source in one batched read. Row r of step s is stream position
    s * batch_size + r, so the global batch is the same for any process count and any step can
    be read without the ones before it."""

    def __init__(self, windows: WindowSource, batch_size: int, rows: np.ndarray, seed: int):
        super().__init__()
        self._windows, self._batch_size, self._rows, self._seed = windows, batch_size, rows, seed

    def __len__(self) -> int:
        return sys.maxsize          # epochs follow one another without end

    def __getitem__(self, step):
        if isinstance(step, slice):
            return self.slice(step)
        positions = step * self._batch_size + self._rows
        return self._windows.read(shuffled_windows(positions, len(self._windows), self._seed))


def _inputs_targets(windows: np.ndarray) -> dict:
    """Contiguous copies: jax would make them on the training thread; here grain's threads do."""
    return {"inputs": np.ascontiguousarray(windows[:, :-1]), "targets": np.ascontiguousarray(windows[:, 1:])}


def _local_rows(cfg: Config, process_index: int, process_count: int) -> np.ndarray:
    """This process's contiguous block of global-batch rows, the layout
    jax.make_array_from_process_local_data assembles."""
    batch = cfg.train.batch_size
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} must be in [0, process_count={process_count})")
    if batch % process_count:
        raise DataError(f"train.batch_size={batch} is not divisible by process_count={process_count}; "
                        f"use a multiple of {process_count}")
    local = batch // process_count
    return np.arange(process_index * local, (process_index + 1) * local)


def _check_vocab(path: Path, tokens: np.ndarray, vocab_size: int) -> None:
    """Spot-check 16 spread chunks so a shard/model vocabulary mismatch fails at load instead of
    indexing past the embedding on device; `inspect --full` scans everything."""
    chunk = 4096
    offsets = np.linspace(0, max(len(tokens) - chunk, 0), 16, dtype=np.int64)
    top = max(int(tokens[o:o + chunk].max()) for o in offsets)
    if top >= vocab_size:
        raise DataError(f"{path}: token id {top} >= model.vocab_size={vocab_size}; set model.vocab_size "
                        f"to at least {top + 1} or use shards made with this model's tokenizer")


def window_source(cfg: Config, split: str) -> WindowSource:
    """Validated windows of model.seq_len + 1 tokens over the `split` shards of data.path."""
    data_dir = cfg.data.path
    paths = find_shards(data_dir, split)
    if not paths:
        raise DataError(f"data.path={data_dir!r} has no {split} shards (*{split}_*.bin); make them with "
                        f"`python data.py prepare --input stdlib --tokenizer bytes --out {data_dir}`")
    shards = [read_shard(p) for p in paths]
    for path, tokens in zip(paths, shards):
        _check_vocab(path, tokens, cfg.model.vocab_size)
    window = cfg.model.seq_len + 1
    eot = read_meta(data_dir)["eot"] if cfg.data.doc_aligned else None
    source = WindowSource(shards, window, eot)
    if not len(source):
        longest = max(len(s) for s in shards)
        what = "an end-of-text-aligned window" if eot is not None and longest >= window else "a window"
        raise DataError(f"model.seq_len={cfg.model.seq_len} needs {what} of {window:,} tokens, but the "
                        f"{split} shards in {data_dir} hold at most {longest:,} tokens each")
    return source


def train_batches(cfg: Config, start_step: int = 0, process_index: int = 0, process_count: int = 1):
    """Iterator over {"inputs", "targets"}: int32 [train.batch_size // process_count, model.seq_len]
    for steps start_step, start_step + 1, ...; a pure function of (train.seed, step)."""
    if start_step < 0:
        raise DataError(f"start_step={start_step} must be >= 0")
    rows = _local_rows(cfg, process_index, process_count)
    windows = window_source(cfg, "train")
    dataset = (StepBatches(windows, cfg.train.batch_size, rows, cfg.train.seed)
               .slice(slice(start_step, None))
               .map(_inputs_targets))
    options = grain.ReadOptions(num_threads=cfg.data.read_threads, prefetch_buffer_size=cfg.data.prefetch)
    return iter(dataset.to_iter_dataset(options))


def val_batches(cfg: Config, process_index: int = 0, process_count: int = 1) -> list[dict]:
    """The first data.val_tokens // model.seq_len validation windows in order, whatever the batch
    size or process count: batched by train.batch_size, with the last batch's missing rows filled
    by window 0 and weighted out by "mask" (float32 [rows, seq_len], 1 for real tokens)."""
    rows = _local_rows(cfg, process_index, process_count)
    windows = window_source(cfg, "val")
    batch, seq_len = cfg.train.batch_size, cfg.model.seq_len
    wanted = cfg.data.val_tokens // seq_len
    if wanted < 1:
        raise DataError(f"data.val_tokens={cfg.data.val_tokens:,} is less than one window "
                        f"(model.seq_len={seq_len:,} tokens)")
    if wanted > len(windows):
        raise DataError(f"data.val_tokens={cfg.data.val_tokens:,} needs {wanted:,} windows but the val "
                        f"shards in {cfg.data.path} hold {len(windows):,}; lower data.val_tokens")
    batches = []
    for step in range(-(-wanted // batch)):
        ids = step * batch + rows
        real = ids < wanted
        batches.append(_inputs_targets(windows.read(np.where(real, ids, 0))))
        batches[-1]["mask"] = np.repeat(real[:, None], seq_len, axis=1).astype(np.float32)
    return batches


def _token_byte_lengths(enc: tiktoken.Encoding) -> np.ndarray:
    """UTF-8 bytes per token id; special tokens (end-of-text) carry no text."""
    lengths = np.zeros(enc.n_vocab, np.int64)
    for token in enc.token_byte_values():
        lengths[enc.encode_single_token(token)] = len(token)
    return lengths


def val_bytes(cfg: Config) -> int | None:
    """Text bytes behind the global validation targets (for bits per byte); None when the
    tokenizer cannot be loaded here."""
    try:
        lengths = _token_byte_lengths(load_tokenizer(cfg.data.path))
    except TokenizerUnavailable:
        return None
    targets = np.concatenate([b["targets"][b["mask"] > 0] for b in val_batches(cfg)])
    if targets.max() >= len(lengths):
        raise DataError(f"{cfg.data.path}: val token id {targets.max()} is outside its tokenizer "
                        f"({META_FILE}: n_vocab={len(lengths)})")
    return int(lengths[targets].sum())


# --- prepare: text files to shards ----------------------------------------------------------------


def stdlib_files() -> tuple[list[Path], Path]:
    """The running Python's standard-library sources (no site-packages), and their root."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py")
             if p.is_file() and not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix()), root


def input_files(spec: str) -> tuple[list[Path], Path]:
    """Files named by --input (a glob, or "stdlib") in a deterministic order, and their common root."""
    if spec == "stdlib":
        files, root = stdlib_files()
    else:
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        if not files:
            raise DataError(f"--input {spec!r} matches no files; give a glob such as 'texts/**/*.txt' "
                            f"or 'stdlib'")
        root = Path(os.path.commonpath([p.resolve().parent for p in files]))
        files = [p.resolve() for p in files]
    if len(files) < 2:
        raise DataError(f"--input {spec!r} matches {len(files)} file; need at least 2, since validation "
                        f"holds out whole files")
    return files, root


def split_files(files: list[Path], root: Path, val_fraction: float) -> tuple[list[Path], list[Path]]:
    """Hold out whole files for validation: files in order of a hash of their path under `root`
    until they hold val_fraction of the bytes (at least one file, never all). Hashing keeps the
    choice stable when files are added, and independent of the machine's directory order."""
    if not 0 < val_fraction < 1:
        raise DataError(f"--val-fraction {val_fraction} must be between 0 and 1 (exclusive)")
    sizes = {f: f.stat().st_size for f in files}
    target = val_fraction * sum(sizes.values())
    held, val = 0, set()
    for f in sorted(files, key=lambda f: zlib.crc32(f.relative_to(root).as_posix().encode()))[:-1]:
        if val and held >= target:
            break
        val.add(f)
        held += sizes[f]
    return [f for f in files if f not in val], [f for f in files if f in val]


def _encode_file(task: tuple[str, str]) -> tuple[np.ndarray, int]:
    """Worker: one file is one document, prefixed by end-of-text. Returns (tokens, bytes read)."""
    path, tokenizer = task
    enc = get_tokenizer(tokenizer)
    data = Path(path).read_bytes()
    # Undecodable bytes (a few stdlib files are Latin-1) become U+FFFD rather than failing the run.
    # disallowed_special=() encodes a literal "<|endoftext|>" in the text as ordinary text.
    ids = enc.encode_to_numpy(data.decode("utf-8", errors="replace"), disallowed_special=())
    dtype = np.uint16 if enc.n_vocab <= 2**16 else np.uint32
    return np.concatenate([[enc.eot_token], ids]).astype(dtype), len(data)


def _default_workers(total_bytes: int) -> int:
    """One process per 64 MB of text, up to the cores: starting a spawn pool costs 1-2 s, more
    than tokenizing the 31 MB stdlib corpus in-process takes. The output does not depend on it."""
    return int(max(1, min(os.cpu_count() or 1, total_bytes // (64 << 20))))


@contextlib.contextmanager
def _mapper(workers: int):
    """An ordered map over a spawn-safe process pool; in-process for one worker."""
    if workers == 1:
        yield map
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield lambda fn, tasks: pool.imap(fn, tasks, chunksize=32)


def _progress(results, total_bytes: int):
    """Pass (tokens, bytes) results through, drawing a stderr bar with tokens/s and an ETA."""
    start = last = time.perf_counter()
    done = tokens = 0
    for item in results:
        tokens, done = tokens + len(item[0]), done + item[1]
        now = time.perf_counter()
        if now - last > 0.25 or done >= total_bytes:
            last, elapsed, frac = now, max(now - start, 1e-9), done / max(total_bytes, 1)
            eta = f"{elapsed * (1 - frac) / frac:4.0f}s" if frac > 0.01 else "  --"
            bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
            sys.stderr.write(f"\rtokenizing [{bar}] {frac:6.1%} {tokens:,} tokens "
                             f"{tokens / elapsed / 1e6:.2f}M tok/s ETA {eta}")
        yield item
    sys.stderr.write("\n")


def _cut_shards(arrays, shard_tokens: int):
    """Concatenate a stream of token arrays and cut it into shards of exactly shard_tokens (the
    last may be shorter). Documents may straddle shards, as in FineWeb's."""
    pending, size = [], 0
    for array in arrays:
        pending.append(array)
        size += len(array)
        while size >= shard_tokens:
            whole = np.concatenate(pending)
            yield whole[:shard_tokens]
            pending, size = [whole[shard_tokens:]], size - shard_tokens
    if size:
        yield np.concatenate(pending)


def _write_split(results, split: str, shard_tokens: int, staging: Path) -> int:
    """Write one split's shards; returns its token count."""
    written = 0
    for i, shard in enumerate(_cut_shards((tokens for tokens, _ in results), shard_tokens)):
        write_shard(staging / f"{split}_{i:06d}.bin", shard)
        written += len(shard)
    return written


def _stage_tokenizer(staging: Path, tokenizer: str, enc: tiktoken.Encoding) -> str:
    """Record the tokenizer beside the shards; a ranks file is copied so the directory stands alone."""
    stored = tokenizer if tokenizer in ("gpt2", "bytes") else Path(tokenizer).name
    if stored != tokenizer:
        shutil.copyfile(tokenizer, staging / stored)
    _write_meta(staging, stored, enc)
    return stored


def _publish(staging: Path, out: Path) -> None:
    """Move a finished dataset into `out`, dropping shards an earlier prepare left there."""
    new = {p.name for p in staging.iterdir()}
    for old in find_shards(out, "train") + find_shards(out, "val"):
        if old.name not in new:
            old.unlink()
    for path in staging.iterdir():
        os.replace(path, out / path.name)


def prepare(input_spec: str, tokenizer: str, out, val_fraction: float = 0.05,
            shard_tokens: int = 100_000_000, workers: int | None = None) -> None:
    """Tokenize text files into train/val shards in `out`. Shards are staged in a hidden directory
    inside `out` and moved in only once all are written, so a failed run leaves no partial shard
    or partial dataset."""
    enc = get_tokenizer(tokenizer)
    if not 0 < shard_tokens <= MAX_SHARD_TOKENS:
        raise DataError(f"--shard-tokens {shard_tokens} must be in [1, {MAX_SHARD_TOKENS:,}]")
    if workers is not None and workers < 1:
        raise DataError(f"--workers {workers} must be >= 1")
    files, root = input_files(input_spec)
    train, val = split_files(files, root, val_fraction)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out))
    try:
        tasks = [(str(f), tokenizer) for f in val + train]
        total_bytes = sum(f.stat().st_size for f in files)
        with _mapper(workers or _default_workers(total_bytes)) as imap:
            results = _progress(imap(_encode_file, tasks), total_bytes)
            val_tokens = _write_split(itertools.islice(results, len(val)), "val", shard_tokens, staging)
            train_tokens = _write_split(results, "train", shard_tokens, staging)
        stored = _stage_tokenizer(staging, tokenizer, enc)
        _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"{out}: {train_tokens:,} train tokens from {len(train)} files, {val_tokens:,} val tokens "
          f"from {len(val)} held-out files, tokenizer {stored!r}")


# --- fineweb: download the GPT-2-tokenized FineWeb10B shards --------------------------------------


def _complete(part: Path) -> bool:
    """Does a partial download hold the whole shard its header describes? Raises if it holds more."""
    if not part.exists() or part.stat().st_size < HEADER_BYTES:
        return False
    try:
        shard_header(part)
        return True
    except TruncatedShard:
        return False
    except DataError as e:
        part.unlink()
        raise DataError(f"download of {part.name} failed its size check and was deleted: {e}") from None


def _fetch(url: str, part: Path, open_url) -> None:
    """Append the rest of `url` to `part`, resuming with an HTTP Range request."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with open_url(request, timeout=60) as response:
        if have and getattr(response, "status", None) != 206:
            have = 0            # the server ignored the range: start over
        with open(part, "ab" if have else "wb") as f:
            shutil.copyfileobj(response, f, 1 << 20)


def download(url: str, dest, open_url=urllib.request.urlopen, retries: int = 5, backoff: float = 2.0) -> Path:
    """Download a shard to `dest` via `dest.part`: resumes partial files, retries transient errors
    with exponential backoff, and checks the size against the shard header before the rename."""
    dest = Path(dest)
    if dest.exists():
        shard_header(dest)
        return dest
    part = dest.with_name(dest.name + ".part")
    attempts = 0
    while not _complete(part):
        if attempts > retries:
            raise DataError(f"{url}: still incomplete after {attempts} attempts; rerun to resume {part}")
        if attempts:
            time.sleep(backoff * 2 ** (attempts - 1))
        attempts += 1
        try:
            _fetch(url, part, open_url)
        except urllib.error.HTTPError as e:
            if e.code < 500 and e.code != 429:
                raise DataError(f"{url}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError):
            pass                # transient: the next attempt resumes from what arrived
    os.replace(part, dest)
    return dest


def fineweb(train_shards: int, out, base_url: str = FINEWEB_URL, **download_options) -> None:
    """The FineWeb10B val shard and the first `train_shards` train shards (100M GPT-2 tokens each)."""
    if not 1 <= train_shards <= FINEWEB_TRAIN_SHARDS:
        raise DataError(f"--train-shards {train_shards} must be in [1, {FINEWEB_TRAIN_SHARDS}]")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).write_text(json.dumps(FINEWEB_META, indent=1) + "\n")
    names = ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, train_shards + 1)]
    for i, name in enumerate(names):
        print(f"[{i + 1}/{len(names)}] {name}", file=sys.stderr)
        download(base_url + name, out / name, **download_options)


# --- inspect --------------------------------------------------------------------------------------


def _token_counts(shards: list[np.ndarray], n_vocab: int, full: bool) -> tuple[np.ndarray, int]:
    """Token id histogram over every token (full) or the first 1M tokens of each shard."""
    counts = np.zeros(n_vocab, np.int64)
    for tokens in shards:
        end = len(tokens) if full else min(len(tokens), 1 << 20)
        for start in range(0, end, 1 << 24):
            counts += np.bincount(tokens[start:min(start + (1 << 24), end)], minlength=n_vocab)[:n_vocab]
    return counts, int(counts.sum())


def inspect_shards(data_dir, full: bool = False) -> None:
    """Print per-shard token counts, a token histogram summary and a decoded sample."""
    data_dir = Path(data_dir)
    meta = read_meta(data_dir)
    paths = find_shards(data_dir, "train") + find_shards(data_dir, "val")
    if not paths:
        raise DataError(f"{data_dir} has no shards (*train_*.bin, *val_*.bin)")
    shards = [read_shard(p) for p in paths]
    print(f"{data_dir}: tokenizer {meta['tokenizer']!r}, n_vocab {meta['n_vocab']:,}, "
          f"end-of-text {meta['eot']}")
    for path, tokens in zip(paths, shards):
        print(f"  {path.name:<28} {tokens.dtype.name:<6} {len(tokens):>15,} tokens")
    for path, tokens in zip(paths, shards) if full else ():
        if (top := int(tokens.max())) >= meta["n_vocab"]:
            raise DataError(f"{path}: token id {top} >= n_vocab={meta['n_vocab']} of its tokenizer "
                            f"({META_FILE})")
    counts, total = _token_counts(shards, meta["n_vocab"], full)
    print(f"histogram over {'all' if full else 'a sample of'} {total:,} tokens: {np.count_nonzero(counts):,} "
          f"distinct ids, end-of-text {counts[meta['eot']] / total:.3%}")
    try:
        enc = load_tokenizer(data_dir)
    except TokenizerUnavailable as e:
        print(f"decoded sample unavailable: {e}")
        return
    common = np.argsort(counts)[::-1][:10]
    print("most frequent: " + ", ".join(f"{enc.decode([int(t)])!r} {counts[t] / total:.1%}" for t in common))
    print(f"decoded sample ({paths[0].name}, first 400 tokens):")
    print(enc.decode(shards[0][:400].tolist()))


# --- bench ----------------------------------------------------------------------------------------


def _raw_batches(tokens: np.memmap, batch: int, seq_len: int, seed: int = 0):
    """The baseline: random windows sliced straight from the memmap, stacked, as int32."""
    rng = np.random.default_rng(seed)
    n_windows = (len(tokens) - 1) // seq_len
    while True:
        starts = rng.integers(0, n_windows, batch) * seq_len
        windows = np.stack([tokens[s:s + seq_len + 1] for s in starts.tolist()]).astype(np.int32)
        yield _inputs_targets(windows)


def _rate(make_batches, steps: int, tokens_per_step: int, drop: Path | None = None) -> float:
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


def bench(steps: int = 500, cold_steps: int = 50, repeats: int = 3, batch: int = 64, seq_len: int = 1024):
    """Loader tokens/s vs raw memmap slicing on a 200 MB shard, cold (page cache dropped) and warm;
    the two alternate `repeats` times and the medians are reported."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train_000000.bin"
        write_shard(path, np.random.default_rng(0).integers(0, 50257, 100_000_000, dtype=np.uint16))
        cfg = Config(model=ModelConfig(seq_len=seq_len), data=DataConfig(path=tmp),
                     train=TrainConfig(batch_size=batch))
        raw, loader = (lambda: _raw_batches(read_shard(path), batch, seq_len)), (lambda: train_batches(cfg))
        rows = []
        for label, n, drop in (("cold", cold_steps, path), ("warm", steps, None)):
            rates = np.median([[_rate(make, n, batch * seq_len, drop) for make in (raw, loader)]
                               for _ in range(repeats)], axis=0)
            rows.append(f"| {label} ({n} steps) | {rates[0] / 1e6:,.0f}M | {rates[1] / 1e6:,.0f}M "
                        f"| {rates[1] / rates[0]:.2f}x |")
    from bench import cpu_name  # benchmark headers share one CPU description
    print(f"data.py bench, {datetime.date.today()}: {cpu_name()}, "
          f"Python {platform.python_version()}, numpy {np.__version__}, "
          f"grain {importlib.metadata.version('grain')}, batch {batch} x {seq_len}, 200 MB uint16 shard, "
          f"read_threads={cfg.data.read_threads}, prefetch={cfg.data.prefetch}, median of {repeats}\n")
    print("| page cache | raw memmap slicing (tokens/s) | loader (tokens/s) | loader / raw |")
    print("|---|---|---|---|")
    print("\n".join(rows))


# --- command line ---------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("fineweb", help="download GPT-2-tokenized FineWeb10B shards")
    p.add_argument("--train-shards", type=int, required=True,
                   help=f"1..{FINEWEB_TRAIN_SHARDS}, 100M tokens each")
    p.add_argument("--out", required=True)
    p = commands.add_parser("prepare", help="tokenize text files into shards")
    p.add_argument("--input", required=True, help="a glob of text files, or 'stdlib' (this Python's sources)")
    p.add_argument("--tokenizer", required=True, help="gpt2 | bytes | PATH.tiktoken")
    p.add_argument("--out", required=True)
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of bytes held out, as whole files")
    p.add_argument("--shard-tokens", type=int, default=100_000_000)
    p.add_argument("--workers", type=int, default=None,
                   help="processes (default: 1 per 64 MB of text, up to the cores)")
    p = commands.add_parser("inspect", help="summarize a directory of shards")
    p.add_argument("dir")
    p.add_argument("--full", action="store_true", help="scan every token, not a sample")
    commands.add_parser("bench", help="loader tokens/s vs raw memmap slicing")
    return parser


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    try:
        if args.command == "fineweb":
            fineweb(args.train_shards, args.out)
        elif args.command == "prepare":
            prepare(args.input, args.tokenizer, args.out, args.val_fraction, args.shard_tokens, args.workers)
        elif args.command == "inspect":
            inspect_shards(args.dir, args.full)
        else:
            bench()
    except ConfigError as e:
        raise SystemExit(f"data.py {args.command}: error: {e}") from None


if __name__ == "__main__":
    main()
