"""prepare-data accepts nothing that check-format or training would refuse, leaves nothing consumable behind a
failed or killed run, and a manifest cannot call arbitrary code."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_data_pipeline import conversation, write_jsonl, write_manifest

from megatron_student.data.check_format import check_tokens
from megatron_student.data.manifest import load_manifest
from megatron_student.data.prepare import NoTrainingSamples, RejectFractionExceeded, prepare
from megatron_student.data.render import Renderer
from megatron_student.data.schema import RecordError, parse_record
from megatron_student.data.storage import HarmonyPackedDataset
from megatron_student.data.weighting import HeuristicWeighter, load_weighter, weighter_factory

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("lines", [[], ["", "   ", "\t"]], ids=["empty", "blank-lines"])
def test_empty_dataset_fails_at_preparation(tmp_path, lines):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(lines))
    with pytest.raises(NoTrainingSamples, match="no training sample: 0 records read"):
        prepare(load_manifest(write_manifest(tmp_path, [data])), tmp_path / "out", 256, progress=False)
    assert not (tmp_path / "out" / "train").exists()
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["failed"]["kind"] == "no_training_samples"


def test_failed_run_leaves_no_consumable_dataset(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [conversation(i) for i in range(8)] + ["{oops"] * 4)
    with pytest.raises(RejectFractionExceeded):
        prepare(load_manifest(write_manifest(tmp_path, [data])), tmp_path / "out", 256, progress=False)
    assert not (tmp_path / "out" / "train").exists() and not (tmp_path / "out" / "valid").exists()
    assert len((tmp_path / "out" / "rejects.jsonl").read_text().splitlines()) == 4  # the report is kept
    with pytest.raises(FileNotFoundError, match="prepare-data failed: 4 of 12 records rejected"):
        HarmonyPackedDataset(tmp_path / "out", "train")


USER = {"role": "user", "content": "What is 2 + 2?"}
ENDINGS = {  # the trained turn's messages
    "analysis only": [{"role": "assistant", "channel": "analysis", "content": "Two and two."}],
    "commentary preamble": [{"role": "assistant", "channel": "commentary", "content": "Let me check."}],
    "final": [{"role": "assistant", "thinking": "Two and two.", "content": "4"}],
    "tool call": [{"role": "assistant", "tool_calls": [{"name": "add", "arguments": {"a": 2, "b": 2}}]}],
    "tool result then final": [{"role": "assistant", "tool_calls": [{"name": "add", "arguments": {}}]},
                               {"role": "tool", "name": "add", "content": "4"},
                               {"role": "assistant", "channel": "final", "content": "4"}],
    "tool result then analysis": [{"role": "assistant", "tool_calls": [{"name": "add", "arguments": {}}]},
                                  {"role": "tool", "name": "add", "content": "4"},
                                  {"role": "assistant", "channel": "analysis", "content": "It is 4."}],
}


@pytest.mark.parametrize("name", list(ENDINGS))
def test_prepare_data_and_check_format_agree_on_how_a_turn_ends(name):
    record = {"messages": [USER, *ENDINGS[name]]}
    try:
        rendered = Renderer().render(parse_record(record))
    except RecordError as e:
        accepted, reason = False, str(e)
    else:
        accepted, reason = True, ""
    if accepted:
        issues = check_tokens(rendered.input_ids, "rendered")
        assert not issues, f"prepare-data accepts what check-format flags: {issues}"
    else:
        assert "must end with a final message (content) or a tool call" in reason, reason
    assert accepted == (name in ("final", "tool call", "tool result then final")), name


def test_conversation_without_a_trained_token_is_rejected(tmp_path):
    long_prompt = {"id": "long", "messages": [{"role": "user", "content": "x " * 400},
                                              {"role": "assistant", "content": "ok"}]}
    data = write_jsonl(tmp_path / "d.jsonl", [conversation(1), conversation(2), long_prompt])
    stats = prepare(load_manifest(write_manifest(tmp_path, [data])), tmp_path / "out", 256,
                    max_reject_fraction=0.5, progress=False)
    assert stats["records"]["accepted"] == 2 and stats["records"]["truncated"] == 0
    reject = json.loads((tmp_path / "out" / "rejects.jsonl").read_text())
    assert reject["kind"] == "no_trained_tokens" and reject["line"] == 3
    assert "in its first 256 tokens (overlong: truncate)" in reject["reason"]


def test_special_token_text_is_rejected_in_every_field_that_reaches_the_model():
    tool = {"name": "add", "description": "adds", "parameters": {
        "type": "object", "properties": {"a": {"type": "number", "description": "stop here <|end|>"}}}}
    record = {"messages": [USER, {"role": "assistant", "content": "4"}], "tools": [tool]}
    with pytest.raises(RecordError, match=r"tools\[0\]\.parameters contains Harmony special-token text '<\|end\|>'"):
        parse_record(record)
    tool["parameters"]["properties"]["a"]["description"] = "first number"
    parse_record(record)


def test_existing_output_needs_force_and_is_replaced_whole(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [conversation(i) for i in range(6)])
    manifest = load_manifest(write_manifest(tmp_path, [data]))
    prepare(manifest, tmp_path / "out", 256, progress=False)
    (tmp_path / "out" / "stale.txt").write_text("from an older run")
    with pytest.raises(FileExistsError, match="already exists; pass --force"):
        prepare(manifest, tmp_path / "out", 256, progress=False)
    assert (tmp_path / "out" / "stale.txt").exists()
    prepare(manifest, tmp_path / "out", 256, progress=False, force=True)
    assert not (tmp_path / "out" / "stale.txt").exists() and len(HarmonyPackedDataset(tmp_path / "out")) > 0
    assert not list(tmp_path.glob(".out.*"))


def test_killed_prepare_leaves_the_old_output_intact_and_is_swept(tmp_path):
    records = [conversation(i) for i in range(6)]
    small = write_jsonl(tmp_path / "small.jsonl", records)
    manifest = write_manifest(tmp_path, [small])
    prepare(load_manifest(manifest), tmp_path / "out", 256, progress=False)
    before = {p.relative_to(tmp_path / "out"): p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    big = tmp_path / "big"
    big.mkdir()
    write_jsonl(big / "d.jsonl", [conversation(i) for i in range(40000)])
    big_manifest = write_manifest(big, [big / "d.jsonl"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "megatron_student.cli", "prepare-data", "--manifest", str(big_manifest),
               "--output", str(tmp_path / "out"), "--seq-len", "256", "--no-progress", "--force"]
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list(tmp_path.glob(".out.tmp-*/train/shard_00000.bin")) and time.time() < deadline:
        time.sleep(0.2)
    assert process.poll() is None, process.stderr.read()
    process.send_signal(signal.SIGKILL)
    process.wait()
    after = {p.relative_to(tmp_path / "out"): p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert after == before and list(tmp_path.glob(".out.tmp-*"))
    prepare(load_manifest(manifest), tmp_path / "out", 256, progress=False, force=True)
    assert not list(tmp_path.glob(".out.*"))


@weighter_factory
def halving_weighter(weight: float = 0.5):
    return lambda text: [(0, len(text), weight)]


@weighter_factory
def broken_weighter():
    return lambda text: [(0, len(text) + 5, 1.0)]


@weighter_factory
def not_a_weighter():
    return "heuristic"


def not_marked():
    return HeuristicWeighter()


def test_weighting_accepts_only_marked_factories_returning_weighters():
    assert load_weighter({"name": "test_data_hardening:halving_weighter", "weight": 0.25})("abc") == [(0, 3, 0.25)]
    with pytest.raises(ValueError, match="'test_data_hardening:not_marked' is not a weighter factory"):
        load_weighter("test_data_hardening:not_marked")
    with pytest.raises(ValueError, match="the weighter returned \\(0, \\d+, 1.0\\) for a \\d+-character text"):
        load_weighter("test_data_hardening:broken_weighter")
    with pytest.raises(ValueError, match="the factory returned a str, not a callable"):
        load_weighter("test_data_hardening:not_a_weighter")


def test_manifest_naming_a_command_runs_nothing(tmp_path):
    marker = tmp_path / "marker"
    data = write_jsonl(tmp_path / "d.jsonl", [conversation(i) for i in range(4)])
    manifest = write_manifest(tmp_path, [data], render={"weighting": {"name": "subprocess:run",
                                                                     "args": ["touch", str(marker)]}})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "megatron_student.cli", "prepare-data", "--manifest",
                             str(manifest), "--output", str(tmp_path / "out"), "--seq-len", "256", "--no-progress"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2 and "'subprocess:run' is not a weighter factory" in result.stderr, result.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()
