"""The handoff bundle's manifest: every file hashed; a changed, missing or extra file is named. (The whole bundle
and its readiness check on the demo's student: test_demo.py.)"""

import json

from megatron_student.files import sha256_file
from megatron_student.handoff import MANIFEST, manifest_checks, write_manifest


def test_manifest_names_changed_missing_and_extra_files(tmp_path):
    (tmp_path / "student").mkdir()
    (tmp_path / "student" / "model.safetensors").write_bytes(bytes(range(256)))
    (tmp_path / "notes.md").write_text("# notes\n")
    manifest = write_manifest(tmp_path)
    assert set(manifest["files"]) == {"student/model.safetensors", "notes.md"}
    assert manifest["files"]["notes.md"]["sha256"] == sha256_file(tmp_path / "notes.md")
    assert json.loads((tmp_path / MANIFEST).read_text()) == manifest
    assert [c.passed for c in manifest_checks(tmp_path)] == [True]

    weights = tmp_path / "student" / "model.safetensors"
    weights.write_bytes(bytes(range(255)) + b"\x00")  # one byte changed
    (tmp_path / "notes.md").unlink()
    (tmp_path / "extra.txt").write_text("x")
    (check,) = manifest_checks(tmp_path)
    assert not check.passed
    assert check.detail == ("notes.md: missing; extra.txt: not in the manifest; "
                            "student/model.safetensors: SHA-256 differs from the manifest")
    (tmp_path / MANIFEST).unlink()
    assert manifest_checks(tmp_path)[0].detail.endswith("manifest.json: missing")
