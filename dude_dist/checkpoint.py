"""Atomic training checkpoints of the trainable state only.

Layout under ``<output_dir>/checkpoints``::

    step_00000010/          a complete checkpoint (DeepSpeed files + rng_rank*.pt + meta.json)
    step_00000020.partial/  being written; never resumed from
    latest                  name of the newest complete checkpoint, replaced by atomic rename

A checkpoint directory is written under a ``.partial`` name, completed with
``meta.json`` and ``manifest.json`` (the size and sha256 of every file in it), then
renamed; ``latest`` is updated last. A crash at any point, or a write that fails (a full
disk), leaves the previous checkpoint complete and ``latest`` pointing at it; a failed
write also removes the ``.partial`` folder and ends the run with a
:class:`~dude_dist.errors.CheckpointError` naming the path.

Before anything is loaded, :func:`verify_checkpoint` compares every file with the
manifest (sizes, then sha256: a flipped byte inside a tensor is caught, not only a
truncation), parses ``meta.json`` and checks each safetensors header against its file
size. Checkpoints written before manifests existed are checked as far as their files
allow. :func:`select_checkpoint` owns the resume policy: ``--resume auto`` skips a
damaged newest checkpoint with a warning naming the file and falls back to the previous
complete one; a checkpoint from another config (:data:`RESUME_KEYS`), another world size,
or one already at ``train.max_steps`` is refused before the model loads.

DeepSpeed's ``engine.load_checkpoint`` unpickles its ``*.pt`` files with
``torch.load(weights_only=False)``, which runs whatever code a pickle names. So before
DeepSpeed opens anything, :func:`verify_checkpoint_files` reads every ``*.pt`` file of the
checkpoint with torch's restricted unpickler (``weights_only=True``), allowing only the
few plain DeepSpeed data classes its own files contain, and refuses the checkpoint
otherwise.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dude_dist import comm
from dude_dist.config import batch_layout, config_to_dict
from dude_dist.errors import CheckpointError, ConfigError, DudeError, TrainingError, read_json
from dude_dist.zero import adam_step_count, gather_trainable_state, load_trainable_state

logger = logging.getLogger(__name__)

PARTIAL = ".partial"
META = "meta.json"
MANIFEST = "manifest.json"
LATEST = "latest"
# The portable state (any world size, no pickle): full fp32 masters and Adam moments, every
# rank's RNG, and the scalars (optimizer step count, LR schedule, DeepSpeed's counters).
TRAINABLE_FILE = "trainable.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "state.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin")

# Keys whose change makes a checkpoint meaningless for this run (checked on resume, export
# and evaluation; recorded in every checkpoint's meta.json as its "fingerprint").
RESUME_KEYS = ("model.name_or_path", "model.revision", "model.gguf_file", "adapter.targets", "adapter.rank",
               "adapter.variant", "adapter.svd", "adapter.seed")

# A failed write with less than this free on the checkpoint's file system is reported as a
# full disk: torch's zip writer reports ENOSPC as "unexpected pos ...", without the errno.
_DISK_FULL_BYTES = 64 * 2**20


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
                    write_extra=None, fail_after_files: bool = False, trainable: dict | None = None,
                    deepspeed_files: bool = False) -> Path:
    """Save trainable parameters, optimizer, scheduler, RNG and ``meta`` (data position, config key).

    With ``trainable`` (name -> parameter) the state is written portably
    (:func:`write_portable_state`): safetensors and JSON only, loadable on any world size;
    DeepSpeed's own (pickled, world-size bound) files are added only with ``deepspeed_files``.

    ``write_extra(directory)`` is called on every rank before the checkpoint is committed
    (the trainer writes the DuDe tensors as safetensors there). Every rank must call this.
    Returns the final directory.

    Raises:
        CheckpointError: a file could not be written (a full disk is named as such, with
            the path); the ``.partial`` folder is removed and ``latest`` still names the
            previous complete checkpoint.
    """
    root = Path(root)
    tag = step_tag(step)
    partial = root / (tag + PARTIAL)
    final = root / tag
    failure = ""
    try:
        if rank == 0:
            if partial.exists():
                shutil.rmtree(partial)
            partial.mkdir(parents=True)
        comm.barrier()
        if trainable is not None:
            write_portable_state(engine, partial, trainable, rank)
        if trainable is None or deepspeed_files:
            engine.save_checkpoint(str(root), tag=tag + PARTIAL, save_latest=False, exclude_frozen_parameters=True)
            torch.save(rng_state(), partial / f"rng_rank{rank}.pt")
        if write_extra is not None:
            write_extra(partial)
    except (OSError, RuntimeError, SafetensorError) as exc:  # torch: RuntimeError; safetensors: its own
        failure = _write_failure(partial, exc)
    if _any_rank(bool(failure)):
        _abandon(partial, rank)
        raise CheckpointError(failure or f"another rank could not write checkpoint {partial}; nothing was "
                              f"committed ({_kept(root)})")
    if fail_after_files:  # fault injection for tests: die between the files and the commit
        os._exit(17)
    if rank == 0:
        try:
            write_text_atomic(partial / META, json.dumps({"step": step, **meta}, indent=1, sort_keys=True))
            write_manifest(partial)
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
        except OSError as exc:
            failure = _write_failure(partial, exc)
        if not failure:
            try:
                write_text_atomic(root / LATEST, tag)
            except OSError as exc:  # the checkpoint is complete; find_resume also finds it without `latest`
                logger.warning("checkpoint %s is complete but %s could not be updated: %s", final, root / LATEST, exc)
            _prune(root, keep_last)
            logger.info("checkpoint saved: %s", final)
    if _any_rank(bool(failure)):
        _abandon(partial, rank)
        raise CheckpointError(failure or f"rank 0 could not commit checkpoint {partial} ({_kept(root)})")
    return final


def _any_rank(flag: bool) -> bool:
    """Whether ``flag`` is set on any rank (the barrier that ends each phase of a save)."""
    return comm.max_floats([1.0 if flag else 0.0])[0] > 0


def _abandon(partial: Path, rank: int) -> None:
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)


def _kept(root: Path) -> str:
    latest = find_resume(root)
    return f"the newest complete checkpoint is still {latest}" if latest else "no earlier checkpoint exists"


def _free_bytes(path: Path) -> int | None:
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def _write_failure(partial: Path, exc: BaseException) -> str:
    """One line for a failed checkpoint write: a full disk says so and names the path."""
    text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    where = getattr(exc, "filename", None) or partial
    free = _free_bytes(partial)
    full = (getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in str(exc) or "os error 28" in str(exc)
            or (free is not None and free < _DISK_FULL_BYTES))
    kept = _kept(partial.parent)
    if full:
        free_text = f"{free / 2**20:.1f} MiB free" if free is not None else "free space unknown"
        return (f"no space left on device (ENOSPC) writing checkpoint {where} ({free_text}; {text}); the "
                f"unfinished {partial.name} was removed and {kept}; free space, then resume with --resume auto")
    return (f"could not write checkpoint {where}: {type(exc).__name__}: {text}; the unfinished {partial.name} "
            f"was removed and {kept}")


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _checkpoint_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST and ".tmp" not in p.name)


def write_manifest(directory: str | Path) -> dict:
    """Record the size and sha256 of every file under ``directory`` in ``manifest.json``."""
    directory = Path(directory)
    files = {p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": _hash_file(p)}
             for p in _checkpoint_files(directory)}
    manifest = {"version": 1, "files": files}
    write_text_atomic(directory / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Committed checkpoint folders under ``root`` (they have ``meta.json``), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(PARTIAL)
                  and (p / META).is_file())


def _prune(root: Path, keep_last: int) -> None:
    for old in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _latest_name(root: Path) -> str | None:
    try:
        return (root / LATEST).read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def resume_candidates(root: str | Path) -> list[Path]:
    """Complete checkpoints newest first, the one ``latest`` names leading (not verified)."""
    root = Path(root)
    complete = complete_checkpoints(root)[::-1]
    name = _latest_name(root)
    if name is not None:
        named = root / name
        if named in complete:
            complete.remove(named)
            complete.insert(0, named)
        elif (root / LATEST).exists():
            logger.warning("%s names %s, which is incomplete; looking for another", root / LATEST, name)
    return complete


def find_resume(root: str | Path) -> Path | None:
    """The newest complete checkpoint (``latest`` if valid, else the highest complete step),
    not verified: :func:`select_checkpoint` and :func:`newest_verified` check it before use."""
    candidates = resume_candidates(root)
    return candidates[0] if candidates else None


def read_meta(ckpt: str | Path) -> dict:
    """The checkpoint's ``meta.json``.

    Raises:
        CheckpointError: it is missing, not UTF-8 JSON, or has no ``step``.
    """
    meta = read_json(Path(ckpt) / META, CheckpointError, f"checkpoint {ckpt} is damaged: {META}")
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise CheckpointError(f"checkpoint {ckpt} is damaged: {META} has no integer 'step'")
    return meta


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
        CheckpointError: a file that the restricted unpickler rejects or that cannot be
            read (the message names the file and, for a tampered one, the offending global).
    """
    allowed = _deepspeed_safe_globals()
    for path in sorted(Path(ckpt).glob("*.pt")):
        _verify_pickle(Path(ckpt), path, allowed)


