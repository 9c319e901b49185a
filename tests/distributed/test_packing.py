"""Packed training on CPU under ZeRO-3: 1 process and 2 ranks take the same steps, and the
throughput scalars are logged.

    OMP_NUM_THREADS=1 python -m pytest tests/distributed/test_packing.py -q
"""

from __future__ import annotations

import pytest

from dude_dist.tracking import read_scalars
from tests.helpers import step_metrics, train

pytestmark = pytest.mark.slow

STEPS = 6
PACKED = (f"train.max_steps={STEPS}", "train.save_every=0", "data.eval_size=0", "data.packing=true",
          "data.max_seq_len=1024", "train.micro_batch_size=1", "train.global_batch_size=2")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    train(root / "single", *PACKED)
    train(root / "two", *PACKED, nproc=2, launcher="torchrun")
    train(root / "grouped", f"train.max_steps={STEPS}", "train.save_every=0", "data.eval_size=0",
          "data.group_by_length=true")
    return root


def test_packed_rows_take_the_same_steps_on_one_and_two_ranks(runs):
    one, two = step_metrics(runs / "single"), step_metrics(runs / "two")
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    # the loss is a sum over each rank's rows divided by the global batch's labelled tokens
    assert [two[step] for step in one] == [one[step] for step in one]  # to the last bit
    assert step_metrics(runs / "single", "train/tokens_per_s") != {}


def test_throughput_scalars_reach_tensorboard(runs):
    for name in ("single", "two", "grouped"):
        scalars = read_scalars(runs / name / "tensorboard")
        for tag in ("train/tokens_per_s", "train/padding_ratio", "train/model_tflops_per_s"):
            assert [s for s, _ in scalars[tag]] == list(range(1, STEPS + 1)), (name, tag)
            assert all(v >= 0 for _, v in scalars[tag]), (name, tag)
        assert "train/mfu" not in scalars  # no peak to divide by on a CPU
    padding = {name: [v for _, v in read_scalars(runs / name / "tensorboard")["train/padding_ratio"]]
               for name in ("single", "grouped")}
    assert padding["single"] == [0.0] * STEPS  # one row per micro-batch: nothing to pad
    assert max(padding["grouped"]) < 0.05  # pairs of random GSM8K samples pad ~15%
    assert min(v for _, v in read_scalars(runs / "single" / "tensorboard")["train/model_tflops_per_s"]) > 0
