"""Tests for data.py: the shard format and the grain loader (tokenizer.py is tests/test_tokenizer.py,
corpus.py tests/test_corpus.py). CPU only, no network, small shapes."""

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
