"""The run directory: every path under ``output_dir``, its lock, and archiving.

Layout::

    <output_dir>/
        .run.lock           held (flock) by rank 0 of the run that writes here
        checkpoints/        step_XXXXXXXX/ and ``latest`` (dude_dist.checkpoint)
        dude_init/          factor cache of the sharded SVD initialiser
        tensorboard/        TensorBoard events (rank 0)
        metrics.jsonl       one JSON object per logged step
        dude_reference.safetensors  the DuDe tensors at step 0, for the dude/* dynamics
        summary.json        the final summary of the run
        eval_start.json     generation accuracy before training
        eval_end.json       ... and after
        eval_cli.json       launch/evaluate.py's results (its default --out)
        previous/<time>/    an earlier run's outputs, moved aside by a fresh start

Nobody else joins these names. One run writes a directory at a time: rank 0 takes an
exclusive ``flock`` on ``.run.lock`` for the whole run; a second run on the same directory
stops at once with one line naming the holder (host, pid, start time). The kernel drops
the lock when the holder exits, however it exits, so a crashed run never leaves a stale
lock. ``flock`` works across machines on NFSv4 and on Lustre mounted with ``-o flock``;
on a filesystem without it (Lustre ``-o localflock``, some FUSE mounts) the lock guards
one node only. Evaluation and export read a run directory without the lock and never
write into it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from dude_dist.errors import DudeError, RunDirBusyError, TrainingError

logger = logging.getLogger(__name__)

LOCK_FILE = ".run.lock"
# What a fresh start (step 0) moves aside; the factor cache stays (it is keyed and reused).
RUN_OUTPUTS = ("metrics.jsonl", "tensorboard", "checkpoints", "summary.json", "eval_start.json", "eval_end.json",
               "dude_reference.safetensors")


class RunDir:
    """The paths of one run directory.

    Args:
        root: the run's ``output_dir``.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._lock_fd: int | None = None

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> RunDir:
        """The run directory a checkpoint folder (``<root>/checkpoints/step_XXXXXXXX``) belongs to."""
        return cls(Path(checkpoint).parent.parent)

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def factor_cache(self) -> Path:
        return self.root / "dude_init"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def dynamics_reference(self) -> Path:
        return self.root / "dude_reference.safetensors"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    def eval_file(self, when: str) -> Path:
        """Generation results of the evaluation ``when`` (``start``, ``end``, ``cli``)."""
        return self.root / f"eval_{when}.json"

    @property
    def lock_path(self) -> Path:
        return self.root / LOCK_FILE

    # ------------------------------------------------------------------ writing

    def check_writable(self) -> None:
        """Create the directory and prove it can be written, before any compute.

        Raises:
            TrainingError: it cannot be created or written (the message names it and why).
        """
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write_test.{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise TrainingError(f"output_dir {str(self.root)!r} is not writable: {exc}") from None

    def acquire_for_ranks(self, rank: int, broadcast_object) -> None:
        """Rank 0 takes the lock; every rank learns the verdict through ``broadcast_object(obj,
        src=0)`` (:func:`dude_dist.comm.broadcast_object`), so all stop with the same one line.

        Raises:
            TrainingError: the directory is busy or cannot be written (the reason, on every rank).
        """
        problem = ""
        if rank == 0:
            try:
                self.acquire()
            except DudeError as exc:
                problem = str(exc)
        problem = broadcast_object(problem, src=0)
        if problem:
            raise TrainingError(problem)

    def acquire(self) -> None:
        """Take the run lock for this process (rank 0), or fail at once naming the holder.

        Raises:
            RunDirBusyError: another live process holds it.
        """
        self.check_writable()
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirBusyError(
                f"output_dir {str(self.root)!r} is in use by another run ({holder}); wait for it to end, stop it, "
                "or give this run another output_dir (--set output_dir=...)") from None
        info = {"host": socket.gethostname(), "pid": os.getpid(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._lock_fd = fd

    def release(self) -> None:
        """Drop the run lock (also dropped by the kernel when the process exits)."""
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def archive_previous(self) -> Path | None:
        """Move a previous run's outputs aside (never delete) before starting again at step 0.

        The factor cache stays: it is keyed, and reused only if it matches. Returns the
        folder they went to, or None when there was nothing to move.
        """
        present = [name for name in RUN_OUTPUTS if (self.root / name).exists()]
        if not present:
            return None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        (self.root / "previous").mkdir(parents=True, exist_ok=True)
        dest, n = self.root / "previous" / stamp, 0
        while True:  # two fresh starts in one second get two folders
            try:
                dest.mkdir()
                break
            except FileExistsError:
                n += 1
                dest = self.root / "previous" / f"{stamp}-{n}"
        for name in present:
            os.replace(self.root / name, dest / name)
        logger.warning("output_dir held an earlier run; moved %s to %s", ", ".join(present), dest)
        return dest


def _read_holder(fd: int) -> str:
    """``host h, pid p, started t`` from a held lock file (what the holder wrote)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "holder unknown: it has not written its name yet"
    return f"host {info.get('host')}, pid {info.get('pid')}, started {info.get('started')}"