class _ForbiddenGlobal(CheckpointError):
    """A pickle that names something besides tensors, containers and DeepSpeed data classes."""


def _verify_pickle(ckpt: Path, path: Path, allowed: list) -> None:
    try:
        is_zip = zipfile.is_zipfile(path)
        with torch.serialization.safe_globals(allowed):
            # mmap needs torch's zip format; anything else is read whole (still restricted).
            torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except OSError as exc:  # truncated (mmap past the end), unreadable
        raise CheckpointError(f"checkpoint {ckpt} is damaged: {path.name} cannot be read "
                              f"({exc.strerror or exc}; {path.stat().st_size if path.exists() else 0} bytes)"
                              ) from None
    except Exception as exc:  # noqa: BLE001  (whatever the restricted unpickler raises: the file is refused)
        kind = _ForbiddenGlobal if _GLOBAL.search(str(exc)) else CheckpointError
        raise kind(
            f"refusing to load checkpoint {ckpt}: {path.name}: {_unpickling_problem(exc)}; the file is damaged "
            "or has been tampered with (nothing in it was run)") from None


def _tampered(ckpt: Path, name: str) -> None:
    """Raise the restricted unpickler's verdict on a ``*.pt`` file the manifest does not
    match, if it names a forbidden global: that says more than the size or checksum."""
    path = ckpt / name
    if path.suffix == ".pt" and path.is_file():
        try:
            _verify_pickle(ckpt, path, _deepspeed_safe_globals())
        except _ForbiddenGlobal:
            raise
        except CheckpointError:
            pass


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file (None: its header parses and its tensors end
    where the file does): unreadable, too short, a bad header, truncated or padded."""
    try:
        return _safetensors_problem(path)
    except OSError as exc:
        return f"cannot be read ({exc})"


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{size} bytes, shorter than a safetensors header"
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            return f"its header claims {header_len} bytes but the file has {size}"
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "its header is not valid JSON"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    ends = [int(v["data_offsets"][1]) for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v]
    expected = 8 + header_len + max(ends, default=0)
    if expected != size:
        return f"{size} bytes where its header needs {expected} (truncated or padded)"
    return None


def _read_manifest(ckpt: Path) -> dict[str, dict] | None:
    path = ckpt / MANIFEST
    if not path.exists():
        return None
    manifest = read_json(path, CheckpointError, f"checkpoint {ckpt} is damaged: {MANIFEST}")
    try:
        files = manifest["files"]
        entries = {str(name): {"size": int(e["size"]), "sha256": str(e["sha256"])} for name, e in files.items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint {ckpt} is damaged: {MANIFEST} cannot be read "
                              f"({type(exc).__name__}: {exc})") from None
    return entries


def verify_checkpoint(ckpt: str | Path, *, checksums: bool = True) -> dict:
    """Check every file of ``ckpt`` before anything loads it; return its meta dict.

    In order: each file the manifest lists exists with its recorded size; ``meta.json``
    parses; each safetensors header matches its file size; every ``*.pt`` file passes
    :func:`verify_checkpoint_files`; with ``checksums``, each file's sha256 matches the
    manifest (a flipped byte anywhere is caught). A checkpoint without a manifest (written
    before manifests existed) gets every check but the sizes and checksums, and must hold
    a DeepSpeed ``*model_states.pt`` file.

    Raises:
        CheckpointError: the first damaged file, named, and what is wrong with it.
    """
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint {ckpt} does not exist or is not a folder")
    manifest = _read_manifest(ckpt)
    if manifest is not None:
        for name, entry in manifest.items():
            path = ckpt / name
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise CheckpointError(f"checkpoint {ckpt} is damaged: {name} is missing "
                                      f"(the manifest records {entry['size']} bytes)") from None
            except OSError as exc:
                raise CheckpointError(f"checkpoint {ckpt} is damaged: {name} cannot be read ({exc})") from None
            if size != entry["size"]:
                _tampered(ckpt, name)
                raise CheckpointError(f"checkpoint {ckpt} is damaged: {name} has {size} bytes, the manifest "
                                      f"records {entry['size']} (truncated or overwritten)")
    meta = read_meta(ckpt)
    if manifest is None and is_portable(ckpt):  # the portable state has always come with a manifest
        raise CheckpointError(f"checkpoint {ckpt} is damaged: {MANIFEST} is missing")
    if manifest is None and not any(ckpt.glob("*model_states.pt")):
        raise CheckpointError(f"checkpoint {ckpt} is damaged: it has no DeepSpeed *model_states.pt file")
    for path in sorted(ckpt.glob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem:
            raise CheckpointError(f"checkpoint {ckpt} is damaged: {path.name}: {problem}")
    if is_portable(ckpt):
        pickles = sorted(p.name for p in ckpt.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles and not meta.get("deepspeed_files"):
            raise CheckpointError(
                f"refusing to load checkpoint {ckpt}: it holds the portable state, which is safetensors and JSON "
                f"only, but also {', '.join(pickles)} (a pickle can run code; nothing was read)")
        if not pickles:
            missing = [name for name in (RNG_FILE, STATE_FILE) if not (ckpt / name).is_file()]
            if missing:
                raise CheckpointError(f"checkpoint {ckpt} is damaged: {', '.join(missing)} missing")
    else:
        verify_checkpoint_files(ckpt)
    if manifest is not None and checksums:
        for name, entry in manifest.items():
            try:
                digest = _hash_file(ckpt / name)
            except OSError as exc:
                raise CheckpointError(f"checkpoint {ckpt} is damaged: {name} cannot be read ({exc})") from None
            if digest != entry["sha256"]:
                _tampered(ckpt, name)
                raise CheckpointError(f"checkpoint {ckpt} is damaged: {name} does not match its sha256 in the "
                                      "manifest (its bytes changed after the save)")
    elif manifest is None:
        logger.info("checkpoint %s has no %s (written by an older dude_dist): sizes and checksums not checked",
                    ckpt, MANIFEST)
    return meta


def newest_verified(root: str | Path) -> Path | None:
    """The newest checkpoint under ``root`` that passes :func:`verify_checkpoint`; a damaged
    newer one is skipped with a warning that names the damaged file. None: there is none.

    Raises:
        CheckpointError: checkpoints exist but every one is damaged (the message names the
            newest's damage).
    """
    candidates = resume_candidates(root)
    problems: list[str] = []
    for ckpt in candidates:
        try:
            verify_checkpoint(ckpt)
        except CheckpointError as exc:
            logger.warning("%s; falling back to the previous complete checkpoint", exc)
            problems.append(str(exc))
            continue
        if problems:
            logger.warning("using %s: the %d newer checkpoint(s) are damaged", ckpt.name, len(problems))
        return ckpt
    if problems:
        others = f"; the {len(problems) - 1} older checkpoint(s) are damaged too" if len(problems) > 1 else ""
        raise CheckpointError(f"{problems[0]}{others}; no usable checkpoint under {Path(root)} "
                              "(--resume none starts over and moves these aside)")
    return None


# --------------------------------------------------------------------------- resume policy


def _lookup(cfg_dict: dict, dotted: str) -> Any:
    node: Any = cfg_dict
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def run_meta(cfg: Any, layout: Any, world_size: int, step: int) -> dict:
    """What a checkpoint's ``meta.json`` records about the run beside the step: the resume
    fingerprint, the samples seen, the whole config, the world size and batch layout, and
    whether DeepSpeed's own files were written."""
    return {"fingerprint": fingerprint(cfg), "samples_seen": step * layout.global_batch_size,
            "config": config_to_dict(cfg), "world_size": world_size,
            "deepspeed_files": cfg.train.deepspeed_checkpoint,
            "layout": {"micro_batch_size": layout.micro_batch_size, "grad_accum": layout.grad_accum,
                       "global_batch_size": layout.global_batch_size}}


def fingerprint(cfg: Any) -> dict:
    """The :data:`RESUME_KEYS` of a run config (a ``RunConfig`` or its plain dict)."""
    cfg_dict = cfg if isinstance(cfg, dict) else config_to_dict(cfg)
    return {key: _lookup(cfg_dict, key) for key in RESUME_KEYS}


def fingerprint_differences(meta: dict, cfg: Any) -> list[str]:
    """``"key: checkpoint X vs config Y"`` for every :data:`RESUME_KEYS` entry that differs."""
    saved = meta.get("fingerprint") or {}
    now = fingerprint(cfg)
    return [f"{k}: checkpoint {saved[k]!r} vs config {now[k]!r}" for k in RESUME_KEYS
            if k in saved and saved[k] != now[k]]


def check_compatible(ckpt: Path, meta: dict, cfg: Any, world_size: int, force: bool = False) -> None:
    """Refuse a checkpoint this run cannot continue from, before anything heavy loads.

    Raises:
        TrainingError: model/adapter keys differ (unless ``force``).
        CheckpointError: written by another number of ranks (ZeRO's optimizer partitions
            follow the world size).
        ConfigError: ``train.max_steps`` is at or below the checkpoint's step: nothing to do.
    """
    differ = fingerprint_differences(meta, cfg)
    if differ and not force:
        raise TrainingError(f"refusing to resume from {ckpt}: {'; '.join(differ)} "
                            "(pass --force-resume to override)")
    saved_world = meta.get("world_size")

    layout = batch_layout(cfg.train, world_size)
    saved_global = (meta.get("layout") or {}).get("global_batch_size")
    if saved_global is not None and saved_global != layout.global_batch_size and not force:
        raise ConfigError(
            f"checkpoint {ckpt} was trained with a global batch of {saved_global} samples, this run has "
            f"{layout.global_batch_size}: the data order and the loss per step depend on it; set "
            f"train.global_batch_size={saved_global} (micro-batches, accumulation and ranks may change)")
    if is_portable(ckpt) and isinstance(saved_world, int):
        if saved_world != world_size:
            old_layout = meta.get("layout") or {}
            micro, accum = layout.micro_batch_size, layout.grad_accum
            before = (f"micro {old_layout['micro_batch_size']} x accum {old_layout['grad_accum']} x {saved_world} ranks"
                      if {"micro_batch_size", "grad_accum"} <= old_layout.keys() else f"{saved_world} ranks")
            logger.warning("resuming %s on another world size: written as %s, now micro %d x accum %d x %d ranks "
                           "(global batch %d either way, so the same steps)", ckpt.name, before, micro, accum,
                           world_size, layout.global_batch_size)
    elif isinstance(saved_world, int) and saved_world != world_size:
        raise CheckpointError(
            f"checkpoint {ckpt} was written by {saved_world} rank(s) but this run has {world_size}: it holds only "
            f"DeepSpeed's optimizer files (an older dude_dist), split {saved_world} ways, which cannot be resumed on "
            f"another world size; resume "
            f"with {saved_world} rank(s) (the same world size works), or start over with --resume none")
    step, max_steps = int(meta["step"]), cfg.train.max_steps
    if max_steps and step >= max_steps:
        raise ConfigError(
            f"nothing to do: checkpoint {ckpt} is already at step {step} and train.max_steps={max_steps}; raise "
            f"train.max_steps above {step} to train further, or pass --resume none to start over")


def select_checkpoint(root: str | Path, resume: str, cfg: Any, world_size: int,
                      force: bool = False) -> Path | None:
    """The checkpoint to continue from (None: start at step 0), verified and checked.

    Args:
        root: ``<output_dir>/checkpoints``.
        resume: ``auto`` (the newest complete checkpoint that passes
            :func:`verify_checkpoint`; a damaged newer one is skipped with a warning),
            ``none``, or a checkpoint directory (a damaged one is an error).
        cfg: the run config.
        world_size: ranks of this run.
        force: resume even if model/adapter keys differ (:func:`check_compatible`).

    Verification reads every file, so with several ranks rank 0 does it and the others
    receive its answer (or its error). Collective when a process group is up.

    Raises:
        CheckpointError, TrainingError, ConfigError: see :func:`verify_checkpoint`,
            :func:`newest_verified` and :func:`check_compatible`.
    """
    if resume == "none":
        return None

    def choose() -> str | None:
        if resume == "auto":
            ckpt = newest_verified(root)
            if ckpt is None:
                return None
            meta = read_meta(ckpt)
        else:
            ckpt = Path(resume)
            if resume.lower() in ("auto", "none"):
                raise TrainingError(f"--resume {resume}: write it in lower case ({resume.lower()}); a folder named "
                                    f"{resume!r} does not exist")
            if not ckpt.exists():
                raise TrainingError(f"--resume {resume}: no such checkpoint folder (give a step_XXXXXXXX folder, "
                                    "auto or none)")
            if not (ckpt / META).is_file():
                raise TrainingError(f"--resume {resume}: {ckpt} is not a complete checkpoint (no {META})")
            try:
                meta = verify_checkpoint(ckpt)
            except CheckpointError as exc:
                raise CheckpointError(f"--resume {resume}: {exc}") from None
        check_compatible(ckpt, meta, cfg, world_size, force)
        return str(ckpt)

    chosen = _on_rank0(choose)
    return Path(chosen) if chosen is not None else None


def _on_rank0(fn):
    """``fn()`` on rank 0; every other rank gets its result, or raises its user error."""
    if not comm.is_active():
        return fn()
    box = None
    if comm.rank() == 0:
        try:
            box = ("ok", fn())
        except DudeError as exc:
            box = ("error", type(exc).__name__, str(exc))
        except BaseException:  # a bug: rank 0 keeps its traceback, the others stop instead of waiting
            comm.broadcast_object(("error", "CheckpointError", "rank 0 failed while checking the checkpoint "
                                   "(its traceback says why)"), src=0)
            raise
    box = comm.broadcast_object(box, src=0)
    if box[0] == "ok":
        return box[1]
    kinds = {cls.__name__: cls for cls in (CheckpointError, ConfigError, TrainingError)}
    raise kinds.get(box[1], CheckpointError)(box[2])


def write_portable_state(engine, directory: Path, trainable: dict, rank: int) -> None:
    """Write the trainable state so that any number of ranks can resume it (collective).

    ``trainable.safetensors``: per DuDe parameter its full fp32 master and Adam moments,
    assembled from the ZeRO partitions one parameter at a time on rank 0;
    ``rng.safetensors``: every rank's torch (and CUDA) generator state; ``state.json``: the
    Adam step count, the LR schedule, DeepSpeed's step counters and every rank's Python RNG.
    Nothing is pickled.
    """
    tensors = gather_trainable_state(engine, trainable, keep=rank == 0)
    mine = {"torch": torch.get_rng_state().tolist(), "python": _json_rng(random.getstate()),
            "cuda": torch.cuda.get_rng_state().tolist() if torch.cuda.is_available() else None}
    every = comm.all_gather_object(mine)
    if rank != 0:
        return
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / TRAINABLE_FILE))
    rng = {}
    for r, state in enumerate(every):
        rng[f"rank{r}.torch"] = torch.tensor(state["torch"], dtype=torch.uint8)
        if state["cuda"] is not None:
            rng[f"rank{r}.cuda"] = torch.tensor(state["cuda"], dtype=torch.uint8)
    save_file(rng, str(directory / RNG_FILE))
    scheduler = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None
    state = {"adam_step": adam_step_count(engine), "scheduler": scheduler, "world_size": len(every),
             "global_steps": engine.global_steps, "global_samples": engine.global_samples,
             "skipped_steps": engine.skipped_steps, "python_rng": [s["python"] for s in every]}
    write_text_atomic(directory / STATE_FILE, json.dumps(state, indent=1))


