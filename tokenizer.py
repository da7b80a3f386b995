"""Tokenizers: tiktoken encodings by name ("gpt2", "bytes", a .tiktoken ranks file), the record
of the one that wrote a data folder's shards, and the one a model decodes with (see notes/data.md).
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import tiktoken
import tiktoken.load

from configs.base import Config, ConfigError

META_FILE = "tokenizer.json"
# Written instead of META_FILE where an import found no tokenizer to convert: it says why.
NO_TOKENIZER_NOTE = "unavailable.txt"
EOT_TEXT = "<|endoftext|>"
META_FIELDS = {"tokenizer": str, "eot": int, "n_vocab": int}
# What the command lines that take --tokenizer add to a NoTokenizer message.
FLAG_HINT = "; pass --tokenizer bytes|gpt2|PATH.tiktoken (the one the model was trained with)"
GPT2_SPLIT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class TokenizerError(ConfigError):
    """No usable tokenizer: an unknown name, a bad ranks file, or one that does not fit the model."""


class NoTokenizer(TokenizerError):
    """No tokenizer fits this model: none is recorded beside its data, or its ids do not fit."""


class TokenizerUnavailable(NoTokenizer):
    """A known tokenizer that cannot be loaded here (gpt2's ranks need network access once)."""


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
    raise TokenizerError(f"unknown tokenizer {name!r}; expected 'gpt2', 'bytes' or the path of an existing "
                         f".tiktoken ranks file")


def _ranks_file_encoding(path: str) -> tiktoken.Encoding:
    """A ranks file carries no split pattern or special tokens: use GPT-2's split, and put
    end-of-text after the last rank."""
    try:
        ranks = tiktoken.load.load_tiktoken_bpe(path)
    except (ValueError, IndexError) as e:
        raise TokenizerError(f"{path} is not a .tiktoken ranks file (lines of '<base64 token> <rank>'): "
                             f"{e}") from None
    if not ranks:
        raise TokenizerError(f"{path} is an empty .tiktoken ranks file")
    return tiktoken.Encoding(name=Path(path).stem, pat_str=GPT2_SPLIT, mergeable_ranks=ranks,
                             special_tokens={EOT_TEXT: max(ranks.values()) + 1})


def read_meta(data_dir) -> dict:
    """The tokenizer record written beside the shards: {"tokenizer", "eot", "n_vocab"}, checked."""
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        raise TokenizerError(f"{path} is missing; shards made by `python corpus.py prepare` or `fineweb` "
                             f"carry it")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path} is not a readable tokenizer record ({e})") from None
    meta = meta if isinstance(meta, dict) else {}
    bad = [key for key, kind in META_FIELDS.items() if not isinstance(meta.get(key), kind)]
    if bad:
        raise TokenizerError(f"{path}: {', '.join(bad)} missing or of the wrong type; a record holds "
                             f"{{\"tokenizer\": str, \"eot\": int, \"n_vocab\": int}}")
    return meta


def load_tokenizer(data_dir) -> tiktoken.Encoding:
    """The encoding that wrote the shards in `data_dir`; a ranks file is stored beside them."""
    name = read_meta(data_dir)["tokenizer"]
    return get_tokenizer(name if name in ("gpt2", "bytes") else str(Path(data_dir) / name))


def write_meta(data_dir, tokenizer: str, eot: int, n_vocab: int) -> None:
    """The tokenizer record `read_meta` reads; `tokenizer` is "gpt2", "bytes" or a ranks file's
    name inside `data_dir`."""
    meta = {"tokenizer": tokenizer, "eot": eot, "n_vocab": n_vocab}
    (Path(data_dir) / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")


def for_model(cfg: Config, name: str | None = None, hint: str = "") -> tiktoken.Encoding:
    """The tokenizer a model decodes with: `name` if given, else the record beside its data
    (data.path), else bytes for a 257-token vocabulary. Its ids must fit model.vocab_size; where
    none fits, NoTokenizer says why, then `hint` (e.g. FLAG_HINT)."""
    folder = Path(cfg.data.path)
    if name:
        enc = get_tokenizer(name)
    elif (folder / META_FILE).is_file():
        enc = load_tokenizer(folder)
    elif cfg.model.vocab_size == 257:
        enc = get_tokenizer("bytes")
    else:
        note = folder / NO_TOKENIZER_NOTE
        raise NoTokenizer((note.read_text().strip() if note.is_file() else f"{folder / META_FILE} is missing")
                          + hint)
    if enc.n_vocab > cfg.model.vocab_size:
        raise NoTokenizer(f"tokenizer {enc.name!r} has {enc.n_vocab} ids but model.vocab_size is "
                          f"{cfg.model.vocab_size}" + hint)
    return enc


def for_model_or_reason(cfg: Config, name: str | None = None,
                        hint: str = "") -> tuple[tiktoken.Encoding | None, str]:
    """(for_model's pick, "") or (None, why none fits), for callers that go on without one (items
    of token ids need none). A name that is no tokenizer at all still raises."""
    try:
        return for_model(cfg, name, hint), ""
    except NoTokenizer as e:
        return None, str(e)
