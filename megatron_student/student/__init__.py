"""The student: gpt-oss with SWA+TPA and KDA attention, its config, HF model and weight surgery."""
