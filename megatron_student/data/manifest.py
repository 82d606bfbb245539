"""Dataset manifest (YAML): what the sources are, their licenses, how they were made, and how to prepare them.

    name: demo-harmony                # required
    description: ...                  # optional
    license: CC0-1.0                  # required: license of the dataset as a whole
    sources:                          # required, non-empty
      - path: conversations/*.jsonl   # relative to the manifest; globs allowed (sorted)
        license: CC0-1.0              # required
        conversion: "..."             # required: how the records were produced or converted
        origin: https://...           # optional
    split: {valid_fraction: 0.05, salt: "v1"}
    render: {earlier_analysis: harmony, label_scope: assistant, weighting: heuristic}
    packing: {overlong: truncate, open_bins: 64}
    max_reject_fraction: 0.01
"""

from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from megatron_student.data.render import RenderConfig

OVERLONG = ("truncate", "drop")


class ManifestError(ValueError):
    pass


@dataclass(frozen=True)
class Source:
    pattern: str
    files: tuple[Path, ...]
    license: str
    conversion: str
    origin: str | None = None


@dataclass(frozen=True)
class Manifest:
    path: Path
    name: str
    license: str
    sources: tuple[Source, ...]
    description: str = ""
    valid_fraction: float = 0.05
    split_salt: str = ""
    render: RenderConfig = field(default_factory=RenderConfig)
    weighting: object = "heuristic"
    overlong: str = "truncate"
    open_bins: int = 64
    max_reject_fraction: float = 0.01
    raw: dict = field(default_factory=dict)


def _section(raw: dict, key: str, allowed: set[str], where: Path) -> dict:
    section = raw.get(key, {}) or {}
    if not isinstance(section, dict):
        raise ManifestError(f"{where}: '{key}' must be a mapping")
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise ManifestError(f"{where}: unknown key(s) {unknown} in '{key}' (allowed: {sorted(allowed)})")
    return section


def _required_text(mapping: dict, key: str, where: str) -> str:
    value = mapping.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ManifestError(f"{where}: '{key}' is required and must be a non-empty string")
    return value


def load_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{path}: manifest not found") from None
    except yaml.YAMLError as e:
        raise ManifestError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ManifestError(f"{path}: a manifest is a YAML mapping")
    top = {"name", "description", "license", "sources", "split", "render", "packing", "max_reject_fraction"}
    unknown = sorted(set(raw) - top)
    if unknown:
        raise ManifestError(f"{path}: unknown key(s) {unknown} (allowed: {sorted(top)})")
    sources_raw = raw.get("sources")
    if not isinstance(sources_raw, list) or not sources_raw:
        raise ManifestError(f"{path}: 'sources' must be a non-empty list")
    sources = []
    for i, src in enumerate(sources_raw):
        where = f"{path}: sources[{i}]"
        if not isinstance(src, dict):
            raise ManifestError(f"{where} must be a mapping")
        unknown = sorted(set(src) - {"path", "license", "conversion", "origin"})
        if unknown:
            raise ManifestError(f"{where}: unknown key(s) {unknown}")
        pattern = _required_text(src, "path", where)
        full = pattern if Path(pattern).is_absolute() else str(path.parent / pattern)
        files = tuple(Path(p) for p in sorted(glob.glob(full)))
        if not files:
            raise ManifestError(f"{where}: path {pattern!r} matches no file")
        sources.append(Source(pattern, files, _required_text(src, "license", where),
                              _required_text(src, "conversion", where), src.get("origin")))
    split = _section(raw, "split", {"valid_fraction", "salt"}, path)
    render = _section(raw, "render", {"earlier_analysis", "label_scope", "weighting"}, path)
    packing = _section(raw, "packing", {"overlong", "open_bins"}, path)
    try:
        render_config = RenderConfig(**{k: v for k, v in render.items() if k != "weighting"})
    except ValueError as e:
        raise ManifestError(f"{path}: render: {e}") from None
    overlong = packing.get("overlong", "truncate")
    if overlong not in OVERLONG:
        raise ManifestError(f"{path}: packing.overlong {overlong!r} is not one of {OVERLONG}")
    valid_fraction = float(split.get("valid_fraction", 0.05))
    if not 0.0 <= valid_fraction < 1.0:
        raise ManifestError(f"{path}: split.valid_fraction must be in [0, 1), got {valid_fraction}")
    max_reject = float(raw.get("max_reject_fraction", 0.01))
    if not 0.0 <= max_reject <= 1.0:
        raise ManifestError(f"{path}: max_reject_fraction must be in [0, 1], got {max_reject}")
    return Manifest(
        path=path, name=_required_text(raw, "name", str(path)), license=_required_text(raw, "license", str(path)),
        sources=tuple(sources), description=str(raw.get("description", "")), valid_fraction=valid_fraction,
        split_salt=str(split.get("salt", "")), render=render_config, weighting=render.get("weighting", "heuristic"),
        overlong=overlong, open_bins=int(packing.get("open_bins", 64)), max_reject_fraction=max_reject, raw=raw,
    )
