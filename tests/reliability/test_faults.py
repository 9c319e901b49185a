"""Faults during training (dude_dist/trainer.py, dude_dist/checkpoint.py): kill -9, a crash
inside a checkpoint write, a rank that dies, SIGTERM preemption, non-finite losses, and a
resume with changed model/adapter keys. Nothing is lost and nothing hangs.

Every run is a real ``launch/train.py`` process (torchrun for 2 ranks) on the tiny config,
15 steps with a checkpoint every 5; an uninterrupted 1-process run is the reference (the
trainer makes 1- and 2-rank runs take identical steps for the same global batch).

    OMP_NUM_THREADS=1 python -m pytest tests/reliability/test_faults.py -q
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import PY, ROOT, launcher_cmd, proc_env, run, step_metrics, summary, train

STEPS = 15
COMMON = (f"train.max_steps={STEPS}", "train.save_every=5", "train.keep_last=10")
SEED = int(os.environ.get("DUDE_TEST_SEED", "20240607"))  # the random kill step, reproducible


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted 1-process run: losses of every step and a checkpoint every 5 steps."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(out, *COMMON, timeout=300)
    return out


class Launch:
    """Launchers started in their own session, so a test can signal the whole process tree;
    whatever is still running at teardown is killed."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.logs: dict[int, Path] = {}  # launcher pid -> its stdout+stderr

    def start(self, output_dir: Path, *overrides: str, nproc: int = 2, resume: str = "none",
              **env: str) -> subprocess.Popen:
        cmd = launcher_cmd(nproc, "torchrun" if nproc > 1 else "python") + [
            "launch/train.py", "--config", "configs/tiny_cpu.yaml", "--resume", resume,
            "--set", f"output_dir={output_dir}"]
        for item in overrides:
            cmd += ["--set", item]
        log = Path(f"{output_dir}.log")
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=proc_env(**env), stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs.append(proc)
        self.logs[proc.pid] = log
        return proc

    def output(self, proc: subprocess.Popen) -> str:
        return self.logs[proc.pid].read_text(errors="replace")

    @staticmethod
    def workers(proc: subprocess.Popen) -> dict[int, psutil.Process]:
        """The launcher's training processes by rank (torchrun puts each in its own process group)."""
        found = {}
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                rank = child.environ().get("RANK")
            except psutil.Error:
                continue
            if rank is not None and "train.py" in " ".join(child.cmdline()):
                found[int(rank)] = child
        return found

    def wait_for_step(self, proc: subprocess.Popen, output_dir: Path, step: int, timeout: float = 180) -> int:
        """Poll metrics.jsonl until ``step`` is logged; return the newest step seen."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"exit {proc.returncode} before step {step}:\n{self.output(proc)[-4000:]}")
            try:
                newest = max(step_metrics(output_dir), default=0)
            except (FileNotFoundError, json.JSONDecodeError):  # not created yet / a line half written
                newest = 0
            if newest >= step:
                return newest
            time.sleep(0.1)
        raise AssertionError(f"step {step} not reached in {timeout} s:\n{self.output(proc)[-4000:]}")

    def kill_tree(self, proc: subprocess.Popen) -> list[psutil.Process]:
        """SIGKILL the launcher and every process under it, as a dead node would leave them."""
        try:
            tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for p in tree:
            try:
                os.killpg(os.getpgid(p.pid), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        proc.wait(timeout=30)
        psutil.wait_procs(tree, timeout=30)  # the ranks are not our children: wait until they are gone
        return tree

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                self.kill_tree(proc)


@pytest.fixture
def launch():
    runner = Launch()
    yield runner
    runner.close()


def assert_matches_reference(output_dir: Path, reference: Path, first: int) -> None:
    ref, got = step_metrics(reference), step_metrics(output_dir)
    assert [s for s in sorted(got) if s >= first] == list(range(first, STEPS + 1))
    for step in range(first, STEPS + 1):
        assert abs(got[step] - ref[step]) <= 1e-6, (step, got[step], ref[step])


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def latest_step(output_dir: Path) -> int:
    return int((output_dir / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))


def no_traceback_from_us(text: str) -> None:
    """torchrun prints its own traceback when a worker fails; ours must not appear."""
    assert not re.search(r'File "[^"]*(dude_dist/|launch/train\.py)', text), text[-4000:]


# --------------------------------------------------------------------------- kills


@pytest.mark.slow
def test_kill9_whole_job_then_resume_reproduces_losses(reference, launch, tmp_path):
    kill_at = random.Random(SEED).randint(7, 12)
    out = tmp_path / "run"
    proc = launch.start(out, *COMMON, nproc=2)
    seen = launch.wait_for_step(proc, out, kill_at)
    tree = launch.kill_tree(proc)
    assert len(tree) >= 3 and not any(alive(p) for p in tree)  # torchrun and both ranks

    resume_step = latest_step(out)
    assert resume_step in (5, 10) and resume_step <= seen, (resume_step, seen)
    train(out, *COMMON, nproc=2, launcher="torchrun", resume="auto", timeout=300)
    assert summary(out)["start_step"] == resume_step
    assert_matches_reference(out, reference, resume_step + 1)
    assert not list((out / "checkpoints").glob("*.partial"))


@pytest.mark.slow
def test_crash_inside_checkpoint_write_resumes_from_previous(reference, tmp_path):
    out = tmp_path / "run"
    crashed = train(out, *COMMON, check=False, timeout=300, DUDE_FAULT_CKPT_CRASH="10")
    assert crashed.returncode == 17, crashed.stderr[-3000:]
    ckpts = out / "checkpoints"
    assert (ckpts / "step_00000010.partial").is_dir() and not (ckpts / "step_00000010").exists()
    assert (ckpts / "latest").read_text().strip() == "step_00000005"
    assert not (out / "summary.json").exists()

    train(out, *COMMON, resume="auto", timeout=300)
    assert summary(out)["start_step"] == 5
    assert_matches_reference(out, reference, 6)
    # The step-10 checkpoint was written again, complete; no partial directory is left.
    assert (ckpts / "step_00000010" / "meta.json").is_file()
    assert not list(ckpts.glob("*.partial"))


@pytest.mark.slow
def test_one_rank_killed_ends_the_job_quickly_naming_it(launch, tmp_path):
    out = tmp_path / "run"
    # A 30-minute collective timeout: the test passes only if nobody waits for it.
    proc = launch.start(out, *COMMON, "deepspeed.timeout_s=1800", nproc=2)
    launch.wait_for_step(proc, out, 3)
    victim = launch.workers(proc)[1]
    survivor = launch.workers(proc)[0]
    t0 = time.monotonic()
    victim.kill()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the job still runs 60 s after rank 1 died:\n{launch.output(proc)[-4000:]}")
    elapsed = time.monotonic() - t0
    text = launch.output(proc)
    assert proc.returncode != 0
    assert not alive(survivor)
    # The surviving rank's own message names the lost rank; torchrun's report does too.
    assert re.search(rf"error: rank 0: lost rank 1 \(pid {victim.pid}\)", text), text[-4000:]
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", text), text[-4000:]
    no_traceback_from_us(text)
    print(f"job ended {elapsed:.1f} s after rank 1 was killed")


@pytest.mark.slow
def test_sigterm_checkpoints_at_step_boundary_and_resubmit_continues(reference, launch, tmp_path):
    out = tmp_path / "run"
    proc = launch.start(out, *COMMON, nproc=2)
    launch.wait_for_step(proc, out, 8)
    os.killpg(proc.pid, signal.SIGTERM)  # what scancel / SLURM preemption does to the launcher
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"no exit 60 s after SIGTERM:\n{launch.output(proc)[-4000:]}")
    text = launch.output(proc)
    stopped = summary(out)
    assert stopped["stopped"] is True, text[-4000:]
    stop = stopped["end_step"]
    assert 8 <= stop < STEPS
    assert latest_step(out) == stop and (out / "checkpoints" / f"step_{stop:08d}" / "meta.json").is_file()
    assert "ChildFailedError" not in text  # the workers exited 0; only torchrun reports the signal
    no_traceback_from_us(text)

    train(out, *COMMON, nproc=2, launcher="torchrun", resume="auto", timeout=300)
    assert summary(out)["start_step"] == stop and summary(out)["stopped"] is False
    assert_matches_reference(out, reference, stop + 1)


# --------------------------------------------------------------------------- non-finite losses


def _optim_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """fp32 master weights and Adam moments of a checkpoint (its portable state), with Adam's step count."""
    import json

    from safetensors.torch import load_file

    out = load_file(str(ckpt / "trainable.safetensors"))
    out["adam_step"] = torch.tensor(json.loads((ckpt / "state.json").read_text())["adam_step"])
    return out


