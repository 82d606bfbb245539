"""Per-token weights for ``analysis`` (reasoning) content.

A weighter is any callable ``weighter(text) -> list[(start, end, weight)]`` over character spans of one
analysis message; characters outside every span keep weight 1.0. The renderer maps spans to tokens by
byte offsets (a token takes the weight of the span holding its first byte), so weighters never see or
change tokenisation.

A manifest picks one by name (``heuristic``, ``uniform``) or as ``package.module:factory``. The latter imports that
module (installed code runs at import) and calls the factory, so only factories that say they are one are
accepted: decorated with :func:`weighter_factory`. Anything else (``subprocess:run``, ``os:system``) is refused
before it is called, and what the factory returns is checked on a probe text before prepare-data uses it.

Default (``heuristic``): the text is cut into chunks (lines; long lines into sentences). Math-like chunks
(arithmetic between numbers, equations, LaTeX) and code-like chunks (fenced blocks, statements, calls)
get ``math_weight``/``code_weight`` (1.5); a boilerplate opener ("Okay, so the user wants…", "We need
to…") as the message's first chunk gets ``opener_weight`` (0.5); everything else 1.0.
"""

from __future__ import annotations

import base64
import functools
import importlib
import re
from typing import Callable, Sequence

import numpy as np

Span = tuple[int, int, float]
Weighter = Callable[[str], Sequence[Span]]

_CHUNK = re.compile(r"[^\n]*\n?")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_LONG_LINE = 160
_MATH = re.compile(
    r"\d\s*[-+*/^=×÷<>≤≥]\s*[-\d(]"      # 3 * 4, 2^10, x = -1 after a number
    r"|[a-zA-Z)]\s*\^\s*\d"               # x^2
    r"|[a-zA-Z)\]]\s*=\s*-?[\d(]"         # y = 3, f(x) = (…
    r"|\\(?:frac|sqrt|sum|int|cdot|times|le|ge|pi)\b"
    r"|[∑∫√π≈≠]"
)
_CODE = re.compile(
    r"^\s*(?:def |class |return\b|import |from \S+ import |for .+:\s*$|while .+:\s*$|if .+:\s*$|elif |else:"
    r"|#include|fn |let |const |var |function\b|public |private |SELECT |print\()"
    r"|[{};]\s*$"
    r"|`[^`\n]+`"
    r"|\b[A-Za-z_][\w.]*\([^()\n]*\)\s*(?:==|!=|=|$|\.)"
    r"|^\s{4,}\S",
    re.MULTILINE,
)
_OPENER = re.compile(
    r"^\s*(?:okay|ok|alright|all right|sure|hmm+|well|so|let me think|let's see|let me see|we need to|we have to"
    r"|i need to|i should|the user (?:asks|wants|is asking|said|says)|user asks)\b",
    re.IGNORECASE,
)


def _chunks(text: str):
    """Yield (start, end) character spans: lines, long lines split at sentence ends."""
    for line in _CHUNK.finditer(text):
        start, end = line.span()
        if start == end:
            continue
        if end - start <= _LONG_LINE:
            yield start, end
            continue
        cut = start
        for m in _SENTENCE_END.finditer(text, start, end):
            yield cut, m.end()
            cut = m.end()
        if cut < end:
            yield cut, end


class HeuristicWeighter:
    """The default chunk weighting described in the module docstring."""

    def __init__(self, math_weight: float = 1.5, code_weight: float = 1.5, opener_weight: float = 0.5):
        self.math_weight = float(math_weight)
        self.code_weight = float(code_weight)
        self.opener_weight = float(opener_weight)

    def __call__(self, text: str) -> list[Span]:
        spans: list[Span] = []
        in_fence = False
        first = True
        for start, end in _chunks(text):
            chunk = text[start:end]
            fence = chunk.lstrip().startswith("```")
            if fence or in_fence:
                weight = self.code_weight
            elif _CODE.search(chunk):
                weight = self.code_weight
            elif _MATH.search(chunk):
                weight = self.math_weight
            elif first and _OPENER.match(chunk):
                weight = self.opener_weight
            else:
                weight = 1.0
            if fence:
                in_fence = not in_fence
            if chunk.strip():
                first = False
            if weight != 1.0:
                spans.append((start, end, weight))
        return spans


def uniform_weighter(text: str) -> list[Span]:
    """Every analysis token weighs 1.0."""
    return []


def weighter_factory(factory: Callable[..., Weighter]) -> Callable[..., Weighter]:
    """Mark ``factory`` as one a manifest may name (``render.weighting: package.module:factory``)."""
    factory.is_weighter_factory = True
    return factory


