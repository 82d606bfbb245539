"""The README's main job, end to end on CPU (short stages)."""

import json

import pytest

from megatron_student.demo import DEMO_PROMPTS, run_demo


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    report = run_demo(out, steps_a=2, steps_b=2, max_new_tokens=8)
    for name in ("report.md", "report.json", "loss_curves.png", "student_final/config.json",
                 "student_final/generation_config.json", "stage_a/latest_checkpointed_iteration.txt",
                 "stage_b/latest_checkpointed_iteration.txt", "logs/stage_b/metrics.jsonl"):
        assert (out / name).exists(), name
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "report.json").read_text())
    assert saved["format_compliance"]["streams"] == len(DEMO_PROMPTS)
    assert len(saved["generations"]) == len(DEMO_PROMPTS)
    assert "router/layer_0/entropy" in saved["router_balance_last_step"]
    assert saved["data"]["accepted"] > 0 and saved["data"]["rejected"] == 0
    card = (out / "student_final" / "README.md").read_text()
    assert "demo_b" in card  # the model card names the stage it was exported from
    with pytest.raises(FileExistsError, match="--force"):
        run_demo(out)
    assert report["timings_s"]["stage B"] > 0
