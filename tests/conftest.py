"""Shared test fixtures: paths to the real data and model beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DUDE_SHARED", ROOT.parent / "shared"))
STORIES = SHARED / "models" / "stories260K"
DATA = SHARED / "data"

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def stories_path() -> Path:
    if not (STORIES / "config.json").is_file():
        pytest.fail(f"the real test model is missing: {STORIES} (shared/ must sit beside the checkout)")
    return STORIES


@pytest.fixture(scope="session")
def test_device():
    """The torch device numerics tests run on: ``DUDE_TEST_DEVICE`` (``cpu`` unless set;
    ``cuda`` on a GPU machine, as benchmarks/gpu_check.py sets it). A device that is asked
    for but absent fails the test rather than quietly testing the CPU again."""
    import torch

    device = torch.device(os.environ.get("DUDE_TEST_DEVICE", "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.fail(f"DUDE_TEST_DEVICE={device} but torch sees no CUDA device")
    return device


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.fail(f"the real test data is missing: {DATA} (shared/ must sit beside the checkout)")
    return DATA
