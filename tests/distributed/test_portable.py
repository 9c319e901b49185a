"""Portable training state (dude_dist/checkpoint.py, dude_dist/zero.py): a checkpoint written by
2 ranks resumes on 1 and on 3 ranks with the uninterrupted run's losses, and nothing in it is
a pickle.

The global batch (12 samples) stays the same; only its split changes: micro 2 x accum 3 x 2
ranks when written, micro 2 x accum 6 x 1 rank and micro 2 x accum 2 x 3 ranks on resume.
"""

from __future__ import annotations

import json
import shutil

import pytest

from tests.helpers import step_metrics, summary, train

pytestmark = pytest.mark.slow

STEPS = 12
COMMON = (f"train.max_steps={STEPS}", "train.save_every=6", "train.global_batch_size=12",
          "train.micro_batch_size=2", "deepspeed.stage3_param_persistence_threshold=0")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("portable") / "two"
    train(out, *COMMON, nproc=2, launcher="torchrun")
    return out


def test_checkpoint_is_safetensors_and_json_only(two_ranks):
    ckpt = two_ranks / "checkpoints" / "step_00000006"
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["adapter.json", "dude_params.safetensors", "manifest.json", "meta.json", "rng.safetensors",
                     "state.json", "trainable.safetensors"], names
    state = json.loads((ckpt / "state.json").read_text())
    assert state["adam_step"] == 6 and state["world_size"] == 2 and state["scheduler"]["last_epoch"] == 6
    adapter = json.loads((ckpt / "adapter.json").read_text())
    assert adapter["rank"] == 4 and adapter["targets"] == ["q_proj", "v_proj"] and adapter["variant"] == "dude"
    # The planner's checkpoint size: 16 bytes per trainable number (master, two moments, the model's copy).
    trainable = summary(two_ranks)["init"]["trainable_params"]
    tensor_bytes = sum((ckpt / f).stat().st_size for f in ("trainable.safetensors", "dude_params.safetensors"))
    assert 16 * trainable <= tensor_bytes <= 16 * trainable + 16_384, (tensor_bytes, trainable)


@pytest.mark.parametrize("nproc", [1, 3])
def test_resume_on_another_world_size_takes_the_same_steps(two_ranks, tmp_path, nproc):
    resumed = tmp_path / f"on{nproc}"
    resumed.mkdir()
    shutil.copytree(two_ranks / "dude_init", resumed / "dude_init")
    proc = train(resumed, *COMMON, nproc=nproc, launcher="python" if nproc == 1 else "torchrun",
                 resume=str(two_ranks / "checkpoints" / "step_00000006"))
    accum = 12 // (2 * nproc)
    assert (f"written as micro 2 x accum 3 x 2 ranks, now micro 2 x accum {accum} x {nproc} ranks"
            in proc.stderr), proc.stderr[-3000:]
    want, got = step_metrics(two_ranks), step_metrics(resumed)
    assert sorted(got) == list(range(7, STEPS + 1))
    for step in got:
        assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), (step, got[step], want[step])
    gn_want, gn_got = step_metrics(two_ranks, "train/grad_norm"), step_metrics(resumed, "train/grad_norm")
    for step in gn_got:
        assert abs(gn_got[step] - gn_want[step]) <= 1e-4 * abs(gn_want[step]), (step, gn_got[step], gn_want[step])
    assert summary(resumed)["start_step"] == 6