_PROBE = "Okay, so 2 + 2 = 4.\n```\nprint(2 + 2)\n```\nThat's it."


def _checked(weighter, name: str) -> Weighter:
    """``weighter`` after a probe call: a callable returning (start, end, weight) spans inside the text."""
    if not callable(weighter):
        raise ValueError(f"weighting {name!r}: the factory returned a {type(weighter).__name__}, not a callable "
                         "weighter(text) -> [(start, end, weight), ...]")
    spans = weighter(_PROBE)
    if not isinstance(spans, (list, tuple)):
        raise ValueError(f"weighting {name!r}: the weighter returned a {type(spans).__name__}, not a list of "
                         "(start, end, weight) spans")
    for span in spans:
        if not (isinstance(span, (list, tuple)) and len(span) == 3 and isinstance(span[0], int)
                and isinstance(span[1], int) and isinstance(span[2], (int, float))
                and 0 <= span[0] <= span[1] <= len(_PROBE) and np.isfinite(span[2]) and span[2] >= 0):
            raise ValueError(f"weighting {name!r}: the weighter returned {span!r} for a {len(_PROBE)}-character text; "
                             "spans are (start, end, weight) with 0 <= start <= end <= len(text), weight finite >= 0")
    return weighter


def load_weighter(spec) -> Weighter:
    """``"heuristic"``, ``"uniform"``, ``{"name": "heuristic", <kwargs>}`` or ``"package.module:factory"``
    (a factory decorated with :func:`weighter_factory`, called without arguments or with the kwargs given as
    ``{"name": "pkg.mod:factory", ...}``)."""
    if isinstance(spec, str):
        name, kwargs = spec, {}
    elif isinstance(spec, dict) and isinstance(spec.get("name"), str):
        name, kwargs = spec["name"], {k: v for k, v in spec.items() if k != "name"}
    else:
        raise ValueError(f"weighting must be a name or {{name: ..., <options>}}, got {spec!r}")
    if name == "heuristic":
        return HeuristicWeighter(**kwargs)
    if name == "uniform":
        if kwargs:
            raise ValueError(f"weighting 'uniform' takes no options, got {sorted(kwargs)}")
        return uniform_weighter
    if ":" not in name:
        raise ValueError(f"unknown weighting {name!r}: use heuristic, uniform or package.module:factory")
    module, attr = name.split(":", 1)
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"weighting {name!r}: cannot import it ({e})") from None
    if getattr(factory, "is_weighter_factory", False) is not True:
        raise ValueError(f"weighting {name!r} is not a weighter factory (decorate it with "
                         "megatron_student.data.weighting.weighter_factory); refused, a manifest may not call "
                         "arbitrary code")
    return _checked(factory(**kwargs), name)


@functools.lru_cache(maxsize=1)
def token_byte_lengths() -> np.ndarray:
    """Byte length of every ordinary o200k token (ranks 0..199997), read from the verified vocabulary."""
    from megatron_student.harmony_vocab import O200K_NUM_RANKS, ensure_harmony_vocab

    lengths = np.zeros(O200K_NUM_RANKS, dtype=np.int64)
    with open(ensure_harmony_vocab(), "rb") as f:
        for line in f:
            token, rank = line.split()
            lengths[int(rank)] = len(base64.b64decode(token))
    return lengths


def _char_to_byte_offsets(text: str) -> np.ndarray:
    """offsets[i] = UTF-8 byte offset of character i (length len(text) + 1)."""
    codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    widths = 1 + (codepoints >= 0x80) + (codepoints >= 0x800) + (codepoints >= 0x10000)
    return np.concatenate(([0], np.cumsum(widths)))


def token_weights(weighter: Weighter, text: str, tokens: np.ndarray) -> np.ndarray:
    """Weights (float32, one per token) for ``tokens``, the rendering of ``text``."""
    weights = np.ones(len(tokens), dtype=np.float32)
    spans = weighter(text)
    if not spans:
        return weights
    token_starts = np.concatenate(([0], np.cumsum(token_byte_lengths()[tokens])[:-1]))
    char_bytes = None if text.isascii() else _char_to_byte_offsets(text)
    for start, end, weight in spans:
        if not 0 <= start <= end <= len(text):
            raise ValueError(f"weighter span ({start}, {end}) outside a text of {len(text)} characters")
        if char_bytes is not None:
            start, end = char_bytes[start], char_bytes[end]
        lo, hi = np.searchsorted(token_starts, [start, end], side="left")
        weights[lo:hi] = weight
    return weights
