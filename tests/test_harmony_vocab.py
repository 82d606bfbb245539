import hashlib

import pytest

from megatron_student import harmony_vocab as hv


def test_materialised_vocab_hash_and_env(tmp_path, monkeypatch):
    monkeypatch.delenv(hv.VOCAB_ENV, raising=False)
    monkeypatch.delenv("TIKTOKEN_ENCODINGS_BASE", raising=False)
    monkeypatch.setenv(hv.CACHE_ENV, str(tmp_path))
    path = hv.ensure_harmony_vocab()
    assert path == tmp_path / "tiktoken" / hv.O200K_FILENAME
    assert hashlib.sha256(path.read_bytes()).hexdigest() == hv.O200K_SHA256
    import os

    assert os.environ["TIKTOKEN_ENCODINGS_BASE"] == str(path.parent.resolve())
    # second call reuses the cached file
    assert hv.ensure_harmony_vocab() == path


def test_wrong_hash_is_refused(tmp_path, monkeypatch):
    bad = tmp_path / hv.O200K_FILENAME
    bad.write_bytes(b"aGVsbG8= 0\n")
    monkeypatch.setenv(hv.VOCAB_ENV, str(tmp_path))
    with pytest.raises(hv.VocabularyError, match=r"o200k_base.tiktoken.*SHA-256"):
        hv.ensure_harmony_vocab()


def test_corrupted_cache_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv(hv.VOCAB_ENV, raising=False)
    monkeypatch.delenv("TIKTOKEN_ENCODINGS_BASE", raising=False)
    monkeypatch.setenv(hv.CACHE_ENV, str(tmp_path))
    target = tmp_path / "tiktoken" / hv.O200K_FILENAME
    target.parent.mkdir(parents=True)
    target.write_bytes(b"truncated")
    with pytest.raises(hv.VocabularyError, match=str(target)):
        hv.ensure_harmony_vocab()


def test_user_copy_via_argument(tmp_path, monkeypatch):
    monkeypatch.setenv(hv.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(hv.VOCAB_ENV, raising=False)
    good = hv.materialise_vocab(tmp_path / "cache")
    assert hv.ensure_harmony_vocab(good) == good


def test_harmony_loads_offline_and_round_trips():
    enc = hv.harmony_encoding()
    text = "The quick brown fox — 速い"
    assert enc.decode_utf8(enc.encode(text)) == text
    assert set(enc.stop_tokens()) == {200002, 200007, 200012}
