"""Build, download and inspect token shards: the command-line side of data.py (see notes/data.md).

    python corpus.py prepare --input stdlib --tokenizer bytes --out data/stdlib
    python corpus.py prepare --input 'texts/**/*.txt' --tokenizer gpt2 --out data/mine
    python corpus.py fineweb --train-shards 8 --out data/fineweb10B
    python corpus.py inspect data/stdlib [--full]
"""
from __future__ import annotations

import contextlib
import glob
import http.client
import itertools
import multiprocessing
import os
import shutil
import socket
import sys
import sysconfig
import tempfile
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import tiktoken

import cli
import data
from configs.base import ConfigError
from tokenizer import META_FILE, TokenizerUnavailable, get_tokenizer, load_tokenizer, read_meta, write_meta

FINEWEB_URL = "https://huggingface.co/datasets/kjj0/fineweb10B-gpt2/resolve/main/"
FINEWEB_TRAIN_SHARDS = 103
FINEWEB_META = {"tokenizer": "gpt2", "eot": 50256, "n_vocab": 50257}


# --- prepare: text files to shards ----------------------------------------------------------------


def stdlib_files() -> tuple[list[Path], Path]:
    """The running Python's standard-library sources (no site-packages), and their root."""
    root = Path(sysconfig.get_paths()["stdlib"])
    packages = {"site-packages", "dist-packages"}
    files = [path for path in root.rglob("*.py")
             if path.is_file() and not packages & set(path.relative_to(root).parts)]
    return sorted(files, key=lambda path: path.relative_to(root).as_posix()), root


def input_files(spec: str) -> tuple[list[Path], Path]:
    """Files named by --input (a glob, or "stdlib") in a deterministic order, and their common root."""
    if spec == "stdlib":
        files, root = stdlib_files()
    else:
        files = sorted(Path(name) for name in glob.glob(spec, recursive=True) if os.path.isfile(name))
        if not files:
            raise data.DataError(f"--input {spec!r} matches no files; give a glob such as "
                                 f"'texts/**/*.txt' or 'stdlib'")
        root = Path(os.path.commonpath([path.resolve().parent for path in files]))
        files = [path.resolve() for path in files]
    if len(files) < 2:
        raise data.DataError(f"--input {spec!r} matches {len(files)} file; need at least 2, since "
                             f"validation holds out whole files")
    return files, root


def split_files(files: list[Path], root: Path, val_fraction: float) -> tuple[list[Path], list[Path]]:
    """Hold out whole files for validation: files in order of a hash of their path under `root`
    until they hold val_fraction of the bytes (at least one file, never all). Hashing keeps the
    choice stable when files are added, and independent of the machine's directory order."""
    if not 0 < val_fraction < 1:
        raise data.DataError(f"--val-fraction {val_fraction} must be between 0 and 1 (exclusive)")
    sizes = {path: path.stat().st_size for path in files}
    target = val_fraction * sum(sizes.values())
    held, val = 0, set()
    ranked = sorted(files, key=lambda path: zlib.crc32(path.relative_to(root).as_posix().encode()))
    for path in ranked[:-1]:
        if val and held >= target:
            break
        val.add(path)
        held += sizes[path]
    return [path for path in files if path not in val], [path for path in files if path in val]


