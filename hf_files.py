"""The files of a Hugging Face checkpoint directory, without transformers: safetensors tensors read
and written (memory-mapped, bfloat16 included), and byte-level BPE tokenizers (vocab.json +
merges.txt, or tokenizer.json) converted to and from tiktoken ranks. hf.py maps the tensors and
configs; notes/evaluation.md describes the conversions.

Every error is one line naming the file and the entry at fault (HFError, a ConfigError).
"""
from __future__ import annotations

import base64
import json
import math
import os
import struct
from functools import lru_cache
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import tiktoken

import tokenizer
from configs.base import ConfigError

# Buffers some checkpoints carry that are not parameters (GPT-2's causal masks, cached RoPE tables).
BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
          "BF16": np.dtype(jnp.bfloat16)}


class HFError(ConfigError):
    """A one-line problem with a Hugging Face directory, naming the file and field at fault."""


# --- safetensors ---------------------------------------------------------------------------------


def _header(path: Path, size: int) -> tuple[dict, int]:
    """The parsed JSON header and the offset where the tensor bytes begin."""
    if size < 8:
        raise HFError(f"{path}: {size} bytes, too short for a safetensors file (8-byte header length)")
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > size - 8:
            raise HFError(f"{path}: corrupt safetensors header: its length {length:,} exceeds the "
                          f"{size - 8:,} bytes after it")
        text = f.read(length)
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFError(f"{path}: corrupt safetensors header: not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise HFError(f"{path}: corrupt safetensors header: a JSON {type(header).__name__}, not an object")
    return header, 8 + length


def read_safetensors(path) -> dict[str, np.ndarray]:
    """Every tensor of a .safetensors file, as read-only views of a memory map (nothing is read
    until used). The header is checked against the file before any tensor is returned."""
    path = Path(path)
    if not path.is_file():
        raise HFError(f"{path}: no such file")
    size = path.stat().st_size
    header, start = _header(path, size)
    header.pop("__metadata__", None)
    body = np.memmap(path, np.uint8, mode="r", offset=start) if size > start else np.zeros(0, np.uint8)
    tensors = {}
    for name, entry in header.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise HFError(f"{path}: tensor {name!r} lacks dtype, shape or data_offsets in the header")
        if entry["dtype"] not in DTYPES:
            raise HFError(f"{path}: tensor {name!r} has dtype {entry['dtype']}; supported: {', '.join(DTYPES)}")
        dtype, shape = DTYPES[entry["dtype"]], tuple(entry["shape"])
        begin, end = entry["data_offsets"]
        if end - begin != math.prod(shape) * dtype.itemsize or not 0 <= begin <= end <= len(body):
            raise HFError(f"{path}: tensor {name!r} has bytes [{begin}, {end}) but shape {list(shape)} of "
                          f"{entry['dtype']} needs {math.prod(shape) * dtype.itemsize}, within the "
                          f"{len(body)} data bytes")
        tensors[name] = body[begin:end].view(dtype).reshape(shape)
    return tensors


def write_safetensors(path, tensors: dict[str, np.ndarray]) -> None:
    """A .safetensors file (metadata format "pt", which transformers requires), atomically."""
    names = {np.dtype(dtype): name for name, dtype in DTYPES.items()}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    arrays = {name: np.ascontiguousarray(array) for name, array in sorted(tensors.items())}
    for name, array in arrays.items():
        header[name] = {"dtype": names[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)     # the tensor bytes start 8-aligned
    tmp = Path(f"{path}.tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for array in arrays.values():
            f.write(array.tobytes())
    os.replace(tmp, path)


def read_checkpoint(directory: Path, model_type: str) -> dict[str, np.ndarray]:
    """The tensors of model.safetensors, or of the shards model.safetensors.index.json lists,
    named as transformers saves them (GPT-2's unprefixed names get "transformer."), buffers dropped."""
    index = directory / "model.safetensors.index.json"
    if (directory / "model.safetensors").is_file():
        tensors = read_safetensors(directory / "model.safetensors")
    elif index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise HFError(f"{index}: not a safetensors index (a JSON object with a weight_map): {e}") from None
        tensors = {name: array for file in files for name, array in read_safetensors(directory / file).items()}
    else:
        raise HFError(f"{directory}: no model.safetensors or model.safetensors.index.json (PyTorch .bin "
                      f"checkpoints are not read: save them again with safe_serialization)")
    tensors = {name: array for name, array in tensors.items() if not name.endswith(BUFFERS)}
    if model_type == "gpt2" and not any(name.startswith("transformer.") for name in tensors):
        tensors = {name if name.startswith("lm_head.") else f"transformer.{name}": a for name, a in tensors.items()}
    return tensors


# --- Byte-level BPE <-> tiktoken ------------------------------------------------------------------


@lru_cache(maxsize=1)
def byte_chars() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte, the alphabet of byte-level vocabularies."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b], extra = chr(256 + extra), extra + 1
    return chars


def bpe_encoding(name: str, vocab: dict[str, int], merges: list, added: dict[str, int],
                 pat_str: str, where: str) -> tiktoken.Encoding:
    """A tiktoken.Encoding equal to a byte-level BPE: ranks are the vocabulary ids, which tiktoken
    merges lowest-first, so the ids of merged tokens must rise in merge order. Tokens of several
    characters that no merge makes (GPT-2's <|endoftext|>) are special tokens."""
    from_char = {char: b for b, char in byte_chars().items()}
    alphabet, made = set(from_char), {left + right for left, right in merges}
    ranks, specials = {}, dict(added)
    for text, token_id in vocab.items():
        if text in specials or (len(text) > 1 and text not in made):
            specials[text] = token_id
        elif not set(text) <= alphabet:
            raise HFError(f"{where}: token {text!r} is not byte-level (GPT-2's byte alphabet)")
        else:
            ranks[bytes(from_char[char] for char in text)] = token_id
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise HFError(f"{where}: no token for byte {missing[0]} ({len(missing)} bytes missing)")
    last = -1
    for i, (left, right) in enumerate(merges):
        token_id = vocab.get(left + right)
        if token_id is None or token_id < last:
            raise HFError(f"{where}: merge {i} ({left} {right}) makes id {token_id}, below an earlier "
                          f"merge's {last}; tiktoken would merge in another order")
        last = token_id
    if len(set(ranks.values()) | set(specials.values())) != len(ranks) + len(specials):
        raise HFError(f"{where}: two tokens share an id")
    return tiktoken.Encoding(name=name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=specials)


def _tokenizer_json_split(spec: dict, where: str) -> str:
    """The regex that splits text before BPE: GPT-2's under a plain ByteLevel pre-tokenizer, or
    that of one Split step before a regex-free ByteLevel (the Llama 3 and Qwen form)."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if any(step.get("type") == "ByteLevel" and step.get("add_prefix_space") for step in steps):
        raise HFError(f"{where}: pre_tokenizer ByteLevel add_prefix_space=true is not supported")
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return tokenizer.GPT2_SPLIT
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True) and "Regex" in steps[0].get(
            "pattern", {}) and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert"):
        return steps[0]["pattern"]["Regex"]
    raise HFError(f"{where}: pre_tokenizer {' + '.join(map(str, kinds))} has no tiktoken equivalent; "
                  f"supported: ByteLevel, or Split(regex) + ByteLevel")


def tokenizer_json_encoding(path: Path) -> tiktoken.Encoding:
    """A tokenizer.json byte-level BPE (no normalizer, no byte fallback) as tiktoken."""
    spec = json.loads(path.read_text())
    bpe = spec.get("model") or {}
    if bpe.get("type") != "BPE" or bpe.get("byte_fallback") or bpe.get("continuing_subword_prefix") \
            or bpe.get("end_of_word_suffix") or spec.get("normalizer"):
        raise HFError(f"{path}: model {bpe.get('type')} with normalizer {spec.get('normalizer')} is not a "
                      f"plain byte-level BPE (SentencePiece-style tokenizers have no tiktoken form)")
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in bpe.get("merges", [])]
    added = {token["content"]: token["id"] for token in spec.get("added_tokens", [])}
    return bpe_encoding(path.parent.name, bpe["vocab"], merges, added, _tokenizer_json_split(spec, str(path)),
                        str(path))


def vocab_merges_encoding(directory: Path) -> tiktoken.Encoding:
    """GPT-2's slow-tokenizer files: vocab.json and merges.txt (GPT-2's split)."""
    vocab = json.loads((directory / "vocab.json").read_text())
    lines = (directory / "merges.txt").read_text().splitlines()
    merges = [tuple(line.split(" ", 1)) for line in lines if line and not line.startswith("#version")]
    config = directory / "tokenizer_config.json"
    settings = json.loads(config.read_text()) if config.is_file() else {}
    if settings.get("add_prefix_space"):
        raise HFError(f"{config}: add_prefix_space=true is not supported")
    added = {token["content"]: int(token_id) for token_id, token in settings.get("added_tokens_decoder", {}).items()}
    return bpe_encoding(directory.name, vocab, merges, added, tokenizer.GPT2_SPLIT, str(directory / "vocab.json"))


def read_tokenizer(directory: Path) -> tiktoken.Encoding:
    """The directory's tokenizer as tiktoken: vocab.json + merges.txt, else tokenizer.json; any
    file that does not convert is an HFError naming it."""
    try:
        if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
            return vocab_merges_encoding(directory)
        if (directory / "tokenizer.json").is_file():
            return tokenizer_json_encoding(directory / "tokenizer.json")
    except HFError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:   # JSON errors are ValueErrors
        raise HFError(f"{directory}: its tokenizer files do not read as a byte-level BPE "
                      f"({type(e).__name__}: {str(e)[:120]})") from None
    raise HFError(f"{directory}: no vocab.json + merges.txt or tokenizer.json")


def store_tokenizer(enc: tiktoken.Encoding, directory: Path) -> None:
    """Write `enc` where tokenizer.load_tokenizer reads it (a ranks file and the tokenizer record).
    That record holds GPT-2's split and one end-of-text token after the last rank, so only such
    tokenizers are stored; any other raises HFError saying why."""
    top = max(enc._mergeable_ranks.values())
    if enc._pat_str != tokenizer.GPT2_SPLIT:
        raise HFError(f"tokenizer {enc.name!r} splits text by another regex than GPT-2's, the only one "
                      f"a run's tokenizer record (tokenizer.py) holds")
    if enc._special_tokens != {tokenizer.EOT_TEXT: top + 1}:
        raise HFError(f"tokenizer {enc.name!r} has special tokens {sorted(enc._special_tokens)[:3]}, not the "
                      f"one {tokenizer.EOT_TEXT} at id {top + 1} that a run's tokenizer record (tokenizer.py) holds")
    directory.mkdir(parents=True, exist_ok=True)
    lines = (f"{base64.b64encode(token).decode()} {rank}" for token, rank in sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1]))
    (directory / "tokenizer.tiktoken").write_text("\n".join(lines) + "\n")
    tokenizer.write_meta(directory, "tokenizer.tiktoken", top + 1, enc.n_vocab)


def _last_merge(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """The two tokens whose merge makes `token`: its bytes merged lowest rank first, with only the
    ranks below its own, end as exactly two parts."""
    parts, limit = [token[i:i + 1] for i in range(len(token))], ranks[token]
    while len(parts) > 2:
        pairs = [ranks.get(a + b, limit) for a, b in zip(parts, parts[1:])]
        best = int(np.argmin(pairs))
        if pairs[best] >= limit:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise HFError(f"token {token!r} (rank {limit}) is not made by merging two lower-ranked tokens")
    return parts[0], parts[1]


def write_hf_tokenizer(enc: tiktoken.Encoding, directory: Path) -> None:
    """vocab.json, merges.txt and tokenizer_config.json (GPT-2's tokenizer) for a tokenizer with
    GPT-2's split, or with no merges (the byte tokenizer), and one end-of-text token."""
    ranks = enc._mergeable_ranks
    merged = sorted((token for token in ranks if len(token) > 1), key=ranks.get)
    if set(enc._special_tokens) != {tokenizer.EOT_TEXT} or (merged and enc._pat_str != tokenizer.GPT2_SPLIT):
        raise HFError(f"tokenizer {enc.name!r} is not GPT-2-shaped (GPT-2's split, one {tokenizer.EOT_TEXT})")
    chars = byte_chars()
    text = lambda token: "".join(chars[b] for b in token)
    vocab = {text(token): rank for token, rank in ranks.items()} | dict(enc._special_tokens)
    merges = [" ".join(map(text, _last_merge(ranks, token))) for token in merged]
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n")
    settings = {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False,
                **{f"{kind}_token": tokenizer.EOT_TEXT for kind in ("bos", "eos", "unk")}}
    (directory / "tokenizer_config.json").write_text(json.dumps(settings, indent=1) + "\n")
