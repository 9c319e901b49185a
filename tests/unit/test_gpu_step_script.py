"""benchmarks/gpu_step.sh without a GPU: the stage budget logic (the stages themselves need CUDA)."""

from __future__ import annotations

import subprocess

from tests.helpers import ROOT, proc_env


def test_gpu_step_skips_what_its_budget_cannot_hold_and_says_so(tmp_path):
    """benchmarks/gpu_step.sh runs a stage only with the time it needs left: with 35 s it
    skips all four (each named, exit 1) rather than starting one the device limit would cut."""
    copy = tmp_path / "tree"
    (copy / "benchmarks").mkdir(parents=True)  # no .wheels/ here: nothing is installed
    for name in ("gpu_step.sh", "gpu_env.sh"):
        (copy / "benchmarks" / name).write_text((ROOT / "benchmarks" / name).read_text())
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "benchmarks/gpu_step.sh"], cwd=copy, capture_output=True, text=True, timeout=60,
                          env=proc_env(OUT=str(out), STEP_BUDGET="35"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    skipped = (out / "skipped.txt").read_text().splitlines()
    assert [line.split(" skipped")[0].removeprefix("[gpu_step] ") for line in skipped] == [
        "layer and sync check", "loss memory", "end-to-end throughput", "step profile"]
    assert all("s left of 35" in line for line in skipped)
