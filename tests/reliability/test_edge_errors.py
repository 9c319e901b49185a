"""Small user mistakes and a full disk at start-up: one clear line, nothing lost."""

from __future__ import annotations

import errno
import logging

import pytest
import torch

from dude_dist import checkpoint as ckpt_lib
from dude_dist import sharded_init
from dude_dist.config_loader import load_config
from dude_dist.errors import ConfigError, TrainingError
from tests.helpers import ROOT


def test_config_path_that_is_a_folder_says_so():
    with pytest.raises(ConfigError, match=r"config file 'configs' is a folder; give a YAML file in it"):
        load_config("configs")


@pytest.mark.parametrize("resume, message", [
    ("Auto", r"--resume Auto: write it in lower case \(auto\)"),
    ("NONE", r"--resume NONE: write it in lower case \(none\)"),
    ("/nonexistent/step_00000004", r"--resume /nonexistent/step_00000004: no such checkpoint folder"),
])
def test_resume_spelling_and_missing_folders_are_named(tmp_path, resume, message):
    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml", [f"output_dir={tmp_path}"])
    with pytest.raises(TrainingError, match=message):
        ckpt_lib.select_checkpoint(tmp_path / "checkpoints", resume, cfg, world_size=1)


def test_a_full_disk_while_writing_the_factor_cache_is_a_warning(tmp_path, monkeypatch, caplog):

    def full(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")  # what a failed write leaves behind
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sharded_init, "save_file", full)
    cache = tmp_path / "dude_init"
    monkeypatch.setattr(logging.getLogger("dude_dist"), "propagate", True)  # setup_logging turns it off
    with caplog.at_level(logging.WARNING, logger="dude_dist"):
        ok = sharded_init.save_cached_factors(cache, {"rank": 4}, {"a.lora_a": torch.ones(2, 2)})
    assert ok is False
    assert any("could not write the factor cache" in r.message and "No space left" in r.message
               for r in caplog.records), caplog.text
    assert list(cache.iterdir()) == []  # no half-written file for a later run to trust
    assert sharded_init.load_cached_factors(cache, {"rank": 4}) is None
