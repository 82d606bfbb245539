"""Packing, storage, split stability, prepare-data end to end, and every kind of malformed input."""

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from megatron_student.cli import main as cli_main
from megatron_student.data.manifest import ManifestError, load_manifest
from megatron_student.data.packing import FirstFitPacker
from megatron_student.data.prepare import RejectFractionExceeded, prepare
from megatron_student.data.render import FLAG_ANALYSIS, FLAG_FINAL, FLAG_LABEL, RenderedConversation
from megatron_student.data.split import split_of
from megatron_student.data.storage import HarmonyPackedDataset, PackedShardWriter, ResumableSampler, collate_packed

DEMO = Path(__file__).resolve().parents[1] / "megatron_student" / "assets"


def fake_doc(doc_id: int, length: int) -> RenderedConversation:
    ids = np.full(length, doc_id, dtype=np.int32)
    flags = np.where(np.arange(length) % 3 == 0, FLAG_LABEL | FLAG_FINAL, FLAG_ANALYSIS).astype(np.uint8)
    flags[0] = 0
    return RenderedConversation(ids, flags, np.arange(length, dtype=np.float32) / length)


def test_packing_and_storage_keep_every_boundary(tmp_path):
    rng = random.Random(0)
    seq_len = 64
    docs = [fake_doc(i + 1, rng.randint(1, seq_len)) for i in range(300)]
    packer = FirstFitPacker(seq_len, open_bins=4)
    writer = PackedShardWriter(tmp_path / "train", seq_len, shard_tokens=1000)
    for doc in docs:
        for sample in packer.add(doc):
            writer.write_sample(sample)
    for sample in packer.flush():
        writer.write_sample(sample)
    index = writer.close()
    assert len(index["shards"]) > 1  # shard rotation exercised

    ds = HarmonyPackedDataset(tmp_path, "train")
    seen = []
    for i in range(len(ds)):
        item = ds[i]
        cu = item["cu_seqlens"].numpy()
        assert cu[0] == 0 and cu[-1] == seq_len and np.all(np.diff(cu) > 0)
        for a, b in zip(cu[:-1], cu[1:]):
            segment = item["input_ids"][a:b].numpy()
            assert (item["position_ids"][a:b].numpy() == np.arange(b - a)).all()
            if b > item["num_tokens"]:  # the padding segment
                assert a == item["num_tokens"] and (item["labels"][a:b] == -100).all()
                continue
            doc = docs[segment[0] - 1]
            np.testing.assert_array_equal(segment, doc.input_ids)
            np.testing.assert_array_equal(item["labels"][a:b].numpy(), doc.labels)
            np.testing.assert_array_equal(item["analysis_mask"][a:b].numpy(), doc.analysis_mask)
            np.testing.assert_array_equal(item["final_mask"][a:b].numpy(), doc.final_mask)
            np.testing.assert_array_equal(item["analysis_weight"][a:b].numpy(), doc.analysis_weight)
            seen.append(int(segment[0]))
    assert sorted(seen) == list(range(1, len(docs) + 1))

    batch = collate_packed([ds[0], ds[1]])
    assert batch["input_ids"].shape == (2, seq_len)
    assert batch["cu_seqlens"][-1] == 2 * seq_len
    assert len(batch["cu_seqlens"]) == len(ds[0]["cu_seqlens"]) + len(ds[1]["cu_seqlens"]) - 1


def test_packer_refuses_overlong_docs():
    with pytest.raises(ValueError, match="cannot pack a conversation of 9 tokens into seq_len 8"):
        list(FirstFitPacker(8).add(fake_doc(1, 9)))


def test_sampler_is_deterministic_and_resumes():
    sampler = ResumableSampler(101, seed=3)
    it = iter(sampler)
    head = [next(it) for _ in range(40)]
    state = sampler.state_dict()
    rest = list(it)
    resumed = ResumableSampler(101, seed=3)
    resumed.load_state_dict(state)
    assert list(resumed) == rest and sorted(head + rest) == list(range(101))
    assert list(resumed) != head + rest  # the next epoch has another order, and it is reproducible
    assert list(ResumableSampler(101, seed=3)) == head + rest
    ranks = [list(ResumableSampler(101, seed=3, rank=r, world_size=4)) for r in range(4)]
    assert len({len(r) for r in ranks}) == 1 and len(set().union(*ranks)) == 4 * 25
    with pytest.raises(ValueError, match="seed"):
        ResumableSampler(101, seed=4).load_state_dict(state)


def conversation(i: int) -> dict:
    return {"id": f"c{i}", "messages": [
        {"role": "user", "content": f"What is {i} + {i}?"},
        {"role": "assistant", "thinking": f"We need {i} + {i} = {2 * i}.", "content": str(2 * i)}]}