def make_out_dir(out) -> Path:
    """--out as a directory, created if need be; one line if it is a file or cannot be made."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise data.DataError(f"--out {out} is a file; give a directory for the shards")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise data.DataError(f"--out {out}: cannot create it ({e.strerror}: {e.filename})") from None
    return out


def _encode_file(task: tuple[str, str]) -> tuple[np.ndarray, int]:
    """Worker: one file is one document, prefixed by end-of-text. Returns (tokens, bytes read)."""
    path, tokenizer = task
    enc = get_tokenizer(tokenizer)
    raw = Path(path).read_bytes()
    # Undecodable bytes (a few stdlib files are Latin-1) become U+FFFD rather than failing the run.
    # disallowed_special=() encodes a literal "<|endoftext|>" in the text as ordinary text.
    ids = enc.encode_to_numpy(raw.decode("utf-8", errors="replace"), disallowed_special=())
    dtype = np.uint16 if enc.n_vocab <= 2**16 else np.uint32
    return np.concatenate([[enc.eot_token], ids]).astype(dtype), len(raw)


def _default_workers(total_bytes: int) -> int:
    """One process per 64 MB of text, up to the cores: a spawn pool takes longer to start than the
    stdlib corpus takes to tokenize in-process (notes/data.md). The output does not depend on it."""
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
        data.write_shard(staging / f"{split}_{i:06d}.bin", shard)
        written += len(shard)
    return written


def _stage_tokenizer(staging: Path, tokenizer: str, enc: tiktoken.Encoding) -> str:
    """Record the tokenizer beside the shards; a ranks file is copied so the directory stands alone."""
    stored = tokenizer if tokenizer in ("gpt2", "bytes") else Path(tokenizer).name
    if stored != tokenizer:
        shutil.copyfile(tokenizer, staging / stored)
    write_meta(staging, stored, enc.eot_token, enc.n_vocab)
    return stored


def _publish(staging: Path, out: Path) -> None:
    """Move a finished dataset into `out`, dropping shards an earlier prepare left there."""
    new = {path.name for path in staging.iterdir()}
    for old in data.find_shards(out, "train") + data.find_shards(out, "val"):
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
    if not 0 < shard_tokens <= data.MAX_SHARD_TOKENS:
        raise data.DataError(f"--shard-tokens {shard_tokens} must be in [1, {data.MAX_SHARD_TOKENS:,}]")
    if workers is not None and workers < 1:
        raise data.DataError(f"--workers {workers} must be >= 1")
    files, root = input_files(input_spec)
    train, val = split_files(files, root, val_fraction)
    out = make_out_dir(out)
    staging = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out))
    try:
        tasks = [(str(path), tokenizer) for path in val + train]
        total_bytes = sum(path.stat().st_size for path in files)
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
    if not part.exists() or part.stat().st_size < data.HEADER_BYTES:
        return False
    try:
        data.shard_header(part)
        return True
    except data.TruncatedShard:
        return False
    except data.DataError as e:
        part.unlink()
        raise data.DataError(f"download of {part.name} failed its size check and was deleted: "
                             f"{e}") from None


def _fetch(url: str, part: Path, open_url) -> None:
    """Append the rest of `url` to `part`, resuming with an HTTP Range request."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with open_url(request, timeout=60) as response:
        if have and getattr(response, "status", None) != 206:
            have = 0            # the server ignored the range: start over
        with open(part, "ab" if have else "wb") as sink:
            shutil.copyfileobj(response, sink, 1 << 20)


def download(url: str, dest, open_url=urllib.request.urlopen, retries: int = 5, backoff: float = 2.0) -> Path:
    """Download a shard to `dest` via `dest.part`: resumes partial files, retries transient errors
    with exponential backoff, and checks the size against the shard header before the rename."""
    dest = Path(dest)
    if dest.exists():
        data.shard_header(dest)
        return dest
    part = dest.with_name(dest.name + ".part")
    attempts = 0
    while not _complete(part):
        if attempts > retries:
            raise data.DataError(f"{url}: still incomplete after {attempts} attempts; "
                                 f"rerun to resume {part}")
        if attempts:
            time.sleep(backoff * 2 ** (attempts - 1))
        attempts += 1
        try:
            _fetch(url, part, open_url)
        except urllib.error.HTTPError as e:
            if e.code < 500 and e.code != 429:
                raise data.DataError(f"{url}: HTTP {e.code} {e.reason}") from None
        except urllib.error.URLError as e:
            # No name resolution or a refused connection before a single byte: offline, most likely;
            # failing now beats a minute of backoff. Later failures are taken as transient.
            if attempts == 1 and not part.exists() and isinstance(e.reason, (socket.gaierror, ConnectionRefusedError)):
                raise data.DataError(f"cannot reach {urllib.parse.urlsplit(url).netloc} ({e.reason}); "
                                     f"downloading FineWeb needs network access") from None
        except (http.client.HTTPException, OSError):
            pass                # transient: the next attempt resumes from what arrived
    os.replace(part, dest)
    return dest


