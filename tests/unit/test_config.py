"""Run configuration (dude_dist/config.py): YAML errors that point at file:line and the closest
valid key, ``--set`` overrides, derived batch sizes.

    OMP_NUM_THREADS=1 python -m pytest tests/unit/test_config.py -q
"""

from __future__ import annotations

import dataclasses
import re
import textwrap
from pathlib import Path

import pytest
import yaml

from dude_dist.config import ConfigError, DudeConfig, RunConfig, TrainConfig, batch_layout, config_to_dict
from dude_dist.config_loader import load_config


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


MINIMAL = """
model:
  name_or_path: /models/tiny
  dtype: float32
adapter:
  rank: 4
train:
  lr: 1.0e-4
"""


def test_minimal_yaml_loads_with_defaults(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    assert isinstance(cfg, RunConfig)
    assert cfg.model.name_or_path == "/models/tiny" and cfg.model.dtype == "float32"
    assert cfg.adapter == DudeConfig(rank=4)
    assert cfg.adapter.targets == ("q_proj", "v_proj") and cfg.adapter.norm_grad == "exact"
    assert cfg.train.lr == 1e-4 and cfg.train.warmup_ratio == 0.03  # the paper's warm-up
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.adapter.rank = 8  # type: ignore[misc]


def test_scientific_notation_without_a_dot_is_a_number(tmp_path):
    # PyYAML (YAML 1.1) reads `3e-4` as a string; learning rates are written that way.
    cfg = load_config(write(tmp_path, "model: {name_or_path: x}\ntrain:\n  lr: 3e-4\n  max_steps: 1e3\n"))
    assert cfg.train.lr == 3e-4 and cfg.train.max_steps == 1000 and isinstance(cfg.train.max_steps, int)
    with pytest.raises(ConfigError, match="train.max_steps: expected an integer, got 1.5"):
        load_config(write(tmp_path, "model: {name_or_path: x}\ntrain:\n  max_steps: 15e-1\n"))


# --------------------------------------------------------------------------- errors


def test_unknown_key_names_key_file_line_and_closest_valid_key(tmp_path):
    path = write(tmp_path, """
        model:
          name_or_path: x
        adapter:
          targets: [q_proj]
          rnak: 8
        """)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert f"{path}:5" in msg, msg  # `rnak` is on line 5
    assert "'adapter.rnak'" in msg and "did you mean 'adapter.rank'?" in msg, msg


def test_unknown_section_suggests_the_section(tmp_path):
    path = write(tmp_path, "model: {name_or_path: x}\ntrian:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}:2: unknown key 'trian'; did you mean 'train'?")):
        load_config(path)


@pytest.mark.parametrize(
    "section, line, key, expected",
    [
        ("adapter:\n  rank: \"x\"", "adapter.rank", "rank", "expected an integer, got 'x'"),
        ("adapter:\n  rank: 0", "adapter.rank", "rank", "must be > 0, got 0"),
        ("adapter:\n  rank: 8.5", "adapter.rank", "rank", "expected an integer"),
        ("adapter:\n  variant: dude_c", "adapter.variant", "variant", "'dude_c' is not one of dude, dude_a, dude_b"),
        ("adapter:\n  norm_grad: approx", "adapter.norm_grad", "norm_grad", "not one of exact, detach"),
        ("train:\n  lr: -1", "train.lr", "lr", "must be > 0, got -1"),
        ("train:\n  lr: fast", "train.lr", "lr", "expected a number, got 'fast'"),
        ("train:\n  warmup_ratio: 1.0", "train.warmup_ratio", "warmup_ratio", "must be in [0, 1), got 1.0"),
        ("train:\n  gradient_checkpointing: 1", "train.gradient_checkpointing", "gradient_checkpointing",
         "expected true or false"),
        ("deepspeed:\n  zero_stage: 4", "deepspeed.zero_stage", "zero_stage", "must be 0-3"),
    ],
)
def test_bad_values_are_named_with_file_and_line(tmp_path, section, line, key, expected):
    path = write(tmp_path, "model:\n  name_or_path: x\n# a comment line\n" + section + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:5: {line}: "), msg  # the value sits on line 5
    assert expected in msg, msg


def test_yaml_syntax_error_shows_the_line(tmp_path):
    path = write(tmp_path, """
        model:
          name_or_path: x
        adapter:
          targets: [q_proj, v_proj
        train:
          lr: 0.1
        """)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:\d+: YAML syntax error"):
        load_config(path)
    tabbed = write(tmp_path, "model:\n  name_or_path: x\n\tdtype: float32\n", name="tab.yaml")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(tabbed))}:3: YAML syntax error"):
        load_config(tabbed)


