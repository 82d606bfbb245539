"""A resume at another parallel layout is refused with the layout message before any model is built (a checkpoint
of another TP does not even fit this run's vocabulary padding, so loading it first would fail obscurely)."""

import json

import pytest

from megatron_student.train import trainer as trainer_module
from megatron_student.train.checkpointer import LAYOUT_FILE
from megatron_student.train.trainer import Trainer, distributed_context

from test_train_loop import make_config, setup  # noqa: F401  (setup: the CPU trainer tests' module fixture)


def test_resume_at_another_layout_is_refused_before_loading(setup, monkeypatch):
    config = make_config(setup, "layout", ["steps=1"])
    with distributed_context():
        Trainer(config).fit()
    layout_file = setup / "layout" / "ckpt" / "iter_0000001" / "trainer" / LAYOUT_FILE
    written = json.loads(layout_file.read_text())
    assert written == {"cp": 1, "distributed_optimizer": False, "ep": 1, "optimizer": "torch", "tp": 1, "world": 1}

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the layout check")

    monkeypatch.setattr(trainer_module, "load_model", no_loading)
    refusals = [
        ({"tp": 2, "world": 2}, "resume needs the same layout"),  # as a TP=2 run writes it
        # another CP may resume (tests/test_train_context_parallel.py), but not with another data-parallel size
        ({"cp": 2, "world": 4}, "written at CP 2 with data-parallel size 2, resuming at CP 1 with data-parallel "
                                "size 1; a resume may change CP only with the same DP"),
    ]
    for edit, message in refusals:
        layout_file.write_text(json.dumps({**written, **edit}))
        with distributed_context(), pytest.raises(ValueError, match=message):
            Trainer(make_config(setup, "layout", ["steps=2"]))
