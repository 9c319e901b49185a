"""benchmarks/step_profile.py: py-spy samples sorted into the parts of a training step."""

from __future__ import annotations

import pytest

from benchmarks.step_profile import classify

LOOP = "Trainer._run_steps (dude_dist/trainer.py:350)"
ENGINE = "(deepspeed/runtime/engine.py:{})"


def stack(*frames: str, count: int) -> str:
    return ";".join(("process 1:\"python\"", "<module> (train.py:1)") + frames) + f" {count}"


def test_samples_go_to_the_outermost_engine_call_and_only_the_loop_counts():
    raw = "\n".join([
        # outside the loop (start-up): ignored
        stack("Trainer.__init__ (dude_dist/trainer.py:95)", "DeepSpeedEngine.forward " + ENGINE.format(1), count=50),
        stack(LOOP, "Trainer.step (dude_dist/trainer.py:280)", "DeepSpeedEngine.forward " + ENGINE.format(1),
              "DudeLinear.forward (dude_dist/dude.py:200)", count=30),
        # the optimizer step runs a forward-looking hook: still the optimizer part (outermost call)
        stack(LOOP, "DeepSpeedEngine.step " + ENGINE.format(2), "DeepSpeedEngine.forward " + ENGINE.format(1),
              count=10),
        stack(LOOP, "DeepSpeedEngine.backward " + ENGINE.format(3), "LayerGradNorms._record (dude_dist/layer_grads.py:9)",
              count=40),
        stack(LOOP, "Trainer.batches (dude_dist/trainer.py:192)", "collate_batch (dude_dist/data.py:5)", count=15),
        stack(LOOP, "all_reduce (torch/distributed/distributed_c10d.py:7)", count=5),
        # the checkpoint after the last step: not part of a step
        stack(LOOP, "Trainer.save (dude_dist/trainer.py:300)", "all_gather_single (torch/distributed/x.py:1)",
              count=25),
        "not a stack line",
    ])
    got = classify(raw, "Trainer._run_steps (dude_dist/trainer.py)")
    assert got["samples"] == 100
    assert got["parts"] == pytest.approx({"forward": 0.30, "backward": 0.40, "optimizer": 0.10, "trainer": 0.20})
    assert got["overlaps"]["adapter code"] == pytest.approx(0.30)
    assert got["overlaps"]["grad-norm hooks"] == pytest.approx(0.40)
    assert got["overlaps"]["dude/* dynamics"] == 0.0
    assert got["trainer_top"] == [("collate_batch (dude_dist/data.py)", pytest.approx(0.15)),
                                  ("all_reduce (torch/distributed/distributed_c10d.py)", pytest.approx(0.05))]


def test_no_sample_in_the_loop_gives_zero_shares():
    got = classify(stack("main (x.py:1)", count=3), "Trainer._run_epoch (transformers/trainer.py)")
    assert got["samples"] == 0 and set(got["parts"].values()) == {0.0}