@pytest.mark.slow
def test_one_nonfinite_step_is_skipped_and_training_goes_on(tmp_path):
    # 1 process, 2 micro-batches per step: the NaN comes after a backward was accumulated.
    out = tmp_path / "run"
    train(out, "train.max_steps=6", "train.save_every=1", "train.keep_last=10", "train.max_nonfinite_steps=3",
          timeout=300, DUDE_FAULT_NAN_STEPS="5")
    skipped = step_metrics(out, "train/skipped_steps")
    assert [skipped[s] for s in range(1, 7)] == [0, 0, 0, 0, 1, 1]
    losses = step_metrics(out)
    assert losses[5] != losses[5] and all(losses[s] == losses[s] for s in (4, 6))  # NaN only at 5
    lr = step_metrics(out, "train/lr")
    assert lr[6] == lr[5]  # the LR schedule did not advance on the skipped step

    ckpt = {s: out / "checkpoints" / f"step_{s:08d}" for s in (4, 5, 6)}
    params = {s: load_file(ckpt[s] / "dude_params.safetensors") for s in ckpt}
    optim = {s: _optim_state(ckpt[s]) for s in ckpt}
    for name in params[4]:
        assert torch.equal(params[4][name], params[5][name]), name
    for name in optim[4]:
        assert torch.equal(optim[4][name], optim[5][name]), name
    assert any(not torch.equal(params[5][n], params[6][n]) for n in params[5])  # step 6 trained
    assert summary(out)["stopped"] is False and summary(out)["end_step"] == 6


