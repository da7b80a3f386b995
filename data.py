"""Token shards and the training input pipeline (see notes/data.md).

Shards are FineWeb10B-format .bin files (a 256 x int32 header, then the tokens), memmapped and
never loaded whole. `train_batches` is a grain pipeline whose order is a pure function of
(seed, step), so resuming needs only the step. corpus.py builds, downloads and inspects shards.
"""
from __future__ import annotations

import math
import os
import sys
import tempfile
from pathlib import Path

import grain
import numpy as np
import tiktoken

import tokenizer
from configs.base import Config, ConfigError

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
# magic -> (version, token dtype). The uint32 pair is llm.c's, for vocabularies over 65,535.
FORMATS = {20240520: (1, np.dtype(np.uint16)), 20240801: (7, np.dtype(np.uint32))}
MAX_SHARD_TOKENS = 2**31 - 1     # the header stores the count as int32


class DataError(ConfigError):
    """A one-line data problem naming the file or setting at fault. A ConfigError, so entry points
    that already print ConfigError one-liners handle bad data the same way."""


class TruncatedShard(DataError):
    """A shard shorter than its header says: a partial download or an interrupted copy."""


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
        with os.fdopen(fd, "wb") as sink:
            sink.write(header.tobytes())
            sink.write(tokens.astype(dtype, copy=False).tobytes())
            sink.flush()
            os.fsync(sink.fileno())
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
    magic, version, count = (int(value) for value in np.fromfile(path, np.int32, 3))
    if magic not in FORMATS:
        valid = ", ".join(f"{known} ({dtype.name})" for known, (_, dtype) in FORMATS.items())
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
    one token, so each token is a target once per epoch. Every read checks its ids against
    `vocab_size` (a max over the batch): on device, an id past the embedding is read silently."""

    def __init__(self, shards: list[np.ndarray], window: int, eot: int | None, vocab_size: int, paths: list):
        self.window, self.vocab_size, self.paths = window, vocab_size, paths
        # Plain ndarray views of the memmaps: slicing np.memmap costs several times more per window.
        self._tokens = [np.asarray(shard).view(np.ndarray) for shard in shards]
        self._starts = [None if eot is None else _doc_starts(tokens, window, eot) for tokens in self._tokens]
        counts = [(len(tokens) - 1) // (window - 1) if starts is None else len(starts)
                  for tokens, starts in zip(self._tokens, self._starts)]
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
        starts = []
        for row, (shard, index) in enumerate(zip(shards.tolist(), local.tolist())):
            doc_starts = self._starts[shard]
            starts.append(index * (self.window - 1) if doc_starts is None else int(doc_starts[index]))
            out[row] = self._tokens[shard][starts[-1]:starts[-1] + self.window]
        # A uint32 id of 2**31 or more wraps negative in int32.
        if len(out) and (out.max() >= self.vocab_size or out.min() < 0):
            row, col = np.argwhere((out >= self.vocab_size) | (out < 0))[0]
            shard, offset = int(shards[row]), starts[row] + int(col)
            raise DataError(f"{self.paths[shard]}: token id {int(self._tokens[shard][offset])} at token offset "
                            f"{offset:,} is outside the model's vocabulary (model.vocab_size={self.vocab_size}); the "
                            f"shard is corrupt or was made with another tokenizer (`python corpus.py inspect --full` "
                            f"scans every token)")
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
    indexing past the embedding on device; `corpus.py inspect --full` scans everything."""
    chunk = 4096
    offsets = np.linspace(0, max(len(tokens) - chunk, 0), 16, dtype=np.int64)
    top = max(int(tokens[offset:offset + chunk].max()) for offset in offsets)
    if top >= vocab_size:
        raise DataError(f"{path}: token id {top} >= model.vocab_size={vocab_size}; set model.vocab_size "
                        f"to at least {top + 1} or use shards made with this model's tokenizer")


def split_shards(cfg: Config, split: str) -> list[Path]:
    """The `split` shards of data.path; one line saying how to make them if there are none."""
    paths = find_shards(cfg.data.path, split)
    if not paths:
        out = f"--out {cfg.data.path}"
        make = (f"`python corpus.py prepare --input stdlib --tokenizer bytes {out}`" if cfg.model.vocab_size == 257
                else f"`python corpus.py fineweb --train-shards 8 {out}` (GPT-2 tokens)")
        raise DataError(f"data.path={cfg.data.path!r} has no {split} shards (*{split}_*.bin); make them with {make}")
    return paths


def check_dataset(cfg: Config) -> None:
    """Train and val shards with valid headers and their tokenizer record: checked in moments."""
    for path in split_shards(cfg, "train") + split_shards(cfg, "val"):
        shard_header(path)
    tokenizer.read_meta(cfg.data.path)


def window_source(cfg: Config, split: str) -> WindowSource:
    """Validated windows of model.seq_len + 1 tokens over the `split` shards of data.path."""
    data_dir = cfg.data.path
    paths = split_shards(cfg, split)
    shards = [read_shard(path) for path in paths]
    for path, tokens in zip(paths, shards):
        _check_vocab(path, tokens, cfg.model.vocab_size)
    window = cfg.model.seq_len + 1
    eot = tokenizer.read_meta(data_dir)["eot"] if cfg.data.doc_aligned else None
    source = WindowSource(shards, window, eot, cfg.model.vocab_size, paths)
    if not len(source):
        longest = max(len(shard) for shard in shards)
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
        lengths = _token_byte_lengths(tokenizer.load_tokenizer(cfg.data.path))
    except tokenizer.TokenizerUnavailable:
        return None
    targets = np.concatenate([batch["targets"][batch["mask"] > 0] for batch in val_batches(cfg)])
    if targets.max() >= len(lengths):
        raise DataError(f"{cfg.data.path}: val token id {targets.max()} is outside its tokenizer "
                        f"({tokenizer.META_FILE}: n_vocab={len(lengths)})")
    return int(lengths[targets].sum())
