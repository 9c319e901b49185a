"""Running real training processes from tests (each with a timeout)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
BIN = Path(PY).parent


def proc_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    env.pop("MASTER_PORT", None)
    env.update(extra)
    return env


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_cmd(nproc: int, launcher: str = "torchrun") -> list[str]:
    if nproc == 1 and launcher == "python":
        return [PY]
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
                "--master_port", str(free_port())]
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port())]
    raise ValueError(launcher)


def run(cmd: list[str], timeout: float = 600, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=proc_env(**env), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n"
                             f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-8000:]}")
    return proc


def train(output_dir: Path, *overrides: str, nproc: int = 1, launcher: str = "python",
          config: str = "configs/tiny_cpu.yaml", resume: str = "none", timeout: float = 600,
          check: bool = True, **env: str) -> subprocess.CompletedProcess:
    cmd = launcher_cmd(nproc, launcher) + ["launch/train.py", "--config", config, "--resume", resume,
                                            "--set", f"output_dir={output_dir}"]
    for item in overrides:
        cmd += ["--set", item]
    return run(cmd, timeout=timeout, check=check, **env)


def step_metrics(output_dir: Path, key: str = "train/loss") -> dict[int, float]:
    """Last logged value of ``key`` per step from metrics.jsonl (a resumed run appends)."""
    values: dict[int, float] = {}
    with open(Path(output_dir) / "metrics.jsonl") as f:
        for line in f:
            row = json.loads(line)
            if key in row:
                values[row["step"]] = row[key]
    return values


def summary(output_dir: Path) -> dict:
    return json.loads((Path(output_dir) / "summary.json").read_text())