def _json_rng(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def is_portable(ckpt: str | Path) -> bool:
    """Whether ``ckpt`` holds the portable state (resumable on any world size, pickle-free)."""
    return (Path(ckpt) / TRAINABLE_FILE).is_file()


def load_portable_state(engine, ckpt: Path, trainable: dict, rank: int) -> dict:
    """Restore what :func:`write_portable_state` wrote into this run's partitions (any world
    size) without unpickling anything; return ``state.json``. Every rank calls this.

    RNG: rank ``r`` takes the generator state of rank ``r`` of the writing run, or of rank
    ``r mod P`` when that run had fewer ranks.

    Raises:
        CheckpointError: a DuDe parameter of this model is missing or has another shape.
    """
    tensors = load_file(str(ckpt / TRAINABLE_FILE))
    state = json.loads((ckpt / STATE_FILE).read_text())
    for name, param in trainable.items():
        shape = tuple(getattr(param, "ds_shape", param.shape))
        if name not in tensors:
            raise CheckpointError(f"checkpoint {ckpt}: {TRAINABLE_FILE} has no {name!r} (another adapter layout?)")
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(f"checkpoint {ckpt}: {name} has shape {tuple(tensors[name].shape)} there and "
                                  f"{shape} in this model")
    load_trainable_state(engine, trainable, tensors, int(state["adam_step"]))
    scheduler = engine.lr_scheduler
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
        # A schedule's state does not reach its optimizer: the next update must use the rate
        # the uninterrupted run would have.
        for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
    engine.global_steps = int(state["global_steps"])
    engine.global_samples = int(state["global_samples"])
    engine.skipped_steps = int(state["skipped_steps"])
    rng = load_file(str(ckpt / RNG_FILE))
    source = rank % int(state["world_size"])
    torch.set_rng_state(rng[f"rank{source}.torch"])
    if torch.cuda.is_available() and f"rank{source}.cuda" in rng:
        torch.cuda.set_rng_state(rng[f"rank{source}.cuda"])
    version, internal, gauss = state["python_rng"][source]
    random.setstate((version, tuple(internal), gauss))
    return state


def load_checkpoint(engine, ckpt: str | Path, rank: int, trainable: dict | None = None) -> dict:
    """Restore trainable state, optimizer, scheduler and this rank's RNG; return the meta dict.

    A portable checkpoint is read from its safetensors and JSON (:func:`load_portable_state`,
    any world size, nothing unpickled); an older one through DeepSpeed's files, after each
    has passed the restricted unpickler.

    Raises:
        CheckpointError: a ``*.pt`` file fails :func:`verify_checkpoint_files`, or DeepSpeed
            finds no checkpoint there.
    """
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    if is_portable(ckpt) and trainable is not None:
        load_portable_state(engine, ckpt, trainable, rank)
        return meta
    verify_checkpoint_files(ckpt)
    load_path, _ = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_module_strict=False,
                                          load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {ckpt}")
    rng_file = ckpt / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return meta
