"""File helpers shared by the vocabulary check, the offline capture and the handoff bundle."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: Path, into=None) -> str:
    """The SHA-256 of a file's bytes, read in 4 MiB blocks; with ``into`` (a hashlib object) the bytes are added to
    it instead and "" is returned."""
    h = into if into is not None else hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest() if into is None else ""