def test_missing_model_file_and_non_mapping_are_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.name_or_path: is required"):
        load_config(write(tmp_path, "adapter: {rank: 4}\n"))
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n", name="list.yaml"))
    with pytest.raises(ConfigError, match=r"adapter: expected a mapping"):
        load_config(write(tmp_path, "model: {name_or_path: x}\nadapter: 8\n", name="scalar.yaml"))


# --------------------------------------------------------------------------- --set


def test_set_overrides_yaml(tmp_path):
    path = write(tmp_path, MINIMAL)
    cfg = load_config(path, ["adapter.rank=8", "adapter.targets=[q_proj, k_proj, v_proj]", "train.lr=3e-4"])
    assert cfg.adapter.rank == 8  # YAML says 4
    assert cfg.adapter.targets == ("q_proj", "k_proj", "v_proj")
    assert cfg.train.lr == 3e-4
    assert load_config(path).adapter.rank == 4


def test_set_max_steps_and_output_dir(tmp_path):
    out = tmp_path / "some run" / "out"
    cfg = load_config(write(tmp_path, MINIMAL), ["train.max_steps=7", f"output_dir={out}"])
    assert cfg.train.max_steps == 7 and cfg.output_dir == str(out)
    # A string field takes the text as typed, even when YAML would read a date or a number.
    cfg = load_config(write(tmp_path, MINIMAL), ["output_dir=2024-01-01", "model.revision=1.0"])
    assert cfg.output_dir == "2024-01-01" and cfg.model.revision == "1.0"
    # ...but an explicit null still clears an optional one.
    assert load_config(write(tmp_path, MINIMAL), ["model.revision=null"]).model.revision is None


def test_set_without_a_file_builds_from_defaults():
    cfg = load_config(None, ["model.name_or_path=/m", "adapter.variant=dude_b"])
    assert cfg.adapter.variant == "dude_b" and cfg.output_dir == "runs/default"


def test_set_errors_name_the_override():
    with pytest.raises(ConfigError, match=r"--set: unknown key 'adapter.rnak'; did you mean 'adapter.rank'\?"):
        load_config(None, ["model.name_or_path=/m", "adapter.rnak=8"])
    with pytest.raises(ConfigError, match=r"--set: adapter.rank: must be > 0, got 0"):
        load_config(None, ["model.name_or_path=/m", "adapter.rank=0"])
    with pytest.raises(ConfigError, match=r"--set 'train': expected key=value"):
        load_config(None, ["train"])
    with pytest.raises(ConfigError, match=r"--set: train.max_steps: expected an integer, got 'ten'"):
        load_config(None, ["model.name_or_path=/m", "train.max_steps=ten"])


def test_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["data.sources=[a.jsonl, b.jsonl]", "train.betas=[0.9, 0.95]"])
    dumped = write(tmp_path, yaml.safe_dump(config_to_dict(cfg)), name="dumped.yaml")
    assert load_config(dumped) == cfg


# --------------------------------------------------------------------------- derived values


def test_batch_layout_derives_global_batch_once():
    layout = batch_layout(TrainConfig(micro_batch_size=2, grad_accum=3), world_size=4)
    assert (layout.global_batch_size, layout.per_rank) == (24, 6)
    derived = batch_layout(TrainConfig(micro_batch_size=2, global_batch_size=32), world_size=4)
    assert derived.grad_accum == 4 and derived.global_batch_size == 32
    with pytest.raises(ConfigError, match=r"global_batch_size: 30 is not a multiple of .* = 8"):
        batch_layout(TrainConfig(micro_batch_size=2, global_batch_size=30), world_size=4)


def test_dude_config_accepts_a_single_target_string():
    assert DudeConfig(targets="qkv_proj").targets == ("qkv_proj",)
    with pytest.raises(ConfigError, match="adapter.targets"):
        DudeConfig(targets=())


def test_dynamics_are_measured_at_step_one_every_nth_step_and_the_last():
    def steps(total: int, **kw) -> list[int]:
        cfg = TrainConfig(**kw)
        return [s for s in range(1, total + 1) if cfg.measures_dynamics(s, total)]

    assert steps(35) == [1, 10, 20, 30, 35]  # default: every 10th logged step (log_every 1)
    assert steps(70, log_every=5) == [1, 50, 70]
    assert steps(7, dynamics_every=3) == [1, 3, 6, 7]
    assert steps(4, dynamics_every=1) == [1, 2, 3, 4]
    with pytest.raises(ConfigError, match=r"train\.dynamics_every: must be >= 0, got -1"):
        TrainConfig(dynamics_every=-1)
