"""Tests for corpus.py: prepare (text files to shards), inspect, and the fineweb downloader
(against a local fake server). CPU only, no network, small shapes."""
import ast
import http.client
import io
import urllib.error
from pathlib import Path

import numpy as np
import pytest

import corpus as corpus_tool    # conftest's session fixture is named `corpus`
import data
import tokenizer

from test_data import EOT, make_cfg, random_tokens
from test_tokenizer import write_ranks


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
    cases = [({"input_spec": str(tmp_path / "none/*.txt")}, data.DataError, "matches no files"),
             ({"input_spec": str(folder / "doc1.txt")}, data.DataError, "matches 1 file; need at least 2"),
             ({"tokenizer": "gpt5"}, tokenizer.TokenizerError, "unknown tokenizer 'gpt5'"),
             ({"val_fraction": 1.0}, data.DataError, "--val-fraction 1.0 must be between 0 and 1"),
             ({"shard_tokens": 0}, data.DataError, "--shard-tokens 0 must be in")]
    for change, error, message in cases:
        args = {"input_spec": str(folder / "*.txt"), "tokenizer": "bytes", "out": tmp_path / "out", **change}
        with pytest.raises(error, match=message):
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
