"""Tests for data.py (shard format, tokenizers, the grain loader) and corpus.py (prepare, inspect
and the fineweb downloader). CPU only, no network, small shapes."""
import ast
import base64
import http.client
import io
import urllib.error
from pathlib import Path

import numpy as np
import pytest

import corpus as corpus_tool    # conftest's session fixture is named `corpus`
import data
import tokenizer
from configs.base import Config, ConfigError, DataConfig, ModelConfig, TrainConfig
from configs.load import apply_overrides

EOT = 256   # the bytes tokenizer's end-of-text id
SEQ = 16


def random_tokens(seed: int, n: int, doc_len: int = 40) -> np.ndarray:
    """Byte tokens with an end-of-text about every doc_len tokens, starting with one."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 256, n)
    tokens[rng.random(n) < 1 / doc_len] = EOT
    tokens[0] = EOT
    return tokens


@pytest.fixture
def dataset(tmp_path):
    """Three train shards of uneven sizes and one val shard, tokenized as `bytes`."""
    for i, n in enumerate([1000, 1700, 600]):
        data.write_shard(tmp_path / f"train_{i:06d}.bin", random_tokens(i, n))
    data.write_shard(tmp_path / "val_000000.bin", random_tokens(9, 3000))
    tokenizer.write_meta(tmp_path, "bytes", EOT, 257)
    return tmp_path


def make_cfg(path, *overrides) -> Config:
    cfg = Config(model=ModelConfig(vocab_size=257, seq_len=SEQ, n_layers=1, d_model=32, n_heads=2),
                 data=DataConfig(path=str(path), val_tokens=1024), train=TrainConfig(batch_size=8))
    return apply_overrides(cfg, overrides)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
        np.testing.assert_array_equal(x["targets"], y["targets"])


# --- Shards ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("top, dtype, magic, version", [(50256, np.uint16, 20240520, 1),
                                                        (70000, np.uint32, 20240801, 7)])
def test_shard_round_trip(tmp_path, top, dtype, magic, version):
    tokens = np.random.default_rng(0).integers(0, top + 1, 5000)
    tokens[7] = top
    path = tmp_path / "train_000000.bin"
    data.write_shard(path, tokens)
    assert list(np.fromfile(path, np.int32, 3)) == [magic, version, 5000]
    shard = data.read_shard(path)
    assert isinstance(shard, np.memmap) and shard.dtype == dtype and not shard.flags.writeable
    np.testing.assert_array_equal(shard, tokens)
    assert [p.name for p in tmp_path.iterdir()] == ["train_000000.bin"]


def test_write_shard_is_atomic(tmp_path, monkeypatch):
    def fail(*args):
        raise OSError("disk full")
    monkeypatch.setattr(data.os, "replace", fail)
    with pytest.raises(OSError):
        data.write_shard(tmp_path / "train_000000.bin", np.arange(10))
    assert list(tmp_path.iterdir()) == []


def corrupt(path, how):
    raw = bytearray(path.read_bytes())
    header = np.frombuffer(raw, np.int32, 3).copy()
    if how == "short header":
        return bytes(raw[:500])
    if how == "short body":
        return bytes(raw[:-10])
    if how == "extra bytes":
        return bytes(raw) + b"\0\0\0\0"
    header[{"magic": 0, "version": 1, "count": 2}[how]] += 1
    raw[:12] = header.tobytes()
    return bytes(raw)


@pytest.mark.parametrize("how, message", [
    ("short header", "is truncated: 500 bytes, shorter than the 1024-byte header"),
    ("short body", "is truncated: the header promises 100 tokens (200 bytes) but only 190 bytes follow"),
    ("magic", "magic 20240521 is not a token shard's; expected one of 20240520 (uint16), 20240801 (uint32)"),
    ("version", "version 2 is not supported for magic 20240520; expected 1"),
    ("count", "is truncated: the header promises 101 tokens"),
    ("extra bytes", "the header's token count 100 disagrees with the file size (204 bytes after the header"),
])
def test_bad_shards(tmp_path, how, message):
    path = tmp_path / "train_000000.bin"
    data.write_shard(path, np.arange(100))
    path.write_bytes(corrupt(path, how))
    with pytest.raises(data.DataError, match="train_000000.bin") as info:
        data.read_shard(path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_write_shard_rejects_bad_tokens(tmp_path):
    for tokens in ([], [[1, 2]], [-1, 3], [2**32]):
        with pytest.raises(data.DataError, match="bad.bin"):
            data.write_shard(tmp_path / "bad.bin", np.array(tokens))


# --- Tokenizers -----------------------------------------------------------------------------------


def write_ranks(path, extra=(b"th", b"he", b"the")):
    tokens = [bytes([b]) for b in range(256)] + list(extra)
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(tokens)))
    return path


def test_bytes_tokenizer_round_trip():
    enc = tokenizer.get_tokenizer("bytes")
    text = "héllo\n\twörld ✓ <|endoftext|>"
    ids = enc.encode_ordinary(text)
    assert ids == list(text.encode()) and enc.decode(ids) == text
    assert (enc.eot_token, enc.n_vocab) == (EOT, 257)


def test_ranks_file_tokenizer(tmp_path):
    enc = tokenizer.get_tokenizer(str(write_ranks(tmp_path / "tiny.tiktoken")))
    assert enc.encode_ordinary("the") == [258]
    assert enc.decode(enc.encode_ordinary("the other")) == "the other"
    assert enc.eot_token == 259


def test_bad_tokenizers(tmp_path, monkeypatch):
    with pytest.raises(tokenizer.TokenizerError, match="unknown tokenizer 'gpt3'; expected 'gpt2', 'bytes'"):
        tokenizer.get_tokenizer("gpt3")
    (tmp_path / "bad.tiktoken").write_text("not base64 at all\n")
    with pytest.raises(tokenizer.TokenizerError, match="bad.tiktoken is not a .tiktoken ranks file"):
        tokenizer.get_tokenizer(str(tmp_path / "bad.tiktoken"))

    def offline(name):
        raise OSError("Failed to resolve 'openaipublic.blob.core.windows.net'")
    monkeypatch.setattr(tokenizer.tiktoken, "get_encoding", offline)
    with pytest.raises(tokenizer.TokenizerUnavailable, match="tokenizer 'gpt2' needs network access once"):
        tokenizer.get_tokenizer("gpt2")



def test_the_tokenizer_a_model_decodes_with(tmp_path):
    """tokenizer.for_model: the name given, else the data folder's record, else bytes for a
    257-token vocabulary; a tokenizer wider than the model, or none at all, is refused saying why."""
    def cfg(vocab):
        return Config(model=ModelConfig(vocab_size=vocab, n_layers=1, d_model=32, n_heads=2, seq_len=16),
                      data=DataConfig(path=str(tmp_path)))
    assert tokenizer.for_model(cfg(257)).name == "bytes"
    with pytest.raises(tokenizer.NoTokenizer, match=r"tokenizer.json is missing; pass --tokenizer bytes\|gpt2"):
        tokenizer.for_model(cfg(300))
    assert tokenizer.for_model_or_reason(cfg(300))[0] is None
    with pytest.raises(tokenizer.NoTokenizer, match="'bytes' has 257 ids but model.vocab_size is 100"):
        tokenizer.for_model(cfg(100), "bytes")
    with pytest.raises(tokenizer.TokenizerError, match="unknown tokenizer 'gpt3'"):
        tokenizer.for_model_or_reason(cfg(300), "gpt3")   # a name that is no tokenizer is not "none fits"
    tokenizer.write_meta(tmp_path, "bytes", 256, 257)
    assert tokenizer.for_model(cfg(300)).eot_token == 256

# --- The loader -----------------------------------------------------------------------------------


def test_shuffle_is_a_fresh_permutation_each_epoch():
    for n in (1, 2, 3, 10, 97, 1000, 4099):
        ids = data.shuffled_windows(np.arange(3 * n), n, seed=5)
        epochs = ids.reshape(3, n)
        for epoch in epochs:
            np.testing.assert_array_equal(np.sort(epoch), np.arange(n))
        if n >= 10:
            assert not np.array_equal(epochs[0], epochs[1])
            assert not np.array_equal(epochs[0], np.arange(n))
            assert not np.array_equal(epochs[0], data.shuffled_windows(np.arange(n), n, seed=6))


def test_batches_are_shifted_windows(dataset):
    batch = next(data.train_batches(make_cfg(dataset)))
    assert batch["inputs"].shape == batch["targets"].shape == (8, SEQ)
    assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])


def test_one_epoch_covers_every_window_of_every_shard(dataset):
    cfg = make_cfg(dataset)
    source = data.window_source(cfg, "train")
    assert len(source) == sum((n - 1) // SEQ for n in (1000, 1700, 600))
    every = {tuple(shard[i * SEQ:(i + 1) * SEQ + 1])
             for shard in map(data.read_shard, data.find_shards(dataset, "train"))
             for i in range((len(shard) - 1) // SEQ)}
    batches = take(data.train_batches(cfg), -(-len(source) // 8))
    rows = np.concatenate([np.c_[b["inputs"], b["targets"][:, -1:]] for b in batches])[:len(source)]
    seen = [tuple(row) for row in rows]
    assert len(set(seen)) == len(source) and set(seen) == every


def test_same_seed_and_step_give_same_batches(dataset):
    cfg = make_cfg(dataset)
    assert_batches_equal(take(data.train_batches(cfg), 5), take(data.train_batches(cfg), 5))
    other = take(data.train_batches(make_cfg(dataset, "train.seed=1")), 5)
    assert not np.array_equal(other[0]["inputs"], next(data.train_batches(cfg))["inputs"])


def test_resume_at_step_k(dataset):
    cfg = make_cfg(dataset)
    straight = take(data.train_batches(cfg), 40)     # 320 rows: crosses the 205-window epoch
    assert_batches_equal(straight[27:], take(data.train_batches(cfg, start_step=27), 13))


@pytest.mark.parametrize("count", [2, 4])
def test_process_slices_tile_the_global_batch(dataset, count):
    cfg = make_cfg(dataset)
    whole = take(data.train_batches(cfg, start_step=3), 4)
    parts = [take(data.train_batches(cfg, 3, p, count), 4) for p in range(count)]
    for step, batch in enumerate(whole):
        for key in ("inputs", "targets"):
            pieces = [part[step][key] for part in parts]
            assert all(piece.shape == (8 // count, SEQ) for piece in pieces)
            np.testing.assert_array_equal(np.concatenate(pieces), batch[key])


def test_document_aligned_windows(dataset):
    batches = take(data.train_batches(make_cfg(dataset, "data.doc_aligned=true")), 30)
    assert all((b["inputs"][:, 0] == EOT).all() for b in batches)
    tokens = data.read_shard(dataset / "train_000001.bin")
    starts = data._doc_starts(tokens, SEQ + 1, EOT)
    eots = np.flatnonzero(tokens == EOT)
    assert (tokens[starts] == EOT).all() and (starts + SEQ + 1 <= len(tokens)).all()
    for prev, start in zip(starts, starts[1:]):     # greedy: the first end-of-text after the window
        assert start == eots[eots >= prev + SEQ][0]


def test_val_batches_fixed_for_any_process_count(dataset):
    cfg = make_cfg(dataset)
    whole = data.val_batches(cfg)
    assert len(whole) == 1024 // SEQ // 8
    assert all(b["mask"].all() for b in whole)
    assert_batches_equal(whole, data.val_batches(cfg))
    for count in (2, 4):
        parts = [data.val_batches(cfg, p, count) for p in range(count)]
        for step, batch in enumerate(whole):
            pieces = [part[step]["inputs"] for part in parts]
            np.testing.assert_array_equal(np.concatenate(pieces), batch["inputs"])
    targets = np.concatenate([b["targets"] for b in whole])
    np.testing.assert_array_equal(whole[0]["inputs"][0], data.read_shard(dataset / "val_000000.bin")[:SEQ])
    assert data.val_bytes(cfg) == int((targets != EOT).sum())


def test_val_budget_is_the_same_for_any_batch_size(dataset):
    """A budget that is not a whole number of batches: the last batch is padded and masked."""
    def real_windows(*overrides):
        batches = data.val_batches(make_cfg(dataset, "data.val_tokens=400", *overrides))
        return np.concatenate([b["inputs"][b["mask"][:, 0] > 0] for b in batches])
    windows = real_windows()                  # 400 // 16 = 25 windows, batch 8: 3 full + 1 row
    assert len(windows) == 25
    np.testing.assert_array_equal(windows, real_windows("train.batch_size=4"))
    last = data.val_batches(make_cfg(dataset, "data.val_tokens=400"), 1, 2)[-1]
    assert not last["mask"].any()             # process 1's rows of the last batch are all padding


def test_val_bytes_none_without_tokenizer(dataset, monkeypatch):
    def offline(name):
        raise OSError("no network")
    monkeypatch.setattr(tokenizer.tiktoken, "get_encoding", offline)
    tokenizer.write_meta(dataset, **corpus_tool.FINEWEB_META)
    assert data.val_bytes(make_cfg(dataset)) is None


def test_every_read_checks_its_ids_against_the_vocabulary():
    """A uint32 id of 2**31 or more wraps negative in the int32 batch: reported as stored."""
    tokens = np.array([1, 2, 3, 2**31 + 5, 4, 5, 6, 7, 8, 9], np.uint32)
    source = data.WindowSource([tokens], 5, None, 257, ["x.bin"])
    assert source.read([1]).tolist() == [[4, 5, 6, 7, 8]]      # windows share their end token
    with pytest.raises(data.DataError, match=r"^x.bin: token id 2147483653 at token offset 3 is outside the "
                                             r"model's vocabulary \(model.vocab_size=257\)"):
        source.read([1, 0])


@pytest.mark.parametrize("overrides, call, message", [
    (["model.vocab_size=200"], "train", "train_000000.bin: token id 25"),
    (["model.seq_len=5000"], "train", "model.seq_len=5000 needs a window of 5,001 tokens, but the train"),
    (["train.batch_size=6"], "train4", "train.batch_size=6 is not divisible by process_count=4"),
    ([], "train_p5", "process_index=5 must be in [0, process_count=4)"),
    (["data.val_tokens=8"], "val", "data.val_tokens=8 is less than one window (model.seq_len=16 tokens)"),
    (["data.val_tokens=100000"], "val", "data.val_tokens=100,000 needs 6,250 windows but the val shards"),
    (["data.path=/nonexistent"], "train", "data.path='/nonexistent' has no train shards"),
])
def test_bad_loader_inputs(dataset, overrides, call, message):
    cfg = make_cfg(dataset, *overrides)
    calls = {"train": lambda: data.train_batches(cfg), "train4": lambda: data.train_batches(cfg, 0, 1, 4),
             "train_p5": lambda: data.train_batches(cfg, 0, 5, 4), "val": lambda: data.val_batches(cfg)}
    with pytest.raises(data.DataError) as info:
        calls[call]()
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_data_config():
    with pytest.raises(ConfigError, match="data.read_threads=-1 must be >= 0"):
        DataConfig(read_threads=-1)
    with pytest.raises(ConfigError, match="data.val_tokens=0 must be positive"):
        DataConfig(val_tokens=0)


# --- prepare and inspect --------------------------------------------------------------------------


@pytest.fixture
def texts(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    contents = {f"doc{i}.txt": f"Document {i}: " + "naïve café ✓ " * (i * 7 + 3) for i in range(8)}
    for name, text in contents.items():
        (folder / name).write_text(text)
    return folder, contents


def decoded_docs(out, split):
    enc = tokenizer.load_tokenizer(out)
    tokens = np.concatenate([data.read_shard(p) for p in data.find_shards(out, split)])
    return enc.decode(tokens.tolist()).split(tokenizer.EOT_TEXT)[1:]


def test_prepare_then_inspect(texts, tmp_path, capsys):
    folder, contents = texts
    out = tmp_path / "out"
    corpus_tool.prepare(str(folder / "*.txt"), "bytes", out, val_fraction=0.2, shard_tokens=300, workers=1)
    train, val = decoded_docs(out, "train"), decoded_docs(out, "val")
    assert len(data.find_shards(out, "train")) > 1
    assert sorted(train + val) == sorted(contents.values()) and val and not set(train) & set(val)
    corpus_tool.inspect_shards(out, full=True)
    printed = capsys.readouterr().out
    assert "train_000000.bin" in printed and "val_000000.bin" in printed
    assert "histogram over all" in printed and train[0][:40] in printed


def test_prepare_is_deterministic_across_workers(texts, tmp_path):
    folder, _ = texts
    for workers in (1, 2):
        corpus_tool.prepare(str(folder / "*.txt"), "bytes", tmp_path / f"w{workers}", 0.2, 300, workers)
    names = sorted(p.name for p in (tmp_path / "w1").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "w2").iterdir())
    assert all((tmp_path / "w1" / n).read_bytes() == (tmp_path / "w2" / n).read_bytes() for n in names)


def test_prepare_with_ranks_file_and_rerun(texts, tmp_path):
    folder, contents = texts
    ranks = write_ranks(tmp_path / "tiny.tiktoken", extra=(b"na", b"\xc3\xaf"))
    out = tmp_path / "out"
    corpus_tool.prepare(str(folder / "*.txt"), str(ranks), out, 0.2, 100, workers=1)
    many = len(data.find_shards(out, "train"))
    corpus_tool.prepare(str(folder / "*.txt"), str(ranks), out, 0.2, 10_000, workers=1)
    assert many > 1 and [p.name for p in data.find_shards(out, "train")] == ["train_000000.bin"]
    assert tokenizer.read_meta(out)["tokenizer"] == "tiny.tiktoken" and (out / "tiny.tiktoken").is_file()
    assert sorted(decoded_docs(out, "train") + decoded_docs(out, "val")) == sorted(contents.values())


def test_failed_prepare_leaves_no_shards(texts, tmp_path, monkeypatch):
    folder, _ = texts
    encode, calls = corpus_tool._encode_file, []

    def flaky(task):
        calls.append(task)
        if len(calls) == 6:
            raise UnicodeError("unreadable file")
        return encode(task)
    monkeypatch.setattr(corpus_tool, "_encode_file", flaky)
    out = tmp_path / "out"
    with pytest.raises(UnicodeError):
        corpus_tool.prepare(str(folder / "*.txt"), "bytes", out, 0.2, 50, workers=1)
    assert list(out.iterdir()) == []


def test_bad_prepare_inputs(texts, tmp_path):
    folder, _ = texts
    cases = [({"input_spec": str(tmp_path / "none/*.txt")}, "matches no files"),
             ({"input_spec": str(folder / "doc1.txt")}, "matches 1 file; need at least 2"),
             ({"tokenizer": "gpt5"}, "unknown tokenizer 'gpt5'"),
             ({"val_fraction": 1.0}, "--val-fraction 1.0 must be between 0 and 1"),
             ({"shard_tokens": 0}, "--shard-tokens 0 must be in")]
    for change, message in cases:
        args = {"input_spec": str(folder / "*.txt"), "tokenizer": "bytes", "out": tmp_path / "out", **change}
        with pytest.raises(ConfigError, match=message):   # DataError, or TokenizerError for the name
            corpus_tool.prepare(**args)
    assert not (tmp_path / "out").exists()


def test_inspect_full_scans_every_token(tmp_path, capsys):
    tokens = random_tokens(0, 300_000)
    tokens[10_000] = 300          # between the chunks the load-time check samples
    data.write_shard(tmp_path / "train_000000.bin", tokens)
    tokenizer.write_meta(tmp_path, "bytes", EOT, 257)
    next(data.train_batches(make_cfg(tmp_path, "model.vocab_size=301")))
    corpus_tool.inspect_shards(tmp_path)
    with pytest.raises(data.DataError, match="train_000000.bin: token id 300 >= n_vocab=257"):
        corpus_tool.inspect_shards(tmp_path, full=True)


def test_stdlib_corpus(tmp_path):
    files, root = corpus_tool.stdlib_files()
    train, val = corpus_tool.split_files(files, root, 0.05)
    assert len(files) > 100 and val and not set(train) & set(val) and set(train) | set(val) == set(files)
    assert all("site-packages" not in f.parts for f in files)
    out = tmp_path / "stdlib"
    corpus_tool.main(["prepare", "--input", "stdlib", "--tokenizer", "bytes", "--out", str(out),
                      "--workers", "1"])
    for split, held in (("train", train), ("val", val)):
        tokens = np.concatenate([data.read_shard(p) for p in data.find_shards(out, split)])
        assert int((tokens == EOT).sum()) == len(held)
    assert tokenizer.read_meta(out) == {"tokenizer": "bytes", "eot": EOT, "n_vocab": 257}
    cfg = make_cfg(out, "model.seq_len=256", "data.val_tokens=524288")
    assert next(data.train_batches(cfg))["inputs"].shape == (8, 256) and len(data.val_batches(cfg)) == 256


def test_cli_inspect(corpus, capsys):
    corpus_tool.main(["inspect", str(corpus)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{corpus}: tokenizer 'bytes', n_vocab 257, end-of-text {EOT}"
    assert lines[1].split() == ["shard", "dtype", "tokens"]
    for line, split in zip(lines[2:4], ("train", "val")):
        name, dtype, tokens = line.split()
        assert (name, dtype) == (f"{split}_000000.bin", "uint16")
        assert int(tokens.replace(",", "")) == len(data.read_shard(corpus / name))


def test_cli_reports_one_line_errors(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: .*tokenizer.json is missing"):
        corpus_tool.main(["inspect", str(tmp_path)])
    with pytest.raises(SystemExit, match="matches no files"):
        corpus_tool.main(["prepare", "--input", str(tmp_path / "*.md"), "--tokenizer", "bytes",
                          "--out", "x"])
    with pytest.raises(SystemExit, match=r"^error: argument command: invalid choice: 'bench'"):
        corpus_tool.main(["bench"])      # the loader benchmark lives in benchmarks/loader.py


def test_data_imports_no_command_line_module():
    """data.py is the library under train.py, sample.py and corpus.py: importing any of them (or
    bench.py, which imports train.py) from it would make an import cycle."""
    tree = ast.parse((Path(__file__).parent.parent / "data.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"bench", "corpus", "sample", "train", "benchmarks"}


# --- fineweb download -----------------------------------------------------------------------------


class LocalServer:
    """Serves a file like an HTTP server honoring Range, optionally failing or ignoring ranges."""

    def __init__(self, body: bytes, fail_first: int = 0, cut_at: int | None = None, ranges: bool = True):
        self.body, self.fail_first, self.cut_at, self.ranges = body, fail_first, cut_at, ranges
        self.requests = []

    def __call__(self, request, timeout):
        self.requests.append(request.get_header("Range"))
        if len(self.requests) <= self.fail_first:
            raise urllib.error.URLError("connection refused")
        start = int(self.requests[-1][6:-1]) if self.requests[-1] and self.ranges else 0
        body = self.body[start:]
        if self.cut_at is not None and len(self.requests) == 1:
            return _Dropped(body[:self.cut_at])
        response = io.BytesIO(body)
        response.status = 206 if start else 200
        return response


class _Dropped(io.BytesIO):
    """A response whose connection drops after its first chunk."""
    status = 200

    def read(self, size=-1):
        if self.tell():
            raise http.client.IncompleteRead(b"")
        return super().read(size)


@pytest.fixture
def shard_bytes(tmp_path):
    path = tmp_path / "source.bin"
    data.write_shard(path, np.arange(3000) % 50257)
    return path.read_bytes()


def test_download_file_url(tmp_path, shard_bytes):
    (tmp_path / "remote.bin").write_bytes(shard_bytes)
    dest = corpus_tool.download((tmp_path / "remote.bin").as_uri(), tmp_path / "x.bin")
    assert dest.read_bytes() == shard_bytes and not (tmp_path / "x.bin.part").exists()


def test_download_resumes_partial_file_with_range(tmp_path, shard_bytes):
    (tmp_path / "x.bin.part").write_bytes(shard_bytes[:2500])
    server = LocalServer(shard_bytes)
    corpus_tool.download("https://example/x.bin", tmp_path / "x.bin", open_url=server)
    assert server.requests == ["bytes=2500-"] and (tmp_path / "x.bin").read_bytes() == shard_bytes


def test_download_restarts_when_range_ignored(tmp_path, shard_bytes):
    (tmp_path / "x.bin.part").write_bytes(shard_bytes[:1500])
    server = LocalServer(shard_bytes, ranges=False)
    corpus_tool.download("https://example/x.bin", tmp_path / "x.bin", open_url=server)
    assert (tmp_path / "x.bin").read_bytes() == shard_bytes


def test_download_retries_and_resumes_after_drop(tmp_path, shard_bytes):
    server = LocalServer(shard_bytes, cut_at=4000)
    corpus_tool.download("https://example/x.bin", tmp_path / "x.bin", open_url=server, backoff=0)
    assert server.requests == [None, "bytes=4000-"] and (tmp_path / "x.bin").read_bytes() == shard_bytes
    flaky = LocalServer(shard_bytes, fail_first=2)
    corpus_tool.download("https://example/y.bin", tmp_path / "y.bin", open_url=flaky, backoff=0)
    assert len(flaky.requests) == 3 and (tmp_path / "y.bin").read_bytes() == shard_bytes


def test_download_failures(tmp_path, shard_bytes):
    with pytest.raises(data.DataError, match="failed its size check and was deleted"):
        corpus_tool.download("https://e/x.bin", tmp_path / "x.bin",
                             open_url=LocalServer(shard_bytes + b"junk"))
    assert list(tmp_path.iterdir()) == [tmp_path / "source.bin"]
    with pytest.raises(data.DataError, match="still incomplete after 3 attempts"):
        corpus_tool.download("https://e/x.bin", tmp_path / "x.bin", open_url=LocalServer(b"", fail_first=9),
                      retries=2, backoff=0)

    def missing(request, timeout):
        raise urllib.error.HTTPError(request.full_url, 404, "Not Found", {}, None)
    with pytest.raises(data.DataError, match="https://e/z.bin: HTTP 404 Not Found"):
        corpus_tool.download("https://e/z.bin", tmp_path / "z.bin", open_url=missing)


def test_fineweb_from_local_mirror(tmp_path, shard_bytes):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name in ("fineweb_val_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin"):
        (mirror / name).write_bytes(shard_bytes)
    out = tmp_path / "fineweb"
    corpus_tool.fineweb(2, out, base_url=mirror.as_uri() + "/")
    assert len(data.find_shards(out, "train")) == 2 and len(data.find_shards(out, "val")) == 1
    assert tokenizer.read_meta(out)["tokenizer"] == "gpt2"
    with pytest.raises(data.DataError, match=r"--train-shards 104 must be in \[1, 103\]"):
        corpus_tool.fineweb(104, out)
