"""When a run goes wrong: stop requests, a lost peer, a dead launcher, and test faults.

* :class:`StopRequests` turns SIGTERM (SLURM preemption, ``scancel``, a launcher shutting
  down) and a first SIGINT (Ctrl-C) into a request to checkpoint at the next step boundary
  and exit cleanly; a second Ctrl-C aborts at once. A rank whose launcher died (it was
  re-parented) requests the same stop, so no rank trains on as an orphan.
* :class:`NonFiniteStreak` stops the run after ``train.max_nonfinite_steps`` skipped
  non-finite steps in a row, naming the problem and the checkpoint that holds the
  parameters from before the streak.
* :func:`lost_peer_message` names the ranks that are gone after a collective failed
  (ranks on this host are checked by pid).
* Fault injection for tests, read from the environment once (:class:`Faults`):
  ``DUDE_FAULT_CKPT_CRASH=<step>`` dies between a checkpoint's files and its commit;
  ``DUDE_FAULT_NAN_STEPS=5,6,7`` multiplies the loss of the last micro-batch of the
  highest rank at those (1-based) steps by NaN; ``DUDE_FAULT_INF_GRAD=5,6,7@<layer>``
  makes that layer's magnitude gradient infinite instead (:mod:`dude_dist.layer_grads`).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch.distributed as dist

from dude_dist.errors import TrainingError

logger = logging.getLogger(__name__)

# What gloo and NCCL say when a peer is gone or a collective times out.
_COMM_FAILURE_TEXT = ("connection closed by peer", "connection reset by peer", "broken pipe", "timed out",
                      "operation timeout", "nccl error", "ncclremoteerror", "watchdog", "process group")


def parse_steps(spec: str) -> set[int]:
    """``"5,6,7"`` -> ``{5, 6, 7}``; empty -> empty."""
    return {int(s) for s in spec.split(",") if s.strip()}


@dataclass(frozen=True)
class Faults:
    """Faults to inject (tests only); all empty unless the environment asks for them."""

    nan_steps: set[int] = field(default_factory=set)
    inf_grad_steps: set[int] = field(default_factory=set)
    inf_grad_layer: str = ""
    ckpt_crash_step: int | None = None

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Faults:
        env = dict(os.environ) if env is None else env
        steps, _, layer = env.get("DUDE_FAULT_INF_GRAD", "").partition("@")
        crash = env.get("DUDE_FAULT_CKPT_CRASH", "").strip()
        return cls(nan_steps=parse_steps(env.get("DUDE_FAULT_NAN_STEPS", "")), inf_grad_steps=parse_steps(steps),
                   inf_grad_layer=layer.strip(), ckpt_crash_step=int(crash) if crash else None)


def step_problem(number: int, bad_samples: str, skipped: bool, cfg, worst_layer: Callable[[], str]) -> str:
    """Why optimizer step ``number`` (1-based) was skipped, or "" when it was applied or only
    hit an fp16 loss-scale overflow (DeepSpeed lowers the scale; that is routine).

    Args:
        bad_samples: the training samples whose loss was non-finite, as words
            (``"training samples [3, 8]"``), or "" when every loss was finite.
        skipped: DeepSpeed did not apply the step.
        cfg: the run config (``model.dtype``, ``deepspeed.zero_stage`` for the messages).
        worst_layer: names the DuDe layer to look at (collective: called on every rank or none).

    Raises:
        TrainingError: a non-finite loss whose update DeepSpeed applied anyway.
    """
    if bad_samples and not skipped:
        raise TrainingError(
            f"non-finite loss at step {number} in {bad_samples}, and DeepSpeed applied the "
            f"update anyway (deepspeed.zero_stage={cfg.deepspeed.zero_stage}, model.dtype={cfg.model.dtype}): the "
            "parameters may be non-finite; stopping without a checkpoint")
    if bad_samples:
        return f"non-finite loss at step {number} in {bad_samples}"
    if skipped and cfg.model.dtype != "float16":
        return f"non-finite gradient norm at step {number} (the loss was finite): {worst_layer()}"
    return ""


class NonFiniteStreak:
    """Skipped non-finite steps in a row; after ``limit`` of them the run stops, before any save:
    the failing step gets no checkpoint (one written at an earlier skipped step holds the
    parameters from before the streak).

    Args:
        limit: ``train.max_nonfinite_steps``.
        latest_checkpoint: returns the newest complete checkpoint folder (or None), for the message.
    """

    def __init__(self, limit: int, latest_checkpoint: Callable[[], Path | None]) -> None:
        self.limit, self.latest_checkpoint = limit, latest_checkpoint
        self.steps: list[int] = []

    def after(self, step: int, skipped: bool, nonfinite: bool, problem: str) -> None:
        """Account for optimizer step ``step`` (1-based). An applied step ends a streak; an fp16
        overflow (skipped, finite) neither ends nor extends it.

        Raises:
            TrainingError: the streak reached ``limit``.
        """
        if not skipped:
            self.steps = []
        if not nonfinite:
            return
        self.steps.append(step)
        logger.warning("step %d skipped: %s (%d in a row; train.max_nonfinite_steps=%d)", step, problem,
                       len(self.steps), self.limit)
        if len(self.steps) < self.limit:
            return
        latest = self.latest_checkpoint()
        kept = f"The newest checkpoint, {latest.name}," if latest else "No checkpoint"
        raise TrainingError(
            f"{problem}: {len(self.steps)} steps in a row skipped (steps {self.steps[0]}-{self.steps[-1]}), "
            f"train.max_nonfinite_steps={self.limit}; stopping. {kept} holds the parameters from before step "
            f"{self.steps[0]}")


class StopRequests:
    """Signal handlers and the launcher check behind "stop at the next step boundary".

    Args:
        launcher: how this process was started (:attr:`dude_dist.distributed.DistEnv.launcher`).
            Under a launcher the rank also stops when the launcher is gone: torchrun, mpirun
            and srun are the rank's parent; the ``deepspeed`` command is its grandparent
            (the parent is ``deepspeed.launcher.launch``, which outlives a ``deepspeed``
            killed alone). A plain ``python`` run watches nothing, so ``nohup`` keeps working.
    """

    def __init__(self, launcher: str) -> None:
        self.reason = ""
        self._interrupts = 0
        self._watch: list[tuple[int, int]] = []  # (pid, the pid's parent when we started)
        if launcher != "single":
            parent = os.getppid()
            self._watch.append((os.getpid(), parent))
            if launcher == "deepspeed":
                self._watch.append((parent, _parent_of(parent)))
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:
                raise KeyboardInterrupt("a second Ctrl-C stopped the run at once, without a checkpoint")
        if not self.reason:
            name = "Ctrl-C (SIGINT)" if signum == signal.SIGINT else signal.Signals(signum).name
            self.reason = name
            logger.warning("%s received: will checkpoint at the next step boundary and exit%s", name,
                           " (press Ctrl-C again to stop at once, without a checkpoint)" if signum == signal.SIGINT
                           else "")

    def requested(self) -> bool:
        """Whether this rank wants to stop (a signal, or its launcher is gone)."""
        if not self.reason:
            for pid, parent in self._watch:
                if _parent_of(pid) != parent:
                    self.reason = f"the launcher (pid {parent}) exited"
                    logger.warning("%s: will checkpoint at the next step boundary and exit", self.reason)
                    break
        return bool(self.reason)


def _parent_of(pid: int) -> int:
    """The parent pid of ``pid`` (0 if ``pid`` is gone)."""
    if pid == os.getpid():
        return os.getppid()
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        try:
            return psutil.Process(pid).ppid()
        except psutil.Error:
            return 0


def is_comm_failure(exc: BaseException) -> bool:
    """Whether ``exc`` came out of a collective whose peer is gone (gloo/NCCL/store errors)."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()
    return any(marker in text for marker in _COMM_FAILURE_TEXT)


