"""Checkpoint state (dude_dist/checkpoint.py): the RNG streams a resume must continue, and
``keep_last`` pruning. A stand-in engine writes and reads its state where DeepSpeed would, so
these run without a process group; ``test_resume_with_dropout_reproduces_the_losses`` runs the
whole trainer with a dropout model, where a resume that lost the RNG state takes other steps.

    OMP_NUM_THREADS=1 python -m pytest tests/unit/test_checkpoint.py -q
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from dude_dist import checkpoint as ckpt_lib
from tests.helpers import step_metrics, summary, train


class StandInEngine:
    """Saves and loads one tensor where DeepSpeed's ``save_checkpoint``/``load_checkpoint`` would."""

    FILE = "mp_rank_00_model_states.pt"

    def __init__(self, value: float = 0.0) -> None:
        self.weight = torch.full((3,), value)

    def save_checkpoint(self, save_dir, tag, save_latest=False, exclude_frozen_parameters=True) -> None:
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"module": {"weight": self.weight.clone()}}, folder / self.FILE)

    def load_checkpoint(self, load_dir, tag, **kwargs):
        path = Path(load_dir) / tag / self.FILE
        if not path.is_file():
            return None, None
        self.weight = torch.load(path, weights_only=True)["module"]["weight"]
        return str(path), {}


def save(root: Path, step: int, keep_last: int = 10, value: float = 0.0) -> Path:
    return ckpt_lib.save_checkpoint(StandInEngine(value), root, step, {"world_size": 1, "note": f"s{step}"}, rank=0,
                                    keep_last=keep_last)


def draws() -> tuple[list[float], float, list[float]]:
    """What training consumes after a checkpoint: torch draws (dropout masks), Python's random."""
    return torch.rand(4).tolist(), random.random(), torch.randn(3).tolist()


# --------------------------------------------------------------------------- RNG


def test_rng_state_round_trip_restores_torch_and_python_streams():
    torch.manual_seed(11)
    random.seed(11)
    state = ckpt_lib.rng_state()
    expected = draws()
    assert draws() != expected  # the streams moved on
    ckpt_lib.set_rng_state(state)
    assert draws() == expected
    # A snapshot, not a view of the live generator.
    ckpt_lib.set_rng_state(state)
    assert draws() == expected


def test_load_checkpoint_restores_the_rng_state_saved_with_it(tmp_path):
    root = tmp_path / "checkpoints"
    torch.manual_seed(5)
    random.seed(5)
    draws()  # some training happened before the save
    ckpt = save(root, 3, value=2.5)
    after_save = draws()  # what the uninterrupted run draws next

    torch.manual_seed(123)  # a fresh process: start-up seeds differently and draws more
    random.seed(123)
    draws()
    engine = StandInEngine()
    meta = ckpt_lib.load_checkpoint(engine, ckpt, rank=0)
    assert draws() == after_save
    assert meta["step"] == 3 and meta["note"] == "s3"
    assert torch.equal(engine.weight, torch.full((3,), 2.5))
    assert (ckpt / "rng_rank0.pt").is_file()


# --------------------------------------------------------------------------- keep_last


@pytest.mark.parametrize("keep_last", [1, 2, 3])
def test_keep_last_keeps_the_newest_complete_checkpoints(tmp_path, keep_last):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8, 10):
        save(root, step, keep_last=keep_last, value=float(step))
    kept = [2, 4, 6, 8, 10][-keep_last:]
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [ckpt_lib.step_tag(s) for s in kept]
    assert (root / ckpt_lib.LATEST).read_text().strip() == "step_00000010"
    assert ckpt_lib.find_resume(root) == root / "step_00000010"
    engine = StandInEngine()
    assert ckpt_lib.load_checkpoint(engine, ckpt_lib.find_resume(root), rank=0)["step"] == 10
    assert torch.equal(engine.weight, torch.full((3,), 10.0))


def test_pruning_counts_only_complete_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    save(root, 1, keep_last=2)
    (root / "step_00000002.partial").mkdir()  # an interrupted save
    (root / "step_00000003").mkdir()  # a folder without meta.json
    save(root, 4, keep_last=2)
    save(root, 5, keep_last=2)
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert names == ["step_00000002.partial", "step_00000003", "step_00000004", "step_00000005"]
    # `latest` naming an incomplete folder: the newest complete one is used instead.
    (root / ckpt_lib.LATEST).write_text("step_00000003")
    assert ckpt_lib.find_resume(root) == root / "step_00000005"


# --------------------------------------------------------------------------- resume, end to end


def dropout_model(tmp_path: Path, stories_path: Path, dropout: float) -> Path:
    """stories260K with attention dropout: training draws random numbers at every step."""
    folder = tmp_path / f"stories260K-dropout{dropout}"
    shutil.copytree(stories_path, folder)
    config = json.loads((folder / "config.json").read_text())
    config["attention_dropout"] = dropout
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_dropout_makes_training_forwards_random(tmp_path, stories_path):
    # The control for the resume test below: with this model the RNG state matters.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dropout_model(tmp_path, stories_path, 0.2)).train()
    ids = torch.arange(3, 27).view(2, 12)
    first, second = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert (first - second).abs().max().item() > 1e-3


def test_resume_with_dropout_reproduces_the_losses(tmp_path, stories_path):
    """Uninterrupted 4 steps vs. resumed from the step-2 checkpoint: the same step numbers
    and bit-equal losses (data position, optimizer, scheduler and RNG all restored)."""
    model = dropout_model(tmp_path, stories_path, 0.2)
    overrides = (f"model.name_or_path={model}", "train.max_steps=4", "train.save_every=2", "train.keep_last=5",
                 "data.limit=64", "data.eval_size=0")
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    train(whole, *overrides, timeout=300)
    train(resumed, *overrides, resume=str(whole / "checkpoints" / "step_00000002"), timeout=300)
    want, got = step_metrics(whole), step_metrics(resumed)
    assert sorted(want) == [1, 2, 3, 4] and sorted(got) == [3, 4]
    assert summary(resumed)["start_step"] == 2
    assert [got[s] for s in (3, 4)] == [want[s] for s in (3, 4)], (want, got)
    grad = step_metrics(whole, "train/grad_norm"), step_metrics(resumed, "train/grad_norm")
    assert [grad[1][s] for s in (3, 4)] == [grad[0][s] for s in (3, 4)]
