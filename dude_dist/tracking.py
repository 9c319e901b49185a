"""What a run records: TensorBoard scalars and a JSON-lines metrics file (rank 0), and peak memory.

Console logging is set up by :func:`dude_dist.logs.setup_logging`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import psutil
import torch

from dude_dist.run_dir import RunDir


def peak_memory_bytes() -> int:
    """Peak GPU memory of this process if on CUDA, else its current resident set size."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(psutil.Process().memory_info().rss)


def done_line(summary: dict, output_dir: str | Path) -> str:
    """The line a finished run ends with: steps, training loss, held-out loss, output folder."""
    held_out = ""
    if summary.get("eval_loss_start") is not None and summary.get("eval_loss_end") is not None:
        held_out = f", held-out loss {summary['eval_loss_start']:.4f} -> {summary['eval_loss_end']:.4f}"
    first, last = summary.get("first_loss"), summary.get("last_loss")
    return (f"done: steps {summary['start_step']}-{summary['end_step']}, training loss "
            f"{float('nan') if first is None else first:.4f} -> {float('nan') if last is None else last:.4f}"
            f"{held_out}; output in {output_dir}")


class Tracker:
    """TensorBoard + ``metrics.jsonl`` on rank 0; a no-op on other ranks.

    ``metrics.jsonl`` gets one JSON object per logged step, flushed at once, so a crash
    loses nothing that was logged. A resumed run (``resume_step``) first drops what an
    interrupted run logged after its checkpoint's step, from both: those steps are trained
    again, and would otherwise appear twice.

    Args:
        run_dir: a :class:`dude_dist.run_dir.RunDir` (or the output folder).
        rank: this process's rank.
        resume_step: the step of the checkpoint the run resumed from (None: a fresh run).
    """

    def __init__(self, run_dir, rank: int, resume_step: int | None = None) -> None:
        run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        self.enabled = rank == 0
        self.writer = None
        self.metrics = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            if resume_step is not None:
                _drop_metrics_after(run_dir.metrics, resume_step)
            purge = {"purge_step": resume_step + 1} if resume_step is not None else {}
            self.writer = SummaryWriter(log_dir=str(run_dir.tensorboard), **purge)
            self.metrics = open(run_dir.metrics, "a", buffering=1)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()
        self.metrics.write(json.dumps({"step": step, **scalars}) + "\n")

    def histograms(self, step: int, values: dict[str, list[float]]) -> None:
        """TensorBoard histograms (rank 0), e.g. one value per layer of a layer type."""
        if not self.enabled or not values:
            return
        for key, vals in values.items():
            self.writer.add_histogram(key, torch.tensor(vals, dtype=torch.float64), step)
        self.writer.flush()

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.metrics.close()


def _drop_metrics_after(path: Path, step: int) -> None:
    """Rewrite ``metrics.jsonl`` without the rows logged after ``step`` (atomically)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row_step = json.loads(line).get("step", 0)
        except ValueError:
            continue  # a line cut short by a crash
        if row_step <= step:
            kept.append(line)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def read_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """All scalars in a TensorBoard log dir, ``tag -> [(step, value), ...]`` (for tests and tools)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
