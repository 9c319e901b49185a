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


# --------------------------------------------------------------------------- portable state, in process


class TorchEngine:
    """The parts of a DeepSpeed engine the portable state reads and writes, without ZeRO: a
    module, torch's AdamW, an LR schedule and the step counters."""

    def __init__(self, seed: int) -> None:
        torch.manual_seed(seed)
        self.module = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Linear(3, 2))
        self.module[1].requires_grad_(False)  # frozen: not part of the state
        self.optimizer = torch.optim.AdamW([p for p in self.module.parameters() if p.requires_grad], lr=0.1,
                                           weight_decay=0.01)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 1.0 / (1 + s))
        self.global_steps = self.global_samples = self.skipped_steps = 0

    def trainable(self) -> dict:
        return {n: p for n, p in self.module.named_parameters() if p.requires_grad}

    def train_step(self) -> None:
        x = torch.randn(4, 5)  # draws from the generator, as dropout would
        loss = self.module(x).pow(2).sum() * (1 + random.random())
        loss.backward()
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad()
        self.global_steps += 1
        self.global_samples += 4
        self.skipped_steps += self.global_steps % 2


def _portable_save(engine: TorchEngine, root: Path, step: int, **kw) -> Path:
    return ckpt_lib.save_checkpoint(engine, root, step, {"world_size": 1}, rank=0, keep_last=3,
                                    trainable=engine.trainable(), **kw)


def test_portable_resume_continues_exactly_where_the_run_stopped(tmp_path):
    torch.manual_seed(0)
    random.seed(0)
    run = TorchEngine(seed=1)
    for _ in range(3):
        run.train_step()
    ckpt = _portable_save(run, tmp_path / "checkpoints", 3)
    assert sorted(p.name for p in ckpt.iterdir()) == ["manifest.json", "meta.json", "rng.safetensors",
                                                      "state.json", "trainable.safetensors"]
    for _ in range(2):
        run.train_step()

    resumed = TorchEngine(seed=1)  # a new process: the same base model ...
    with torch.no_grad():
        resumed.module[0].weight.add_(1.0)  # ... trainable values that the checkpoint must replace,
    torch.manual_seed(99)  # other seeds and draws
    random.seed(99)
    meta = ckpt_lib.load_checkpoint(resumed, ckpt, rank=0, trainable=resumed.trainable())
    assert meta["step"] == 3
    assert (resumed.global_steps, resumed.global_samples, resumed.skipped_steps) == (3, 12, 2)
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 / 4)  # the schedule's rate, in the optimizer
    for _ in range(2):
        resumed.train_step()
    for (name, want), got in zip(run.module.named_parameters(), resumed.module.parameters()):
        if want.requires_grad:
            assert torch.equal(want, got), name
    for p_run, p_res in zip(run.optimizer.param_groups[0]["params"], resumed.optimizer.param_groups[0]["params"]):
        s_run, s_res = run.optimizer.state[p_run], resumed.optimizer.state[p_res]
        assert float(s_run["step"]) == float(s_res["step"]) == 5
        assert torch.equal(s_run["exp_avg"], s_res["exp_avg"]) and torch.equal(s_run["exp_avg_sq"], s_res["exp_avg_sq"])


def test_portable_state_holds_masters_moments_step_and_every_counter(tmp_path):
    torch.manual_seed(3)
    run = TorchEngine(seed=3)
    run.train_step()
    run.train_step()
    ckpt = _portable_save(run, tmp_path, 2)
    from safetensors.torch import load_file

    tensors = load_file(str(ckpt / "trainable.safetensors"))
    weight = run.module[0].weight
    assert sorted(tensors) == sorted(f"0.{p}{k}" for p in ("weight", "bias") for k in ("", ".exp_avg", ".exp_avg_sq"))
    assert torch.equal(tensors["0.weight"], weight.detach())
    assert torch.equal(tensors["0.weight.exp_avg_sq"], run.optimizer.state[weight]["exp_avg_sq"])
    state = json.loads((ckpt / "state.json").read_text())
    assert {k: state[k] for k in ("adam_step", "world_size", "global_steps", "global_samples", "skipped_steps")} == {
        "adam_step": 2, "world_size": 1, "global_steps": 2, "global_samples": 8, "skipped_steps": 1}
    assert state["scheduler"]["last_epoch"] == 2 and len(state["python_rng"]) == 1
    assert not list(ckpt.glob("*.pt"))  # nothing pickled


def test_portable_rng_continues_the_writers_stream_per_rank(tmp_path):
    torch.manual_seed(7)
    random.seed(7)
    ckpt = _portable_save(TorchEngine(seed=7), tmp_path, 1)
    after = draws()
    # a writer with two ranks: rank r of a bigger run takes the writer's rank r mod 2
    from safetensors.torch import load_file, save_file

    rng = load_file(str(ckpt / "rng.safetensors"))
    torch.manual_seed(8)
    other_torch = torch.get_rng_state()
    rng["rank1.torch"] = other_torch
    save_file(rng, str(ckpt / "rng.safetensors"))
    state = json.loads((ckpt / "state.json").read_text())
    random.seed(8)
    state["python_rng"].append(ckpt_lib._json_rng(random.getstate()))
    state["world_size"] = 2
    (ckpt / "state.json").write_text(json.dumps(state))
    torch.manual_seed(8)
    random.seed(8)
    rank1_after = draws()

    for rank, want in ((0, after), (2, after), (1, rank1_after), (3, rank1_after)):
        torch.manual_seed(1000 + rank)
        random.seed(1000 + rank)
        engine = TorchEngine(seed=5)
        ckpt_lib.load_portable_state(engine, ckpt, engine.trainable(), rank)
        assert draws() == want, rank


def test_a_portable_checkpoint_of_another_layout_names_the_parameter(tmp_path):
    ckpt = _portable_save(TorchEngine(seed=1), tmp_path, 1)
    bigger = TorchEngine(seed=1)
    bigger.module[0] = torch.nn.Linear(6, 3)
    with pytest.raises(ckpt_lib.CheckpointError, match=r"0.weight has shape \(3, 5\) there and \(3, 6\) in this model"):
        ckpt_lib.load_checkpoint(bigger, ckpt, rank=0, trainable=bigger.trainable())
    renamed = TorchEngine(seed=1)
    trainable = {f"model.{k}": v for k, v in renamed.trainable().items()}
    with pytest.raises(ckpt_lib.CheckpointError, match=r"trainable.safetensors has no 'model.0.weight'"):
        ckpt_lib.load_checkpoint(renamed, ckpt, rank=0, trainable=trainable)


def test_deepspeed_files_are_written_only_when_asked(tmp_path):
    engine = TorchEngine(seed=1)
    engine.save_checkpoint = StandInEngine().save_checkpoint
    plain = _portable_save(engine, tmp_path / "a", 1)
    both = _portable_save(engine, tmp_path / "b", 1, deepspeed_files=True)
    assert not (plain / StandInEngine.FILE).exists() and not (plain / "rng_rank0.pt").exists()
    assert (both / StandInEngine.FILE).is_file() and (both / "rng_rank0.pt").is_file()
    assert ckpt_lib.is_portable(both) and ckpt_lib.is_portable(plain)
    assert not ckpt_lib.is_portable(save(tmp_path / "c", 1))