def write_jsonl(path: Path, lines) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def write_manifest(directory: Path, paths, **extra) -> Path:
    manifest = {"name": "t", "license": "CC0-1.0",
                "sources": [{"path": str(p), "license": "CC0-1.0", "conversion": "synthetic"} for p in paths],
                "split": {"valid_fraction": 0.3, "salt": "s"}} | extra
    path = directory / "manifest.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path


def stored_conversations(out: Path, split: str) -> Counter:
    return Counter(tuple(t.tolist()) for t in HarmonyPackedDataset(out, split).conversations())


def test_split_is_stable_under_reordering_and_resharding(tmp_path):
    records = [conversation(i) for i in range(60)] + [  # records without id hash their content
        {"prompt": f"say {w}", "response": w} for w in ("alpha", "beta", "gamma", "delta", "epsilon", "zeta")]
    one = write_jsonl(tmp_path / "one.jsonl", records)
    shuffled = records[:]
    random.Random(1).shuffle(shuffled)
    shards = [write_jsonl(tmp_path / f"part{k}.jsonl", shuffled[k::3]) for k in range(3)]
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a = prepare(load_manifest(write_manifest(tmp_path / "a", [one])), tmp_path / "a" / "out", 512, progress=False)
    prepare(load_manifest(write_manifest(tmp_path / "b", shards)), tmp_path / "b" / "out", 512, progress=False)
    assert 0 < a["splits"]["valid"]["conversations"] < len(records)
    for split in ("train", "valid"):
        assert stored_conversations(tmp_path / "a" / "out", split) == stored_conversations(tmp_path / "b" / "out", split)
    assert split_of("id:c1", 0.5, "x") == split_of("id:c1", 0.5, "x")
    assert {split_of(f"id:c{i}", 0.5, "x") for i in range(50)} == {"train", "valid"}


def test_prepare_demo_dataset_end_to_end(tmp_path):
    out = tmp_path / "out"
    assert cli_main(["prepare-data", "--manifest", str(DEMO / "demo_manifest.yaml"), "--output", str(out),
                     "--seq-len", "1024", "--no-progress"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    lines = [line for source in load_manifest(DEMO / "demo_manifest.yaml").sources for path in source.files
             for line in path.read_text().splitlines()]
    assert len(lines) == 425
    assert stats["records"]["accepted"] == len(lines) and stats["records"]["rejected"] == 0
    train, valid = stats["splits"]["train"], stats["splits"]["valid"]
    assert train["conversations"] + valid["conversations"] == len(lines) and valid["conversations"] > 0
    assert 0 < train["analysis_tokens"] and 0 < train["final_tokens"]
    assert train["rendered_length_percentiles"]["p50"] <= train["rendered_length_percentiles"]["max"] <= 1024
    assert (out / "length_histogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ds = HarmonyPackedDataset(out, "train")
    assert len(ds) == train["samples"]
    assert sum(int(ds[i]["num_tokens"]) for i in range(len(ds))) == train["tokens"]
    assert cli_main(["check-format", str(out), "--split", "valid"]) == 0


def test_overlong_truncate_and_drop_are_counted(tmp_path):
    long = {"id": "long", "messages": [{"role": "user", "content": "hi"},
                                       {"role": "assistant", "content": "ok " * 400}]}  # truncated in the reply
    data = write_jsonl(tmp_path / "d.jsonl", [conversation(1), long])
    manifest = load_manifest(write_manifest(tmp_path, [data]))
    stats = prepare(manifest, tmp_path / "t", 256, progress=False)
    assert stats["records"]["truncated"] == 1 and stats["records"]["accepted"] == 2
    assert json.loads((tmp_path / "t" / "truncated.jsonl").read_text())["line"] == 2
    with pytest.raises(RejectFractionExceeded, match="1 of 2 records rejected"):
        prepare(manifest, tmp_path / "d", 256, overlong="drop", progress=False)
    reject = json.loads((tmp_path / "d" / "rejects.jsonl").read_text())
    assert reject["line"] == 2 and reject["kind"] == "too_long" and "> seq_len 256" in reject["reason"]


GOOD = json.dumps(conversation(0))
MALFORMED = [
    ("{not json", "invalid_json", "invalid JSON"),
    ("[1, 2]", "invalid_record", "must be a JSON object"),
    ('{"text": "hello"}', "invalid_record", "neither 'messages' nor 'prompt' and 'response'"),
    ('{"messages": []}', "invalid_record", "non-empty list"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "invalid_record", "messages[0].role 'robot'"),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}',
     "invalid_record", "messages[0].content must be a string"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning": "r"}]}',
     "invalid_record", "unknown key(s) 'reasoning'"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, '
     '{"role": "user", "content": "more"}]}', "invalid_record", "must end with an assistant message"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [{"name": "f"}]}, '
     '{"role": "tool", "content": "r"}, {"role": "assistant", "content": "a"}]}',
     "invalid_record", "messages[2].name must be a string"),
    ('{"messages": [{"role": "user", "content": "say <|end|>"}, {"role": "assistant", "content": "a"}]}',
     "invalid_record", "special-token text '<|end|>'"),
    ('{"reasoning_effort": "max", "prompt": "q", "response": "a"}', "invalid_record", "reasoning_effort 'max'"),
    ('{"prompt": "q", "response": "a", "thinking": "x", "reasoning_content": "y"}',
     "invalid_record", "both 'thinking' and 'reasoning_content'"),
    ('{"prompt": "q", "response": "  "}', "invalid_record", "messages[1].content is empty"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "channel": "chat", "content": "a"}]}',
     "invalid_record", "channel 'chat'"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, '
     '{"role": "system", "content": "late"}, {"role": "assistant", "content": "b"}]}',
     "invalid_record", "must come before the first user message"),
    (b'{"prompt": "\xff", "response": "a"}', "invalid_json", "not UTF-8"),
]