def lost_peer_message(exc: BaseException, rank: int, peers: list[tuple[str, int]], timeout_s: int) -> str:
    """Who is gone: local ranks whose pid has exited, else a timeout or an unreachable peer."""
    host = socket.gethostname()
    gone = []
    for peer_rank, (peer_host, pid) in enumerate(peers):
        if peer_rank == rank or peer_host != host:
            continue
        try:
            alive = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            alive = False
        if not alive:
            gone.append(f"rank {peer_rank} (pid {pid})")
    if gone:
        return f"lost {', '.join(gone)}: the process has exited"
    if "timed out" in str(exc).lower() or "timeout" in str(exc).lower():
        return f"a collective timed out after {timeout_s} s: a peer rank died or hangs"
    return "a peer rank died or became unreachable"


def lost_peer_error(exc: BaseException, rank: int, peers: list[tuple[str, int]], timeout_s: int, step: int,
                    latest: Path | None) -> TrainingError:
    """The one line a rank ends with when a collective failed: who is gone, during which step,
    and which checkpoint to resume from."""
    who = lost_peer_message(exc, rank, peers, timeout_s)
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    kept = f"the newest complete checkpoint is {latest.name}" if latest else "no checkpoint was written yet"
    return TrainingError(f"rank {rank}: {who} (during step {step}; {first_line}); {kept}; restart with --resume auto")