def fineweb(train_shards: int, out, base_url: str = FINEWEB_URL, **download_options) -> None:
    """The FineWeb10B val shard and the first `train_shards` train shards (100M GPT-2 tokens each)."""
    if not 1 <= train_shards <= FINEWEB_TRAIN_SHARDS:
        raise data.DataError(f"--train-shards {train_shards} must be in [1, {FINEWEB_TRAIN_SHARDS}]")
    out = make_out_dir(out)
    write_meta(out, **FINEWEB_META)
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
    paths = data.find_shards(data_dir, "train") + data.find_shards(data_dir, "val")
    if not paths:
        raise data.DataError(f"{data_dir} has no shards (*train_*.bin, *val_*.bin)")
    shards = [data.read_shard(path) for path in paths]
    print(f"{data_dir}: tokenizer {meta['tokenizer']!r}, n_vocab {meta['n_vocab']:,}, "
          f"end-of-text {meta['eot']}")
    rows = [("shard", "dtype", "tokens")] + [(path.name, tokens.dtype.name, f"{len(tokens):,}")
                                             for path, tokens in zip(paths, shards)]
    print(textwrap.indent(cli.format_table(rows, right=(2,)), "  "))
    for path, tokens in zip(paths, shards) if full else ():
        if (top := int(tokens.max())) >= meta["n_vocab"]:
            raise data.DataError(f"{path}: token id {top} >= n_vocab={meta['n_vocab']} of its "
                                 f"tokenizer ({META_FILE})")
    counts, total = _token_counts(shards, meta["n_vocab"], full)
    print(f"histogram over {'all' if full else 'a sample of'} {total:,} tokens: {np.count_nonzero(counts):,} "
          f"distinct ids, end-of-text {counts[meta['eot']] / total:.3%}")
    try:
        enc = load_tokenizer(data_dir)
    except TokenizerUnavailable as e:
        print(f"decoded sample unavailable: {e}")
        return
    common = np.argsort(counts)[::-1][:10]
    print("most frequent: " + ", ".join(f"{enc.decode([int(token)])!r} {counts[token] / total:.1%}"
                                    for token in common))
    print(f"decoded sample ({paths[0].name}, first 400 tokens):")
    print(enc.decode(shards[0][:400].tolist()))


# --- command line ---------------------------------------------------------------------------------


def _parser() -> cli.Parser:
    parser = cli.Parser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("fineweb", help="download GPT-2-tokenized FineWeb10B shards")
    command.add_argument("--train-shards", type=int, required=True,
                         help=f"1..{FINEWEB_TRAIN_SHARDS}, 100M tokens each")
    command.add_argument("--out", required=True)
    command = commands.add_parser("prepare", help="tokenize text files into shards")
    command.add_argument("--input", required=True,
                         help="a glob of text files, or 'stdlib' (this Python's sources)")
    command.add_argument("--tokenizer", required=True, help="gpt2 | bytes | PATH.tiktoken")
    command.add_argument("--out", required=True)
    command.add_argument("--val-fraction", type=float, default=0.05,
                         help="share of bytes held out, as whole files")
    command.add_argument("--shard-tokens", type=int, default=100_000_000)
    command.add_argument("--workers", type=int, default=None,
                         help="processes (default: 1 per 64 MB of text, up to the cores)")
    command = commands.add_parser("inspect", help="summarize a directory of shards")
    command.add_argument("dir")
    command.add_argument("--full", action="store_true", help="scan every token, not a sample")
    return parser


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    try:
        if args.command == "fineweb":
            fineweb(args.train_shards, args.out)
        elif args.command == "prepare":
            prepare(args.input, args.tokenizer, args.out, args.val_fraction, args.shard_tokens, args.workers)
        else:
            inspect_shards(args.dir, args.full)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