@pytest.mark.slow
def test_nonfinite_steps_in_a_row_stop_the_run(tmp_path):
    # 2 ranks, NaN only on rank 1: rank 0 learns of it through the all-reduced flag.
    out = tmp_path / "run"
    proc = train(out, "train.max_steps=10", "train.save_every=4", "train.max_nonfinite_steps=3", nproc=2,
                 launcher="torchrun", check=False, timeout=300, DUDE_FAULT_NAN_STEPS="5,6,7")
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    errors = re.findall(r"^error: (.*)$", text, re.MULTILINE)
    # Both ranks raise the same error; torchrun may kill one before it prints, so one or two lines.
    assert 1 <= len(errors) <= 2 and len(set(errors)) == 1, text[-4000:]
    # The poisoned micro-batch: the last one of rank 1 at step 7, by an independent rebuild of the data order.
    from dude_dist.config import batch_layout
    from dude_dist.config_loader import load_config
    from dude_dist.data import build_datasets
    from dude_dist.models import load_tokenizer
    from dude_dist.sampler import StepSampler

    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml", [f"output_dir={out}"])
    train_set = build_datasets(cfg.data, load_tokenizer(cfg.model)).train
    bad = sorted(StepSampler(len(train_set), batch_layout(cfg.train, 2), cfg.train.seed).micro_batches(6, 1)[-1])
    assert errors[0].startswith(f"non-finite loss at step 7 in training samples {bad}: "), (bad, errors[0])
    assert re.match(r"non-finite loss at step 7 in training samples \[\d+, \d+\]: 3 steps in a row skipped "
                    r"\(steps 5-7\), train.max_nonfinite_steps=3", errors[0]), errors[0]
    assert "step_00000004" in errors[0]
    no_traceback_from_us(text)
    assert step_metrics(out, "train/skipped_steps") == {**{s: 0 for s in range(1, 5)}, 5: 1, 6: 2, 7: 3}
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000004"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000004"]
    assert not (out / "summary.json").exists()


