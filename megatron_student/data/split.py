"""Held-out split by hash: a record's split depends only on its key (``id`` or canonical content) and the
salt, never on file order, sharding or the run."""

from __future__ import annotations

import hashlib

SPLITS = ("train", "valid")


def split_of(key: str, valid_fraction: float, salt: str = "") -> str:
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    digest = hashlib.sha256(salt.encode("utf-8") + b"\0" + key.encode("utf-8")).digest()
    return "valid" if int.from_bytes(digest[:8], "big") / 2.0**64 < valid_fraction else "train"
