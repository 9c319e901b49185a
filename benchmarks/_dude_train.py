"""``launch/train.py`` with a stopwatch around model loading (run by benchmarks/train.py).

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 benchmarks/_dude_train.py --config configs/tiny_cpu.yaml --set ...

Everything is the entry point's own code path; the only additions are timers:
``dude_dist.trainer.load_model`` and ``inject_and_init`` are wrapped with stopwatches, whose
seconds rank 0 writes to ``<output_dir>/bench_timing.json`` (summary.json has the rest:
``startup_seconds`` and ``init.wall_seconds``), and ``Trainer.step`` with a process-CPU-time
clock, whose per-step seconds every rank writes to ``<output_dir>/bench_cpu_rank<k>.json``.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

T_PROCESS = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dude_dist.trainer as trainer_module  # noqa: E402
from dude_dist.cli import exit_process  # noqa: E402
from launch.train import main  # noqa: E402

TIMES: dict[str, float] = {}
STEP_CPU_SECONDS: list[float] = []


def _timed(name, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[name] = TIMES.get(name, 0.0) + time.perf_counter() - t0

    return wrapper


def _output_dir(argv: list[str]) -> Path:
    """``output_dir`` of the run, read from ``--config`` and ``--set`` as the entry point reads it."""
    from dude_dist.config_loader import load_config

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    known, _ = p.parse_known_args(argv)
    return Path(load_config(known.config, known.overrides).output_dir)


def _cpu_timed(fn):
    def wrapper(*args, **kwargs):
        t0 = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            STEP_CPU_SECONDS.append(time.process_time() - t0)

    return wrapper


if __name__ == "__main__":
    trainer_module.load_model = _timed("load_seconds", trainer_module.load_model)
    trainer_module.inject_and_init = _timed("inject_and_init_seconds", trainer_module.inject_and_init)
    trainer_module.Trainer.step = _cpu_timed(trainer_module.Trainer.step)
    rc = main()
    out = _output_dir(sys.argv[1:])
    rank = os.environ.get("RANK", "0")
    (out / f"bench_cpu_rank{rank}.json").write_text(json.dumps(STEP_CPU_SECONDS))
    if rank == "0":
        (out / "bench_timing.json").write_text(json.dumps({**TIMES, "process_seconds": time.perf_counter() - T_PROCESS}))
    exit_process(rc)  # as launch/train.py: gloo's threads could abort a finished rank at interpreter exit
