"""Offline o200k_base vocabulary for openai-harmony.

Harmony reads ``$TIKTOKEN_ENCODINGS_BASE/o200k_base.tiktoken`` and otherwise downloads it. Clusters and CI
have no internet, so we rebuild the exact file from the ranks that the ``quicktok-v1`` wheel ships, verify
its SHA-256 and point ``TIKTOKEN_ENCODINGS_BASE`` at it before harmony loads.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import struct
import tempfile
from pathlib import Path

from .files import sha256_file

# The Harmony special tokens of gpt-oss's o200k_harmony vocabulary (one table for the package).
STARTOFTEXT = 199998  # gpt-oss's bos_token_id
ENDOFTEXT = 199999  # pad_token_id, and the padding after a finished turn
RETURN, CONSTRAIN, CHANNEL, START, END, MESSAGE = 200002, 200003, 200005, 200006, 200007, 200008
CALL = 200012
HARMONY_MAX_TOKEN_ID = 200018  # <|endofprompt|>, the highest special token
# Ids that end an assistant turn: <|return|>, <|call|>, and <|endoftext|> (gpt-oss generation_config).
HARMONY_STOP_TOKEN_IDS = [RETURN, CALL, ENDOFTEXT]
GPT_OSS_VOCAB_SIZE = 201088  # the model's (padded) vocabulary

O200K_FILENAME = "o200k_base.tiktoken"
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
O200K_NUM_RANKS = 199998
# A user's own copy: a file, or a directory holding o200k_base.tiktoken.
VOCAB_ENV = "MEGATRON_STUDENT_O200K"
CACHE_ENV = "MEGATRON_STUDENT_CACHE"


class VocabularyError(RuntimeError):
    pass


def verify_vocab_file(path: Path) -> Path:
    if not path.is_file():
        raise VocabularyError(f"{path}: no such vocabulary file")
    digest = sha256_file(path)
    if digest != O200K_SHA256:
        raise VocabularyError(
            f"{path}: SHA-256 {digest} is not the o200k_base.tiktoken harmony expects ({O200K_SHA256}); "
            f"remove it or point {VOCAB_ENV} at a correct copy"
        )
    return path


def _quicktok_ranks_path() -> Path:
    try:
        import quicktok
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise VocabularyError("quicktok-v1 is not installed; `pip install quicktok-v1` or set " + VOCAB_ENV) from e
    path = Path(quicktok.__file__).parent / "data" / "o200k.vocab"
    if not path.is_file():
        raise VocabularyError(f"{path}: quicktok-v1 ships no o200k ranks; set {VOCAB_ENV} to your own copy")
    return path


def render_tiktoken_from_quicktok(ranks_path: Path) -> bytes:
    """quicktok's o200k.vocab is ``u32 count`` then ``(u16 len, bytes, u32 rank)`` records; tiktoken's
    format is one ``base64(bytes) rank`` line per token in rank order."""
    blob = ranks_path.read_bytes()
    (count,) = struct.unpack_from("<I", blob, 0)
    if count != O200K_NUM_RANKS:
        raise VocabularyError(f"{ranks_path}: holds {count} ranks, o200k_base has {O200K_NUM_RANKS}")
    tokens: list[bytes | None] = [None] * count
    offset = 4
    for _ in range(count):
        (length,) = struct.unpack_from("<H", blob, offset)
        token = blob[offset + 2 : offset + 2 + length]
        (rank,) = struct.unpack_from("<I", blob, offset + 2 + length)
        offset += 6 + length
        if rank >= count or tokens[rank] is not None:
            raise VocabularyError(f"{ranks_path}: bad or repeated rank {rank} at byte {offset}")
        tokens[rank] = token
    if offset != len(blob):
        raise VocabularyError(f"{ranks_path}: {len(blob) - offset} trailing bytes after the last rank")
    return b"".join(base64.b64encode(t) + b" %d\n" % r for r, t in enumerate(tokens))


def cache_home() -> Path:
    """The project's cache directory: ``$MEGATRON_STUDENT_CACHE``, else ``~/.cache/megatron_student``."""
    return Path(os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "megatron_student"))


def default_cache_dir() -> Path:
    return cache_home() / "tiktoken"


def materialise_vocab(cache_dir: Path) -> Path:
    target = cache_dir / O200K_FILENAME
    if target.exists():
        return verify_vocab_file(target)
    data = render_tiktoken_from_quicktok(_quicktok_ranks_path())
    digest = hashlib.sha256(data).hexdigest()
    if digest != O200K_SHA256:
        raise VocabularyError(
            f"o200k_base rebuilt from {_quicktok_ranks_path()} hashes to {digest}, not {O200K_SHA256}; "
            f"this quicktok-v1 version ships other ranks: set {VOCAB_ENV} to a verified copy"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".o200k.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, target)  # atomic: concurrent ranks never see a half-written file
    return target


def ensure_harmony_vocab(vocab: str | os.PathLike | None = None) -> Path:
    """Return a verified o200k_base.tiktoken and set TIKTOKEN_ENCODINGS_BASE to its directory.

    Order: the ``vocab`` argument (file or directory), ``$MEGATRON_STUDENT_O200K``, an already set
    ``$TIKTOKEN_ENCODINGS_BASE`` that holds the file, else the cache built from quicktok-v1.
    """
    given = vocab or os.environ.get(VOCAB_ENV)
    if given:
        path = Path(given)
        if path.is_dir():
            path = path / O200K_FILENAME
        path = verify_vocab_file(path)
    elif os.environ.get("TIKTOKEN_ENCODINGS_BASE") and (
        Path(os.environ["TIKTOKEN_ENCODINGS_BASE"]) / O200K_FILENAME
    ).exists():
        path = verify_vocab_file(Path(os.environ["TIKTOKEN_ENCODINGS_BASE"]) / O200K_FILENAME)
    else:
        path = materialise_vocab(default_cache_dir())
    if path.name != O200K_FILENAME:
        raise VocabularyError(f"{path}: harmony only reads a file named {O200K_FILENAME}; rename it")
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(path.parent.resolve())
    return path


@functools.lru_cache(maxsize=1)
def harmony_encoding():
    """The gpt-oss Harmony encoding, loaded offline."""
    ensure_harmony_vocab()
    from openai_harmony import HarmonyEncodingName, load_harmony_encoding

    return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
