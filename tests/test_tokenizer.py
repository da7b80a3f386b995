"""Tests for tokenizer.py: tiktoken encodings by name, the record beside a data folder, and the
tokenizer a model decodes with. CPU only, no network."""
import base64

import pytest

import tokenizer
from configs.base import Config, DataConfig, ModelConfig

from test_data import EOT


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
    257-token vocabulary; a tokenizer wider than the model, or none at all, is refused saying why,
    with the command line's hint where it has a --tokenizer flag."""
    def cfg(vocab):
        return Config(model=ModelConfig(vocab_size=vocab, n_layers=1, d_model=32, n_heads=2, seq_len=16),
                      data=DataConfig(path=str(tmp_path)))
    assert tokenizer.for_model(cfg(257)).name == "bytes"
    with pytest.raises(tokenizer.NoTokenizer, match=r"tokenizer.json is missing$"):
        tokenizer.for_model(cfg(300))
    with pytest.raises(tokenizer.NoTokenizer, match=r"tokenizer.json is missing; pass --tokenizer bytes\|gpt2"):
        tokenizer.for_model(cfg(300), hint=tokenizer.FLAG_HINT)
    assert tokenizer.for_model_or_reason(cfg(300))[0] is None
    with pytest.raises(tokenizer.NoTokenizer, match="'bytes' has 257 ids but model.vocab_size is 100$"):
        tokenizer.for_model(cfg(100), "bytes")
    with pytest.raises(tokenizer.TokenizerError, match="unknown tokenizer 'gpt3'"):
        tokenizer.for_model_or_reason(cfg(300), "gpt3")   # a name that is no tokenizer is not "none fits"
    tokenizer.write_meta(tmp_path, "bytes", EOT, 257)
    assert tokenizer.for_model(cfg(300)).eot_token == EOT


@pytest.mark.parametrize("text, message", [
    ("{not json", "is not a readable tokenizer record"),
    ('{"tokenizer": "bytes", "n_vocab": 257}', "eot missing or of the wrong type"),
    ('["bytes", 256, 257]', "tokenizer, eot, n_vocab missing or of the wrong type"),
])
def test_a_bad_tokenizer_record_is_one_line(tmp_path, text, message):
    (tmp_path / tokenizer.META_FILE).write_text(text)
    with pytest.raises(tokenizer.TokenizerError, match=message) as err:
        tokenizer.load_tokenizer(tmp_path)
    assert str(err.value).startswith(str(tmp_path / tokenizer.META_FILE)) and "\n" not in str(err.value)
