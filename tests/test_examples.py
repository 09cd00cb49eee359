"""The RL example runs end to end: the rollout's transformers logits equal the trainer's at each version."""

import pytest


def test_rl_loop_rollout_matches_trainer_at_every_loaded_version():
    pytest.importorskip("transformers")
    import rl_loop

    results = rl_loop.run(steps=4)
    assert results and results[-1]["step"] == 4  # the newest version always reaches the rollout
    assert all(r["max_abs_diff"] < 1e-4 for r in results), results