@pytest.mark.parametrize("line,kind,reason", MALFORMED, ids=[m[2][:30] for m in MALFORMED])
def test_malformed_record_is_rejected_with_file_line_and_reason(tmp_path, line, kind, reason):
    data = tmp_path / "bad.jsonl"
    with open(data, "wb") as f:
        f.write((GOOD + "\n\n" + GOOD + "\n").encode())
        f.write(line if isinstance(line, bytes) else line.encode())
        f.write(("\n" + GOOD + "\n").encode())
    manifest = load_manifest(write_manifest(tmp_path, [data]))
    stats = prepare(manifest, tmp_path / "out", 512, max_reject_fraction=0.5, progress=False)
    assert stats["records"] == {"read": 4, "accepted": 3, "rejected": 1, "truncated": 0, "blank_lines": 1,
                                "rejected_by_kind": {kind: 1}}
    rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 1
    assert rejects[0]["file"] == str(data) and rejects[0]["line"] == 4 and rejects[0]["kind"] == kind
    assert reason in rejects[0]["reason"]


def test_reject_fraction_fails_the_cli(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [conversation(1), "{oops", conversation(2)])
    manifest = write_manifest(tmp_path, [data], max_reject_fraction=0.2)
    assert cli_main(["prepare-data", "--manifest", str(manifest), "--output", str(tmp_path / "o"),
                     "--seq-len", "256", "--no-progress"]) == 1
    assert "1 of 3 records rejected" in capsys.readouterr().err
    assert cli_main(["prepare-data", "--manifest", str(manifest), "--output", str(tmp_path / "o2"),
                     "--seq-len", "256", "--no-progress", "--max-reject-fraction", "0.5"]) == 0


@pytest.mark.parametrize("edit,message", [
    (lambda m: m.pop("license"), "'license' is required"),
    (lambda m: m["sources"][0].pop("conversion"), "sources[0]: 'conversion' is required"),
    (lambda m: m["sources"][0].update(path="missing*.jsonl"), "matches no file"),
    (lambda m: m.update(packing={"overlong": "wrap"}), "packing.overlong 'wrap'"),
    (lambda m: m.update(render={"label_scope": "user"}), "label_scope 'user'"),
    (lambda m: m.update(extra=1), "unknown key(s) ['extra']"),
])
def test_manifest_errors_name_the_file_and_field(tmp_path, edit, message):
    data = write_jsonl(tmp_path / "d.jsonl", [conversation(1)])
    path = write_manifest(tmp_path, [data])
    raw = yaml.safe_load(path.read_text())
    edit(raw)
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_demo_drills_are_reproducible_and_hold_out_the_demo_suite():
    """The bundled drills are what tools/make_demo_drills.py writes, and no prompt of the demo's evaluation suite is
    among the demo's training conversations."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_demo_drills", DEMO.parents[1] / "tools" / "make_demo_drills.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    bundled = [json.loads(line) for line in (DEMO / "demo_drills.jsonl").read_text().splitlines()]
    assert bundled == tool.drills(len(bundled))
    suite = {p["prompt"] for p in yaml.safe_load((DEMO / "eval_suite_demo.yaml").read_text())["generation"]["prompts"]}
    users = set()
    for name in ("demo_conversations.jsonl", "demo_drills.jsonl"):
        for line in (DEMO / name).read_text().splitlines():
            record = json.loads(line)
            users.add(record.get("prompt"))
            users.update(m["content"] for m in record.get("messages", []) if m["role"] == "user")
    assert len(suite) == 8 and not suite & users
