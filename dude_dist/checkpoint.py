"""Atomic training checkpoints of the trainable state only.

Layout under ``<output_dir>/checkpoints``::

    step_00000010/          a complete checkpoint (DeepSpeed files + rng_rank*.pt + meta.json)
    step_00000020.partial/  being written; never resumed from
    latest                  name of the newest complete checkpoint, replaced by atomic rename

A checkpoint directory is written under a ``.partial`` name, completed with
``meta.json``, then renamed; ``latest`` is updated last. A crash at any point leaves the
previous checkpoint complete and ``latest`` pointing at it.

DeepSpeed's ``engine.load_checkpoint`` unpickles its ``*.pt`` files with
``torch.load(weights_only=False)``, which runs whatever code a pickle names. So before
DeepSpeed opens anything, :func:`verify_checkpoint_files` reads every ``*.pt`` file of the
checkpoint with torch's restricted unpickler (``weights_only=True``), allowing only the
few plain DeepSpeed data classes its own files contain, and refuses the checkpoint
otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import shutil
import zipfile
from pathlib import Path

import torch
import torch.distributed as dist

from dude_dist.errors import CheckpointError

logger = logging.getLogger(__name__)

PARTIAL = ".partial"
META = "meta.json"
LATEST = "latest"



def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(engine, root: str | Path, step: int, meta: dict, rank: int, keep_last: int,
                    write_extra=None, fail_after_files: bool = False) -> Path:
    """Save trainable parameters, optimizer, scheduler, RNG and ``meta`` (data position, config key).

    ``write_extra(directory)`` is called on every rank before the checkpoint is committed
    (the trainer writes the DuDe tensors as safetensors there). Every rank must call this.
    Returns the final directory.
    """
    root = Path(root)
    tag = step_tag(step)
    partial = root / (tag + PARTIAL)
    if rank == 0:
        if partial.exists():
            shutil.rmtree(partial)
        root.mkdir(parents=True, exist_ok=True)
    _barrier()
    engine.save_checkpoint(str(root), tag=tag + PARTIAL, save_latest=False, exclude_frozen_parameters=True)
    torch.save(rng_state(), partial / f"rng_rank{rank}.pt")
    if write_extra is not None:
        write_extra(partial)
    _barrier()
    if fail_after_files:  # fault injection for tests: die between the files and the commit
        os._exit(17)
    final = root / tag
    if rank == 0:
        write_text_atomic(partial / META, json.dumps({"step": step, **meta}, indent=1, sort_keys=True))
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        write_text_atomic(root / LATEST, tag)
        _prune(root, keep_last)
        logger.info("checkpoint saved: %s", final)
    _barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    complete = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(PARTIAL)
                      and (p / META).is_file())
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def find_resume(root: str | Path) -> Path | None:
    """The newest complete checkpoint (``latest`` if valid, else the highest complete step)."""
    root = Path(root)
    latest = root / LATEST
    if latest.is_file():
        candidate = root / latest.read_text().strip()
        if (candidate / META).is_file():
            return candidate
        logger.warning("%s names %s, which is incomplete; looking for another", latest, candidate.name)
    complete = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(PARTIAL)
                      and (p / META).is_file())
    return complete[-1] if complete else None


def read_meta(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / META).read_text())


def _deepspeed_safe_globals() -> list:
    """The classes DeepSpeed's own checkpoint files pickle besides tensors and containers
    (ZeRO 0-3, fp32/bf16/fp16): plain data with no code run on unpickling."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _unpickling_problem(exc: Exception) -> str:
    """The informative part of torch's weights-only error (it wraps it in boilerplate)."""
    found = _GLOBAL.search(str(exc))
    if found:
        return f"it names {found.group(1)!r}, which is not a tensor, a container or a DeepSpeed data class"
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in str(exc).splitlines() if line.strip() and not line.startswith(boilerplate)]
    detail = (lines or [type(exc).__name__])[0][:200]
    return f"it is not a weights-only torch file ({detail})"


def verify_checkpoint_files(ckpt: str | Path) -> None:
    """Unpickle every ``*.pt`` file of ``ckpt`` with the restricted (weights-only) unpickler.

    Nothing a file names outside tensors, containers and :func:`_deepspeed_safe_globals`
    is imported or called, so a tampered file is refused before DeepSpeed's unrestricted
    ``torch.load`` could run it. Tensor data is memory-mapped, not read.

    Raises:
        CheckpointError: a file that the restricted unpickler rejects (the message names
            the file and the offending global).
    """
    allowed = _deepspeed_safe_globals()
    for path in sorted(Path(ckpt).glob("*.pt")):
        try:
            with torch.serialization.safe_globals(allowed):
                # mmap needs torch's zip format; anything else is read whole (still restricted).
                torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError) as exc:
            raise CheckpointError(
                f"refusing to load checkpoint {ckpt}: {path.name}: {_unpickling_problem(exc)}; the file may have "
                "been tampered with (nothing in it was run)") from None


def load_checkpoint(engine, ckpt: str | Path, rank: int) -> dict:
    """Restore trainable state, optimizer, scheduler and this rank's RNG; return the meta dict.

    Raises:
        CheckpointError: a ``*.pt`` file fails :func:`verify_checkpoint_files`, or DeepSpeed
            finds no checkpoint there.
    """
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    verify_checkpoint_files(ckpt)
    load_path, _ = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_module_strict=False,
                                          load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {ckpt}")
    rng_file = ckpt / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return meta