@pytest.mark.slow
def test_nonfinite_gradient_with_finite_loss_names_the_layer(tmp_path):
    # 2 ranks, finite losses; rank 1 alone makes one DuDe layer's gradient infinite.
    out = tmp_path / "run"
    layer = "model.layers.1.self_attn.v_proj"
    proc = train(out, "train.max_steps=8", "train.save_every=2", "train.max_nonfinite_steps=2", nproc=2,
                 launcher="torchrun", check=False, timeout=300, DUDE_FAULT_INF_GRAD=f"3,4@{layer}")
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    errors = re.findall(r"^error: (.*)$", text, re.MULTILINE)
    assert 1 <= len(errors) <= 2 and len(set(errors)) == 1, text[-4000:]
    assert re.match(rf"non-finite gradient norm at step 4 \(the loss was finite\): layer {re.escape(layer)} has a "
                    r"non-finite gradient \(1 of \d+ layers non-finite\): 2 steps in a row skipped \(steps 3-4\)",
                    errors[0]), errors[0]
    assert "step_00000002" in errors[0]
    # The first skip was logged with the same layer, and counted.
    assert re.search(rf"step 3 skipped: non-finite gradient norm at step 3 .*layer {re.escape(layer)}", text)
    assert step_metrics(out, "train/skipped_steps") == {1: 0, 2: 0, 3: 1, 4: 2}
    assert all(math.isfinite(v) for v in step_metrics(out).values())  # the losses stayed finite
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    no_traceback_from_us(text)


# --------------------------------------------------------------------------- resume with changed keys


@pytest.mark.slow
def test_resume_with_changed_keys_refused_unless_forced(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", out / "checkpoints")
    (out / "checkpoints" / "latest").write_text("step_00000010")
    moved_model = tmp_path / "models" / "stories260K"  # the same model, elsewhere: a different key
    moved_model.parent.mkdir()
    moved_model.symlink_to(ROOT.parent / "shared" / "models" / "stories260K")
    cases = {
        "adapter.rank": ("adapter.rank=2", "adapter.rank: checkpoint 4 vs config 2"),
        "adapter.targets": ("adapter.targets=[q_proj]",
                            "adapter.targets: checkpoint ['q_proj', 'v_proj'] vs config ['q_proj']"),
        "model.name_or_path": (f"model.name_or_path={moved_model}", "model.name_or_path: checkpoint "),
    }
    # One copy each: a run directory takes one run at a time (they run side by side).
    copies = {key: tmp_path / key for key in cases}
    for copy in copies.values():
        shutil.copytree(out, copy)
    with ThreadPoolExecutor(len(cases)) as pool:  # start-up dominates: run the three side by side
        procs = dict(zip(cases, pool.map(
            lambda key: train(copies[key], *COMMON, cases[key][0], resume="auto", check=False, timeout=120), cases)))
    for key, (_, expected) in cases.items():
        proc = procs[key]
        assert proc.returncode == 2, (key, proc.stderr[-3000:])
        assert f"error: refusing to resume from {copies[key] / 'checkpoints' / 'step_00000010'}: " in proc.stderr
        assert expected in proc.stderr and "--force-resume" in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and "init plan" not in proc.stderr
        assert not (copies[key] / "metrics.jsonl").exists()  # nothing was started, nothing archived

    forced = run([PY, "launch/train.py", "--config", "configs/tiny_cpu.yaml", "--resume", "auto", "--force-resume",
                  "--set", f"output_dir={out}", *[a for o in COMMON for a in ("--set", o)],
                  "--set", f"model.name_or_path={moved_model}"], timeout=300)
    assert "refusing" not in forced.stderr
    assert summary(out)["start_step"] == 10
    assert_matches_reference(out, reference, 11)
