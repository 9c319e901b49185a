"""benchmarks/gpu_step.sh without a GPU (the stage budget logic and what comes back; the stages
themselves need CUDA), and gpu_check.py collect."""

from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path

from tests.helpers import ROOT, proc_env


def run_gpu_step(tmp_path: Path, stale: tuple[str, ...] = (), **env: str) -> tuple[subprocess.CompletedProcess, Path]:
    """benchmarks/gpu_step.sh in a copy of the two scripts (no .wheels/: nothing is installed),
    with ``stale`` result files of an earlier run in its benchmarks/results; returns the
    process and its $OUT."""
    copy = tmp_path / "tree"
    (copy / "benchmarks" / "results").mkdir(parents=True)
    for name in ("gpu_step.sh", "gpu_env.sh"):
        (copy / "benchmarks" / name).write_text((ROOT / "benchmarks" / name).read_text())
    for name in stale:
        (copy / "benchmarks" / "results" / name).write_text("an earlier run")
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "benchmarks/gpu_step.sh"], cwd=copy, capture_output=True, text=True, timeout=60,
                          env=proc_env(OUT=str(out), TMPDIR=str(tmp_path), **env))
    return proc, out


def test_gpu_step_skips_what_its_budget_cannot_hold_and_says_so(tmp_path):
    """benchmarks/gpu_step.sh runs a stage only with the time it needs left: with 35 s it
    skips all five (each named, exit 1) rather than starting one the device limit would cut."""
    proc, out = run_gpu_step(tmp_path, STEP_BUDGET="35")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    skipped = (out / "skipped.txt").read_text().splitlines()
    assert [line.split(" skipped")[0].removeprefix("[gpu_step] ") for line in skipped] == [
        "layer and sync check", "loss memory", "end-to-end throughput", "packed vs padded", "step profile"]
    assert all("s left of 35" in line for line in skipped)
    # what comes back from a device run: at most 8 files, everything else in the archive
    assert len(list(out.iterdir())) <= 8
    with tarfile.open(out / "gpu_step.tar.gz") as tar:
        assert "./skipped.txt" in tar.getnames()


def test_gpu_step_bundles_only_what_this_run_wrote(tmp_path):
    """Every stage runs and fails at once (a Python that exits 1): nothing it did not write
    comes back, in particular not the committed tables of an earlier GPU run in
    benchmarks/results, and the archive is still written; the exit code says it failed."""
    stale = ("gpu_train_all7.md", "gpu_step_profile.json", "gpu_loss_memory.md")
    proc, out = run_gpu_step(tmp_path, stale, STEP_BUDGET="600", PYTHON="false")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "skipped" not in proc.stdout  # every stage started
    assert sorted(p.name for p in out.iterdir()) == ["gpu_step.tar.gz"]
    with tarfile.open(out / "gpu_step.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert not names & set(stale), names
    assert {"gpu_check_run.log", "gpu_train_all7.log", "gpu_train_packing.log"} <= names


def test_collect_writes_each_benchmark_table_from_the_report(tmp_path, monkeypatch):
    """A GPU check brings back each benchmark's JSON and keeps its Markdown in gpu_check.json
    (8 files at most come back); ``collect`` writes both into benchmarks/results."""
    import json

    import benchmarks.common as common
    import benchmarks.gpu_check as gpu_check

    run, results = tmp_path / "run", tmp_path / "results"
    run.mkdir()
    results.mkdir()
    stages = {"numerics": {"figures": {"files": ["tests/unit/test_dude.py"]}},
              "packing_bench": {"figures": {"files": ["gpu_packing.json"], "markdown": "### Packed vs padded\n"}}}
    (run / "gpu_check.json").write_text(json.dumps({"stages": stages}))
    (run / "gpu_packing.json").write_text("{}")
    monkeypatch.setattr(gpu_check, "RESULTS", results)
    monkeypatch.setattr(common, "update_readme", lambda name: False)
    assert gpu_check.collect(run) == 0
    assert sorted(p.name for p in results.iterdir()) == ["gpu_check.json", "gpu_packing.json", "gpu_packing.md"]
    assert (results / "gpu_packing.md").read_text() == "### Packed vs padded\n"


def test_collect_refuses_a_damaged_report_and_a_wrong_folder_with_one_line(tmp_path, monkeypatch, capsys):
    import benchmarks.common as common
    import benchmarks.gpu_check as gpu_check

    run, results = tmp_path / "run", tmp_path / "results"
    run.mkdir()
    results.mkdir()
    (run / "gpu_train.json").write_text("{}")
    (run / "gpu_check.json").write_text('{"stages": ')  # cut short
    monkeypatch.setattr(gpu_check, "RESULTS", results)
    monkeypatch.setattr(common, "update_readme", lambda name: False)
    assert gpu_check.collect(run) == 1
    assert gpu_check.collect(tmp_path / "nope") == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"error: {run / 'gpu_check.json'} is not valid JSON") and err[0].endswith("nothing copied")
    assert err[1].startswith(f"error: {tmp_path / 'nope'} is not a folder")
    assert list(results.iterdir()) == []  # nothing copied before the damaged file was found
