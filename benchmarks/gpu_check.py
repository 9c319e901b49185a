"""The first run on a GPU machine, in one script: CUDA numerics, ZeRO-3 over NCCL with a
resume, a bf16 training step watched for host syncs, and the layer and end-to-end benchmarks.

    bash benchmarks/gpu_wheels.sh                       # here: fill .wheels/ and .device/ (carry both)
    bash benchmarks/gpu_check.sh                        # on the GPU machine; OUT=<folder> for the results
    python benchmarks/gpu_check.py --dry --out /tmp/gc  # CPU, gloo, tiny shapes (CI keeps it working)
    python benchmarks/gpu_check.py collect <folder>     # here: the returned figures into benchmarks/results

The GPU machine needs torch with CUDA, transformers, peft and pyarrow; what it lacks
(deepspeed, datasets, pydantic, ...) comes from ``.wheels/`` and the tiny model and data
from ``.device/shared`` (both made by ``gpu_wheels.sh``). Stages, each with its own time
limit and a ``PASS``/``FAIL`` line:

``setup``
    install ``.wheels/*.whl`` when present (``pip install --no-index --no-deps --target``,
    put first on ``PYTHONPATH``); point ``DUDE_SHARED`` at ``.device/shared`` (else
    ``../shared``); import torch, deepspeed, datasets, transformers, peft, pyarrow in a
    fresh process; report versions, the device, and carried wheels whose requirements the
    image does not meet.
``numerics``
    pytest ``tests/unit/test_dude.py`` (float64 references, bf16 module) and
    ``tests/unit/test_bf16.py`` and ``tests/unit/test_loss.py`` with ``DUDE_TEST_DEVICE=cuda``.
``zero3_resume``
    ``launch/train.py`` on ``configs/tiny_cpu.yaml`` (stories260K, GSM8K, fp32) under
    ``torch.distributed.run``, 1 rank, NCCL, ZeRO-3 with ``stage3_param_persistence_threshold=0``
    (every parameter partitioned at run time), 8 steps with a checkpoint at step 4; then a
    second run resumed from step 4; the losses of steps 5-8 must agree.
``bf16_sync``
    a random-weight model of Qwen2.5-0.5B's shape (24 layers, hidden 896, 14 heads, 2 KV
    heads, MLP 4864, q/k/v bias, tied embeddings; vocabulary cut to 32768 and the stories
    tokenizer) trained in bf16 under ZeRO-3 for 6 steps, every ``Trainer.step`` inside
    ``torch.cuda.set_sync_debug_mode("warn")``: each host sync is counted with the line
    that caused it (innermost frame, and innermost dude_dist/launch frame).
``layer_bench``
    ``benchmarks/layer.py --device cuda --dtype bfloat16`` (8192 tokens, rank 16):
    DuDe vs LoRA vs PEFT LoRA / DoRA.
``train_bench``
    ``benchmarks/train.py --nproc 1 --dtype bfloat16 --sizes qwen0.5b-v32k``: dude_dist vs
    HF Trainer + PEFT DoRA+PiSSA vs PEFT LoRA.
``packing_bench``
    ``benchmarks/train.py --packing`` on the same model, 1 GPU, bf16: dude_dist on GSM8K at
    ``max_seq_len`` 1024, padded micro-batches against packed rows, with
    ``flash_attention_2`` where the ``flash_attn`` package is installed (``sdpa`` otherwise):
    real tokens/s, padding and fill ratios, and the loss curves.

Results: ``OUT/gpu_check.json`` (every figure) and ``OUT/gpu_check.md`` (the summary),
rewritten after each stage so that a run cut short keeps what it measured,
``OUT/gpu_check.log`` (the tail of every stage's log) and the benchmarks' records
``OUT/gpu_layer.json``, ``OUT/gpu_train.json``, ``OUT/gpu_packing.json`` (their tables are in
``gpu_check.md``: a device run returns at most 8 files). The exit code is 1 if any stage
failed. The GPU run is sized to finish in under 9.5 minutes (``--budget``).

Dry mode (``--dry``, and always when torch sees no CUDA device) runs the same stages on
CPU with gloo and tiny shapes (a 2-layer Qwen-shaped model of hidden 112, the v_proj
layer at 64 tokens, stories260K for the end-to-end and packing benchmarks), in about 95 s on 2 cores;
the host-sync count needs CUDA and is not taken there. Its benchmark files are named
``gpu_check_dry_*`` and stay in the output folder.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
WHEELS = ROOT / ".wheels"
DEVICE_SHARED = ROOT / ".device" / "shared"
RESULTS = ROOT / "benchmarks" / "results"
STAGES = ("setup", "numerics", "zero3_resume", "bf16_sync", "layer_bench", "train_bench", "packing_bench")
SYNC_MESSAGE = "synchronizing CUDA operation"
LOG_TAIL_BYTES = 200_000


# --------------------------------------------------------------------------- what each mode runs


@dataclass(frozen=True)
class Plan:
    """Sizes and time limits of one mode (``gpu`` or ``dry``)."""

    name: str
    budget_s: float  # the whole run
    limits: dict[str, float]  # per stage, seconds
    backend: str
    test_device: str
    zero3_steps: int
    zero3_save: int
    resume_tol: float  # max |loss difference| between the first run and the resumed one
    qwen: dict[str, int]  # build_qwen_shape keywords
    qwen_dir: str
    qwen_train: dict[str, Any]  # run config overrides of the bf16 run
    layer_args: tuple[str, ...]
    train_args: tuple[str, ...]
    packing_args: tuple[str, ...]
    bench_prefix: str

    def limit(self, stage: str) -> float:
        return self.limits[stage]


GPU_PLAN = Plan(
    name="gpu", budget_s=560.0,
    limits={"setup": 90, "numerics": 120, "zero3_resume": 150, "bf16_sync": 150, "layer_bench": 90,
            "train_bench": 240, "packing_bench": 150},
    backend="nccl", test_device="cuda", zero3_steps=8, zero3_save=4, resume_tol=1e-4,
    qwen={"layers": 24, "vocab": 32768, "hidden": 896, "heads": 14, "kv_heads": 2, "intermediate": 4864},
    qwen_dir="qwen0.5b-v32k",  # the folder benchmarks/train.py builds and reuses for that size
    qwen_train={"adapter.rank": 16, "data.max_seq_len": 512, "data.limit": 256, "train.micro_batch_size": 4,
                "train.global_batch_size": 8, "train.max_steps": 6, "train.lr": 1e-4},
    layer_args=("--device", "cuda", "--dtype", "bfloat16", "--tokens", "8192", "--repeats", "50", "--warmup", "5"),
    train_args=("--sizes", "qwen0.5b-v32k", "--nproc", "1", "--dtype", "bfloat16", "--steps-large", "12",
                "--skip-large", "4"),
    packing_args=("--packing", "--sizes", "qwen0.5b-v32k", "--nproc", "1", "--dtype", "bfloat16", "--modes", "padded",
                  "packed", "--steps", "12", "--skip-large", "4", "--attn", "auto"),
    bench_prefix="gpu",
)

DRY_PLAN = Plan(
    name="dry", budget_s=480.0,
    limits={"setup": 60, "numerics": 90, "zero3_resume": 150, "bf16_sync": 90, "layer_bench": 90,
            "train_bench": 180, "packing_bench": 120},
    backend="gloo", test_device="cpu", zero3_steps=4, zero3_save=2, resume_tol=1e-6,
    qwen={"layers": 2, "vocab": 512, "hidden": 112, "heads": 14, "kv_heads": 2, "intermediate": 304},
    qwen_dir="qwen-shape-h112-l2",
    qwen_train={"adapter.rank": 4, "data.max_seq_len": 128, "data.limit": 64, "train.micro_batch_size": 2,
                "train.global_batch_size": 4, "train.max_steps": 3, "train.lr": 1e-3},
    layer_args=("--device", "cpu", "--dtype", "bfloat16", "--tokens", "64", "--repeats", "2", "--warmup", "1",
                "--shapes", "v_proj 1024x4096", "--threads", "1"),
    train_args=("--sizes", "stories260K", "--nproc", "1", "--dtype", "bfloat16", "--steps", "3", "--skip", "1"),
    packing_args=("--packing", "--sizes", "stories260K", "--nproc", "1", "--dtype", "bfloat16", "--modes", "padded",
                  "packed", "--steps", "3", "--skip", "1", "--attn", "auto"),
    bench_prefix="gpu_check_dry",
)


# --------------------------------------------------------------------------- running things


class StageFailed(Exception):
    """A stage could not go on (a process failed, a file is missing, time ran out)."""


@dataclass
class Stage:
    """What one stage found: ``checks`` decide PASS/FAIL, ``figures`` are the measurements."""

    name: str
    limit_s: float
    status: str = "fail"
    seconds: float = 0.0
    checks: list[dict] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    logs: list[str] = field(default_factory=list)

    def check(self, name: str, ok: bool, detail: Any = "") -> bool:
        self.checks.append({"name": name, "ok": bool(ok), "detail": str(detail)})
        return bool(ok)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("status", "seconds", "limit_s", "checks", "figures", "notes", "error",
                                               "logs")}


class Run:
    """One gpu_check run: the plan, folders, the subprocess environment and the stages so far."""

    def __init__(self, plan: Plan, out: Path, work: Path, budget: float) -> None:
        self.plan = plan
        self.out = out
        self.work = work
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget
        self.budget = budget
        self.started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self.stages: dict[str, Stage] = {}
        self.pythonpath: list[str] = [str(ROOT)]
        self.shared: Path = pick_shared()
        self.device_name = "cpu"
        self.env_report: dict[str, Any] = {}

    # -- environment of every process started from here
    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"), "TOKENIZERS_PARALLELISM": "false",
                    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                    "TRANSFORMERS_VERBOSITY": "error", "DUDE_SHARED": str(self.shared),
                    "PYTHONPATH": os.pathsep.join(self.pythonpath + [p for p in env.get("PYTHONPATH", "").split(
                        os.pathsep) if p and p not in self.pythonpath])})
        env.pop("MASTER_PORT", None)
        env.update(extra)
        return env

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, stage: Stage, cmd: list[str], log_name: str, *, timeout: float, **env: str) -> float:
        """Run ``cmd`` from the project root with its output in ``work/<log_name>``; raise on failure."""
        log = self.work / log_name
        stage.logs.append(str(log))
        t0 = time.monotonic()
        with open(log, "w") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env(**env), stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=max(timeout, 1.0))
            except subprocess.TimeoutExpired:
                kill_tree(proc)
                raise StageFailed(f"{log_name}: still running after {timeout:.0f} s (killed); "
                                  f"last lines:\n{tail(log, 40)}") from None
        if rc != 0:
            raise StageFailed(f"{log_name}: exit code {rc}: {last_error(log)}\nlast lines:\n{tail(log, 40)}")
        return time.monotonic() - t0

    def torchrun(self, script: str, *args: str) -> list[str]:
        from benchmarks.common import free_port

        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr",
                "127.0.0.1", "--master_port", str(free_port()), script, *args]

    # -- results
    def summary(self) -> dict:
        return {
            "mode": self.plan.name, "device": self.device_name, "started": self.started,
            "seconds": time.monotonic() - self.t0, "budget_s": self.budget,
            "machine": {"host_cpu": _cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                        "platform": platform.platform()},
            "environment": self.env_report,
            "passed": bool(self.stages) and all(s.status == "pass" for s in self.stages.values()),
            "stages": {name: stage.to_dict() for name, stage in self.stages.items()},
        }

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        data = self.summary()
        _write_atomic(self.out / "gpu_check.json", json.dumps(data, indent=1, default=str) + "\n")
        _write_atomic(self.out / "gpu_check.md", render_markdown(data))


def kill_tree(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """End ``proc`` and every process below it (torchrun puts its workers in sessions of their own)."""
    import signal

    import psutil

    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def last_error(path: Path) -> str:
    """The last line of a log that names an error (the exception under torchrun's banner)."""
    lines = tail(path, 400).splitlines()
    for line in reversed(lines):
        text = line.strip()
        if ("Error" in text or "error:" in text or "Exception" in text) and "ChildFailedError" not in text \
                and not text.startswith(("File ", "raise ", "[rank")):
            return text[:400]
    return lines[-1][:400] if lines else "(empty log)"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _cpu_model() -> str:
    from benchmarks.common import cpu_model

    return cpu_model()


def pick_shared() -> Path:
    """Where the tiny model and data are: $DUDE_SHARED, else .device/shared, else ../shared."""
    if os.environ.get("DUDE_SHARED"):
        return Path(os.environ["DUDE_SHARED"]).resolve()
    if (DEVICE_SHARED / "models" / "stories260K" / "config.json").is_file():
        return DEVICE_SHARED
    return (ROOT.parent / "shared").resolve()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def step_values(output_dir: Path, key: str) -> dict[int, float]:
    """Last logged ``key`` per step from a run's metrics.jsonl (a resumed run appends)."""
    values: dict[int, float] = {}
    for row in read_jsonl(output_dir / "metrics.jsonl"):
        if key in row:
            values[row["step"]] = row[key]
    return values


def finite(values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


# --------------------------------------------------------------------------- stages

PROBE = r"""
import json, sys, time
from importlib import metadata
from pathlib import Path
out = {"imports": {}, "import_seconds": {}}
for name in ("torch", "numpy", "pyarrow", "datasets", "transformers", "peft", "accelerate", "deepspeed"):
    t0 = time.perf_counter()
    try:
        mod = __import__(name)
        out["imports"][name] = {"version": getattr(mod, "__version__", None), "file": getattr(mod, "__file__", None)}
    except Exception as exc:
        out["imports"][name] = {"error": f"{type(exc).__name__}: {exc}"}
    out["import_seconds"][name] = round(time.perf_counter() - t0, 2)
import torch
out["cuda_available"] = torch.cuda.is_available()
out["torch_cuda"] = torch.version.cuda
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    out["device_name"] = torch.cuda.get_device_name(0)
    out["device_count"] = torch.cuda.device_count()
    out["device_memory_gib"] = round(props.total_memory / 2**30, 1)
    out["capability"] = list(torch.cuda.get_device_capability(0))
    out["bf16_supported"] = torch.cuda.is_bf16_supported()
    try:
        out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception as exc:
        out["nccl"] = f"unavailable: {exc}"
unmet = []
try:
    from packaging.requirements import Requirement
    for wheel in sorted(Path(sys.argv[1]).glob("*.whl")):
        dist = wheel.name.split("-")[0]
        for text in metadata.requires(dist) or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                have = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                unmet.append(f"{dist}: {text} (not installed)")
                continue
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                unmet.append(f"{dist}: {text} (found {have})")
except Exception as exc:
    unmet.append(f"requirement check failed: {type(exc).__name__}: {exc}")
out["unmet_requirements"] = unmet
print("PROBE" + json.dumps(out))
"""


def stage_setup(run: Run, stage: Stage) -> None:
    plan = run.plan
    wheels = sorted(WHEELS.glob("*.whl"))
    stage.figures["wheels"] = [w.name for w in wheels]
    if wheels and plan.name == "gpu":
        site = run.work / "site"
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)]
        seconds = run.run(stage, cmd, "setup_pip.log", timeout=min(stage.limit_s, run.remaining()))
        stage.figures["install_seconds"] = round(seconds, 1)
        run.pythonpath.insert(0, str(site))
        sys.path.insert(0, str(site))
        stage.check("carried wheels installed", True, f"{len(wheels)} wheels into {site}")
    elif plan.name == "gpu":
        stage.notes.append("no .wheels/ folder: using the packages the image has (bash benchmarks/gpu_wheels.sh "
                           "makes it)")
    log = run.work / "setup_probe.log"
    run.run(stage, [sys.executable, "-c", PROBE, str(WHEELS)], "setup_probe.log",
            timeout=min(stage.limit_s, run.remaining()))
    line = next((ln for ln in log.read_text().splitlines() if ln.startswith("PROBE")), None)
    if line is None:
        raise StageFailed(f"the import probe printed no result:\n{tail(log, 20)}")
    probe = json.loads(line[len("PROBE"):])
    run.env_report = probe
    stage.figures.update({k: v for k, v in probe.items() if k != "imports"})
    stage.figures["versions"] = {k: v.get("version") for k, v in probe["imports"].items()}
    for name, info in probe["imports"].items():
        stage.check(f"import {name}", "error" not in info, info.get("error") or info.get("version"))
    if plan.name == "gpu":
        run.device_name = probe.get("device_name", "none")
        stage.check("CUDA device", probe["cuda_available"], run.device_name)
        stage.check("bf16 supported", probe.get("bf16_supported", False), probe.get("capability"))
    else:
        run.device_name = f"cpu ({_cpu_model()}, dry mode)"
    for item in probe["unmet_requirements"]:
        stage.notes.append(f"carried wheel requirement not met by the image: {item}")
    stories = run.shared / "models" / "stories260K" / "config.json"
    data = run.shared / "data" / "gsm8k" / "train.jsonl"
    stage.figures["shared"] = str(run.shared)
    stage.check("stories260K present", stories.is_file(), stories)
    stage.check("GSM8K present", data.is_file() and (data.parent / "test.jsonl").is_file(), data.parent)


def stage_numerics(run: Run, stage: Stage) -> None:
    files = ["tests/unit/test_dude.py"]
    for name in ("test_bf16.py", "test_loss.py"):
        if (ROOT / "tests" / "unit" / name).is_file():
            files.append(f"tests/unit/{name}")
        else:
            stage.notes.append(f"tests/unit/{name} is absent: it did not run")
    xml = run.work / "numerics.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-rfE",
           f"--junitxml={xml}", *files]
    error = None
    try:
        run.run(stage, cmd, "numerics.log", timeout=min(stage.limit_s, run.remaining()),
                DUDE_TEST_DEVICE=run.plan.test_device)
    except StageFailed as exc:
        error = exc
    counts, failed = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}, []
    if xml.is_file():
        root = ET.parse(xml).getroot()
        for suite in root.iter("testsuite"):
            for key in counts:
                counts[key] += int(suite.get(key, 0))
            for case in suite.iter("testcase"):
                if case.find("failure") is not None or case.find("error") is not None:
                    failed.append(f"{case.get('classname')}::{case.get('name')}")
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    stage.figures.update({"files": files, "device": run.plan.test_device, "passed": passed, **counts,
                          "failed_tests": failed})
    stage.check("pytest exit code 0", error is None, str(error or "")[:2000])
    stage.check("tests ran and passed", passed >= 10 and not failed, f"{passed} passed, {len(failed)} failed")


def _zero3_overrides(run: Run, output_dir: Path) -> list[str]:
    shared, plan = run.shared, run.plan
    return [f"output_dir={output_dir}", f"model.name_or_path={shared / 'models' / 'stories260K'}",
            f"data.sources=[{shared / 'data' / 'gsm8k' / 'train.jsonl'}]",
            f"data.eval_sources=[{shared / 'data' / 'gsm8k' / 'test.jsonl'}]", "data.limit=256", "data.eval_size=8",
            f"deepspeed.backend={plan.backend}", "deepspeed.stage3_param_persistence_threshold=0",
            f"train.max_steps={plan.zero3_steps}", f"train.save_every={plan.zero3_save}", "train.keep_last=3"]


def _train_cmd(run: Run, overrides: list[str], resume: str, script: str = "launch/train.py",
               pre: tuple[str, ...] = ()) -> list[str]:
    args = [*pre, "--config", "configs/tiny_cpu.yaml", "--resume", resume]
    for item in overrides:
        args += ["--set", item]
    return run.torchrun(script, *args)


def stage_zero3_resume(run: Run, stage: Stage) -> None:
    plan = run.plan
    full, resumed = run.work / "zero3" / "full", run.work / "zero3" / "resumed"
    for d in (full, resumed):
        shutil.rmtree(d, ignore_errors=True)
    wall_full = run.run(stage, _train_cmd(run, _zero3_overrides(run, full), "none"), "zero3_full.log",
                        timeout=min(stage.limit_s * 0.6, run.remaining()))
    ckpt = full / "checkpoints" / f"step_{plan.zero3_save:08d}"
    if not ckpt.is_dir():
        raise StageFailed(f"no checkpoint {ckpt} after the first run")
    resumed.mkdir(parents=True)
    shutil.copytree(full / "dude_init", resumed / "dude_init")
    wall_resumed = run.run(stage, _train_cmd(run, _zero3_overrides(run, resumed), str(ckpt)), "zero3_resumed.log",
                           timeout=min(stage.limit_s, run.remaining()))
    a, b = step_values(full, "train/loss"), step_values(resumed, "train/loss")
    sa, sb = json.loads((full / "summary.json").read_text()), json.loads((resumed / "summary.json").read_text())
    diffs = {s: abs(a[s] - b[s]) for s in b if s in a}
    max_diff = max(diffs.values()) if diffs else float("nan")
    steps = list(range(1, plan.zero3_steps + 1))
    step_times = list(step_values(full, "train/step_time_s").values())
    memory = list(step_values(full, "train/memory_bytes").values())
    stage.figures.update({
        "backend": plan.backend, "persistence_threshold": 0, "steps": plan.zero3_steps, "resume_from": plan.zero3_save,
        "losses": [a.get(s) for s in steps], "resumed_losses": {s: b[s] for s in sorted(b)},
        "max_abs_loss_diff": max_diff, "tolerance": plan.resume_tol,
        "svd_count": sa["init"]["svd_count"], "resumed_svd_count": sb["init"]["svd_count"],
        "resumed_start_step": sb["start_step"], "eval_loss_start": sa.get("eval_loss_start"),
        "eval_loss_end": sa.get("eval_loss_end"), "startup_s": sa.get("startup_seconds"),
        "median_step_s": statistics.median(step_times) if step_times else None,
        "peak_memory_bytes": max(memory) if memory else None,
        "wall_s": {"first": round(wall_full, 1), "resumed": round(wall_resumed, 1)},
    })
    losses = [a.get(s) for s in steps]
    stage.check("every step logged", sorted(a) == steps, sorted(a))
    stage.check("losses finite and plausible", finite(losses) and 3 < losses[0] < 12, losses[:2])
    stage.check("resumed at the checkpoint", sb["start_step"] == plan.zero3_save and sorted(b) == steps[plan.zero3_save:],
                f"start_step {sb['start_step']}, steps {sorted(b)}")
    stage.check("resume ran no SVD (factor cache)", sb["init"]["svd_count"] == 0 and sa["init"]["svd_count"] > 0,
                f"{sa['init']['svd_count']} then {sb['init']['svd_count']}")
    stage.check("resumed losses match", max_diff <= plan.resume_tol, f"max |diff| {max_diff:.3g} <= {plan.resume_tol}")
    if sa.get("eval_loss_start") is not None and sa.get("eval_loss_end") is not None:
        stage.check("held-out loss falls", sa["eval_loss_end"] < sa["eval_loss_start"],
                    f"{sa['eval_loss_start']:.4f} -> {sa['eval_loss_end']:.4f}")


def build_model(run: Run, stage: Stage) -> Path:
    """The Qwen-shaped random model of this plan, built once in the work folder by a separate
    process (so this one never imports transformers) and reused by the end-to-end benchmark."""
    folder = run.work / "bench" / run.plan.qwen_dir
    code = ("import json, sys; from pathlib import Path; from benchmarks.train import build_qwen_shape; "
            "build_qwen_shape(Path(sys.argv[1]), **json.loads(sys.argv[2]))")
    run.run(stage, [sys.executable, "-c", code, str(folder), json.dumps(run.plan.qwen)], "bf16_build_model.log",
            timeout=min(stage.limit_s, run.remaining()))
    return folder


def stage_bf16_sync(run: Run, stage: Stage) -> None:
    plan = run.plan
    t0 = time.monotonic()
    model = build_model(run, stage)
    stage.figures["model_build_s"] = round(time.monotonic() - t0, 1)
    stage.figures["model"] = {**plan.qwen, "name": "Qwen2.5-0.5B shape" if plan.name == "gpu" else
                              "Qwen2.5-0.5B head layout, tiny", "tied_embeddings": True, "qkv_bias": True}
    out = run.work / "bf16"
    shutil.rmtree(out, ignore_errors=True)
    report = run.work / "bf16_syncs.json"
    overrides = [f"output_dir={out}", f"model.name_or_path={model}", "model.dtype=bfloat16",
                 f"data.sources=[{run.shared / 'data' / 'gsm8k' / 'train.jsonl'}]", "data.eval_size=0",
                 "train.save_every=0", f"deepspeed.backend={plan.backend}",
                 *(f"{k}={v}" for k, v in plan.qwen_train.items())]
    cmd = _train_cmd(run, overrides, "none", script=str(Path(__file__).resolve()),
                     pre=("_train", "--sync-report", str(report), "--"))
    wall = run.run(stage, cmd, "bf16_sync.log", timeout=min(stage.limit_s, run.remaining()))
    summary = json.loads((out / "summary.json").read_text())
    losses = summary["losses"]
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "train/step_time_s" in r]
    times = [r["train/step_time_s"] for r in rows]
    tokens = [r["train/tokens_per_s"] * r["train/step_time_s"] for r in rows]
    steady = slice(1, None) if len(rows) > 1 else slice(None)
    syncs = json.loads(report.read_text()) if report.is_file() else {}
    stage.figures.update({
        "losses": losses, "step_seconds": times,
        "tokens_per_s_after_step_1": sum(tokens[steady]) / max(sum(times[steady]), 1e-9),
        "peak_memory_bytes": max((r["train/memory_bytes"] for r in rows), default=None),
        "trainable_params": summary["init"]["trainable_params"], "dude_layers": summary["init"]["layers"],
        "init_wall_s": summary["init"]["wall_seconds"], "startup_s": summary["startup_seconds"],
        "wall_s": round(wall, 1), "syncs": syncs,
    })
    expected = math.log(plan.qwen["vocab"])
    stage.check("every step ran", len(losses) == plan.qwen_train["train.max_steps"], len(losses))
    stage.check("losses finite, first near ln(vocab)", finite(losses) and abs(losses[0] - expected) < 2.0,
                f"{losses[0] if losses else None} vs ln({plan.qwen['vocab']}) = {expected:.2f}")
    if plan.name == "gpu":
        stage.check("sync debug mode was on in every step", syncs.get("watched_steps") == len(losses),
                    syncs.get("watched_steps"))
        if syncs.get("total"):
            stage.notes.append(f"{syncs['total']} host syncs in {syncs['watched_steps']} steps, by the package "
                               f"that asked: {syncs.get('by_origin')}; see the table below")
    else:
        stage.notes.append("host-sync count needs CUDA (not taken in dry mode)")


def _bench(run: Run, stage: Stage, script: str, args: tuple[str, ...], extra: list[str], label: str = "") -> dict:
    """Run ``benchmarks/<script>.py`` with ``args``: its JSON goes to ``OUT/<prefix>_<label or script>.json``
    and its Markdown into the stage's figures (pasted into ``gpu_check.md``; a device run
    returns at most 8 files)."""
    name = f"{run.plan.bench_prefix}_{label or script}"
    results = run.work / "results"
    cmd = [sys.executable, str(Path(__file__).resolve()), "_bench", script, "--results", str(results), "--",
           *args, *extra, "--name", name]
    wall = run.run(stage, cmd, f"{label or script}_bench.log", timeout=min(stage.limit_s, run.remaining()))
    stage.figures["wall_s"] = round(wall, 1)
    data = json.loads((results / f"{name}.json").read_text())
    shutil.copy(results / f"{name}.json", run.out / f"{name}.json")
    stage.figures["files"] = [f"{name}.json"]
    stage.figures["markdown"] = (results / f"{name}.md").read_text()
    return data


def stage_layer_bench(run: Run, stage: Stage) -> None:
    data = _bench(run, stage, "layer", run.plan.layer_args, [])
    rows = data["results"]
    by = {(r["shape"], r["impl"]): r for r in rows}
    table = []
    for r in rows:
        ref, dora = by[(r["shape"], "lora")], by.get((r["shape"], "peft_dora"))
        table.append({"shape": r["shape"], "impl": r["impl"], "median_ms": r["median_s"] * 1e3,
                      "x_lora": r["median_s"] / ref["median_s"],
                      "x_peft_dora": r["median_s"] / dora["median_s"] if dora else None,
                      "saved_mib": r["saved_bytes"] / 2**20,
                      "cuda_peak_mib": r["cuda_peak_bytes"] / 2**20 if r.get("cuda_peak_bytes") else None})
    stage.figures["rows"] = table
    impls = {"lora", "peft_lora", "peft_dora", "dude_exact", "dude_detach", "dude_exact_eager", "dude_detach_eager",
             "dude_recompute"}
    for shape in sorted({r["shape"] for r in rows}):
        have = {r["impl"] for r in rows if r["shape"] == shape}
        stage.check(f"{shape}: every implementation measured", have == impls, sorted(have))
    stage.check("times and saved bytes positive", all(r["median_s"] > 0 and r["saved_bytes"] > 0 for r in rows))
    if run.plan.name == "gpu":
        stage.check("CUDA peak memory measured", all(r.get("cuda_peak_bytes") for r in rows))


def stage_train_bench(run: Run, stage: Stage) -> None:
    timeout = max(60.0, min(stage.limit_s, run.remaining()) / 3)
    data = _bench(run, stage, "train", run.plan.train_args,
                  ["--work-dir", str(run.work / "bench"), "--timeout", str(int(timeout))])
    table = []
    for size, systems in data["results"].items():
        same = len({tuple(rec["tokens_per_step"]) for recs in systems.values() for rec in recs}) == 1
        stage.check(f"{size}: every system saw the same tokens", same)
        stage.check(f"{size}: all three systems ran", set(systems) == {"dude_dist", "peft_dora_pissa", "peft_lora"},
                    sorted(systems))
        first = {name: recs[0]["losses"][0] for name, recs in systems.items()}
        stage.check(f"{size}: same step-1 loss in every system",
                    max(first.values()) - min(first.values()) <= 0.02 * abs(max(first.values())), first)
        for name, recs in systems.items():
            rec = recs[0]
            table.append({"size": size, "system": name, "tokens_per_s": rec["tokens_per_s"],
                          "median_step_ms": rec["median_step_s"] * 1e3, "startup_s": rec["startup_seconds"],
                          "loss_first": rec["losses"][0], "loss_last": rec["losses"][-1]})
            stage.check(f"{size} {name}: tokens/s positive, losses finite",
                        rec["tokens_per_s"] > 0 and finite(rec["losses"]), rec["tokens_per_s"])
        dude = systems.get("dude_dist", [{}])[0].get("tokens_per_s")
        for base in ("peft_dora_pissa", "peft_lora"):
            if dude and base in systems:
                stage.figures[f"{size}: dude_dist / {base} tokens/s"] = dude / systems[base][0]["tokens_per_s"]
    stage.figures["rows"] = table


def stage_packing_bench(run: Run, stage: Stage) -> None:
    timeout = max(60.0, min(stage.limit_s, run.remaining()) / 2)
    data = _bench(run, stage, "train", run.plan.packing_args,
                  ["--work-dir", str(run.work / "bench"), "--timeout", str(int(timeout))], label="packing")
    stage.figures["attn_implementation"] = data["settings"]["attn_implementation"]
    stage.figures["fill_ratio"] = data["settings"]["fill_ratio"]
    table = []
    for size, modes in data["results"].items():
        stage.check(f"{size}: padded and packed both ran", {"padded", "packed"} <= set(modes), sorted(modes))
        for mode, recs in modes.items():
            rec = recs[0]
            table.append({"size": size, "mode": mode, "real_tokens_per_s": rec["tokens_per_s"],
                          "padding_ratio": rec["padding"], "median_step_ms": rec["median_step_s"] * 1e3,
                          "real_tokens_per_step": statistics.median(rec["tokens_per_step"][rec["skip"]:]),
                          "loss_first": rec["losses"][0], "loss_last": rec["losses"][-1]})
            stage.check(f"{size} {mode}: real tokens/s positive, losses finite",
                        rec["tokens_per_s"] > 0 and finite(rec["losses"]), rec["tokens_per_s"])
        if {"padded", "packed"} <= set(modes):
            padded, packed = modes["padded"][0], modes["packed"][0]
            tokens = {mode: sum(modes[mode][0]["tokens_per_step"]) for mode in ("packed", "padded")}
            stage.check(f"{size}: a packed step carries more real tokens than a padded one",
                        tokens["packed"] > tokens["padded"], f"{tokens['packed']} vs {tokens['padded']}")
            stage.figures[f"{size}: packed / padded real tokens/s"] = packed["tokens_per_s"] / padded["tokens_per_s"]
    stage.figures["rows"] = table


STAGE_FUNCS: dict[str, Callable[[Run, Stage], None]] = {
    "setup": stage_setup, "numerics": stage_numerics, "zero3_resume": stage_zero3_resume,
    "bf16_sync": stage_bf16_sync, "layer_bench": stage_layer_bench, "train_bench": stage_train_bench,
    "packing_bench": stage_packing_bench,
}


def run_stage(run: Run, name: str) -> Stage:
    stage = Stage(name, run.plan.limit(name))
    run.stages[name] = stage
    t0 = time.monotonic()
    if run.remaining() < 15:
        stage.error = f"not started: {run.remaining():.0f} s left of the {run.budget:.0f} s budget"
    else:
        print(f"[gpu_check] {name}: running (limit {min(stage.limit_s, run.remaining()):.0f} s)", flush=True)
        try:
            STAGE_FUNCS[name](run, stage)
        except StageFailed as exc:
            stage.error = str(exc)
        except Exception as exc:  # a bug or an unexpected file: the stage fails, the others still run
            stage.error = "".join(traceback.format_exception(exc))[-4000:]
    stage.seconds = round(time.monotonic() - t0, 1)
    if stage.error is None and stage.checks and all(c["ok"] for c in stage.checks):
        stage.status = "pass"
    bad = [c for c in stage.checks if not c["ok"]]
    line = f"[gpu_check] {name}: {stage.status.upper()} ({stage.seconds:.1f} s)"
    if bad:
        line += " — failed: " + "; ".join(f"{c['name']} ({c['detail'][:200]})" for c in bad)
    if stage.error:
        line += f" — {stage.error.splitlines()[0][:300]}"
    print(line, flush=True)
    for note in stage.notes:
        print(f"[gpu_check]   note: {note}", flush=True)
    run.write()
    return stage


# --------------------------------------------------------------------------- the report


def _fmt(value: Any) -> str:
    from benchmarks.common import fmt

    return fmt(value)


def _headline(name: str, figures: dict) -> str:
    """The few figures of a stage worth a table cell."""
    f = figures
    if name == "setup":
        v = f.get("versions", {})
        return ", ".join(f"{k} {v[k]}" for k in ("torch", "deepspeed", "transformers", "peft", "datasets") if v.get(k))
    if name == "numerics":
        return f"{f.get('passed', 0)} passed, {len(f.get('failed_tests', []))} failed on {f.get('device')}"
    if name == "zero3_resume" and "losses" in f:
        return (f"loss {_fmt(f['losses'][0])} → {_fmt(f['losses'][-1])}; resumed: max abs Δloss "
                f"{_fmt(f['max_abs_loss_diff'])}; median step {_fmt((f['median_step_s'] or 0) * 1e3)} ms")
    if name == "bf16_sync" and "losses" in f:
        s = f.get("syncs", {})
        syncs = (f"{s.get('total', 0)} host syncs in {s.get('watched_steps', 0)} steps "
                 f"({s.get('project_total', 0)} asked for by dude_dist/launch code)" if s.get("enabled")
                 else "syncs not watched (CPU)")
        return (f"loss {_fmt(f['losses'][0])} → {_fmt(f['losses'][-1])}; {_fmt(f['tokens_per_s_after_step_1'])} "
                f"tokens/s; {syncs}")
    if name == "layer_bench" and "rows" in f:
        dude = [r for r in f["rows"] if r["impl"] == "dude_exact"]
        return "; ".join(f"{r['shape']}: dude_exact {_fmt(r['median_ms'])} ms = {_fmt(r['x_lora'])}× lora, "
                         f"{_fmt(r['x_peft_dora'])}× peft_dora" for r in dude)
    if name == "train_bench":
        return "; ".join(f"{k} {_fmt(v)}" for k, v in f.items() if "tokens/s" in k)
    if name == "packing_bench" and "attn_implementation" in f:
        return "; ".join([f"{k} {_fmt(v)}" for k, v in f.items() if "tokens/s" in k]
                         + [f"fill {_fmt(f['fill_ratio'])}", f"{f['attn_implementation']} attention"])
    return ""


def render_markdown(data: dict) -> str:
    env = data.get("environment", {})
    versions = {k: v.get("version") for k, v in env.get("imports", {}).items()}
    if not versions:  # setup did not run: the installed versions, read without importing
        from benchmarks.common import versions as installed

        versions = installed()
    lines = [f"### GPU check ({data['mode']}) on {data['device']}", "",
             f"{data['started']} · {data['machine']['host_cpu']} ({data['machine']['cores']} cores) · "
             + ", ".join(f"{k} {v}" for k, v in versions.items() if v)
             + (f" · CUDA {env.get('torch_cuda')}, NCCL {env.get('nccl')}" if env.get("cuda_available") else "")
             + f" · {data['seconds']:.0f} s of a {data['budget_s']:.0f} s budget", "",
             "| stage | status | seconds | figures |", "|---|---|---|---|"]
    for name, s in data["stages"].items():
        lines.append(f"| {name} | {s['status'].upper()} | {s['seconds']:.1f} | {_headline(name, s['figures'])} |")
    lines.append("")
    for name, s in data["stages"].items():
        bad = [c for c in s["checks"] if not c["ok"]]
        if bad or s["error"] or s["notes"]:
            lines.append(f"**{name}**")
            lines += [f"- failed check: {c['name']}: {c['detail'][:500]}" for c in bad]
            if s["error"]:
                lines.append(f"- error: `{s['error'].splitlines()[0][:500]}`")
            lines += [f"- {n}" for n in s["notes"]]
            lines.append("")
    syncs = data["stages"].get("bf16_sync", {}).get("figures", {}).get("syncs", {})
    if syncs.get("sites"):
        origins = ", ".join(f"{name} {n}" for name, n in syncs.get("by_origin", {}).items())
        lines += [f"**Host syncs inside Trainer.step (bf16 run): {syncs['total']} in {syncs['watched_steps']} steps "
                  f"({', '.join(map(str, syncs['per_step']))} per step); by the package that asked: {origins}**", "",
                  "| count | synced in | called from (first frame outside torch) | dude_dist/launch frame |",
                  "|---|---|---|---|"]
        lines += [f"| {s['count']} | `{s['site']}` | `{s.get('caller', '')}` | `{s['project'] or '—'}` |"
                  for s in syncs["sites"][:20]]
        lines.append("")
    for name in ("layer_bench", "train_bench", "packing_bench"):
        text = data["stages"].get(name, {}).get("figures", {}).get("markdown", "").strip()
        if text:
            lines += ["#" + text if text.startswith("### ") else text, ""]  # a level below this report's title
    return "\n".join(lines) + "\n"


def write_log(run: Run) -> None:
    parts = []
    for stage in run.stages.values():
        for log in stage.logs:
            p = Path(log)
            if p.is_file():
                text = p.read_bytes()[-LOG_TAIL_BYTES:].decode(errors="replace")
                parts.append(f"===== {stage.name}: {p.name} (last {LOG_TAIL_BYTES // 1000} kB) =====\n{text}")
    _write_atomic(run.out / "gpu_check.log", "\n".join(parts) + "\n")


# --------------------------------------------------------------------------- workers (run under torchrun)


class SyncWatch:
    """Counts the host syncs that ``torch.cuda.set_sync_debug_mode("warn")`` reports while a
    block runs. Each is kept with three frames: the innermost (where the sync happened, often
    inside torch), the caller (the innermost frame outside torch: the code that asked for
    it) and the innermost dude_dist/launch frame; ``origin`` is the caller's package."""

    def __init__(self) -> None:
        import torch

        self.enabled = torch.cuda.is_available()
        self.per_step: dict[int, int] = {}
        self.sites: Counter = Counter()

    @staticmethod
    def _path(filename: str) -> str:
        """A frame's file relative to the project root or to the folder packages install into."""
        path = Path(filename)
        try:
            return str(path.resolve().relative_to(ROOT))
        except ValueError:
            text = str(path)
            for marker in ("site-packages/", "/site/", "dist-packages/"):
                if marker in text:
                    return text.rsplit(marker, 1)[-1]
            return text

    @classmethod
    def _where(cls, frame) -> str:
        return f"{cls._path(frame.filename)}:{frame.lineno} ({frame.name})"

    @contextmanager
    def watch(self, step: int):
        if not self.enabled:
            yield
            return
        import torch

        self.per_step[step] = 0
        here = str(Path(__file__).resolve())

        def show(message, category, filename, lineno, file=None, line=None):
            if SYNC_MESSAGE not in str(message):
                return previous(message, category, filename, lineno, file, line)
            frames = [f for f in traceback.extract_stack()[:-1]
                      if f.filename != here and not f.filename.endswith(("/warnings.py", "<frozen warnings>"))]
            paths = [self._path(f.filename) for f in frames]
            site = self._where(frames[-1]) if frames else f"{filename}:{lineno}"
            outside = [i for i, path in enumerate(paths) if not path.startswith("torch/")]
            caller = self._where(frames[outside[-1]]) if outside else site
            own = [i for i, path in enumerate(paths) if path.startswith(("dude_dist/", "launch/"))]
            project = self._where(frames[own[-1]]) if own else ""
            caller_path = paths[outside[-1]] if outside else ""
            origin = "dude_dist" if caller_path.startswith(("dude_dist/", "launch/")) else \
                caller_path.split("/", 1)[0] or "torch"
            self.per_step[step] += 1
            self.sites[(site, caller, project, origin)] += 1

        with warnings.catch_warnings():
            warnings.filterwarnings("always", message=f".*{SYNC_MESSAGE}")
            previous = warnings.showwarning
            warnings.showwarning = show
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode("default")

    def report(self) -> dict:
        by_origin: Counter = Counter()
        for (_, _, _, origin), n in self.sites.items():
            by_origin[origin] += n
        first = min(self.per_step, default=0)
        return {"enabled": self.enabled, "watched_steps": len(self.per_step), "total": sum(self.per_step.values()),
                "by_origin": dict(by_origin.most_common()), "project_total": by_origin.get("dude_dist", 0),
                "per_step": [self.per_step[k] for k in sorted(self.per_step)],
                "after_first_step": sum(n for k, n in self.per_step.items() if k != first),
                "sites": [{"count": n, "site": site, "caller": caller, "project": project, "origin": origin}
                          for (site, caller, project, origin), n in self.sites.most_common()]}


def worker_train(argv: list[str]) -> int:
    """``launch/train.py`` with every ``Trainer.step`` inside a :class:`SyncWatch`."""
    p = argparse.ArgumentParser(prog="gpu_check.py _train")
    p.add_argument("--sync-report", required=True)
    args, rest = p.parse_known_args(argv)
    rest = [a for a in rest if a != "--"]
    import dude_dist.trainer as trainer_module
    from launch.train import main

    watch = SyncWatch()
    step = trainer_module.Trainer.step

    def watched_step(self, index):
        with watch.watch(index):
            return step(self, index)

    trainer_module.Trainer.step = watched_step
    rc = main(rest)
    if os.environ.get("RANK", "0") == "0":
        Path(args.sync_report).write_text(json.dumps(watch.report(), indent=1))
    return rc


def worker_bench(argv: list[str]) -> int:
    """Run benchmarks/<script>.py with its result files written to ``--results`` instead of benchmarks/results."""
    p = argparse.ArgumentParser(prog="gpu_check.py _bench")
    p.add_argument("script", choices=("layer", "train"))
    p.add_argument("--results", required=True)
    args, rest = p.parse_known_args(argv)
    rest = [a for a in rest if a != "--"]
    import importlib

    import benchmarks.common as common

    common.RESULTS = Path(args.results)
    module = importlib.import_module(f"benchmarks.{args.script}")
    if hasattr(module, "torchrun_cmd"):  # python -m: no torchrun script needed on PATH
        def torchrun_cmd(nproc: int) -> list[str]:
            return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
                    "127.0.0.1", "--master_port", str(common.free_port())]

        module.torchrun_cmd = torchrun_cmd
    return module.main(rest)


# --------------------------------------------------------------------------- collect


def collect(folder: Path) -> int:
    """Copy a GPU run's result files into benchmarks/results and paste their tables into
    benchmarks/README.md. Every JSON file is read first: a damaged one stops it before
    anything is copied (exit 1); a missing folder is exit 2."""
    from benchmarks.common import update_readme

    if not folder.is_dir():
        print(f"error: {folder} is not a folder (give the folder a GPU run's files came back in)", file=sys.stderr)
        return 2
    names = ["gpu_check", "gpu_layer", "gpu_train", "gpu_packing"]
    parsed = {}
    for name in names:
        path = folder / f"{name}.json"
        if path.is_file():
            try:
                parsed[name] = json.loads(path.read_text())
            except (ValueError, UnicodeDecodeError) as exc:
                print(f"error: {path} is not valid JSON ({exc}); nothing copied", file=sys.stderr)
                return 1
    markdown = {}  # a benchmark's Markdown, kept in the report's stage figures
    for stage in parsed.get("gpu_check", {}).get("stages", {}).values():
        figures = stage.get("figures", {})
        if figures.get("markdown"):
            markdown.update({fname.removesuffix(".json"): figures["markdown"] for fname in figures.get("files", [])})
    copied = []
    for name in names:
        json_src, md_src = folder / f"{name}.json", folder / f"{name}.md"
        if json_src.is_file():
            shutil.copy(json_src, RESULTS / json_src.name)
            copied.append(json_src.name)
        if md_src.is_file():
            shutil.copy(md_src, RESULTS / md_src.name)
            copied.append(md_src.name)
        elif name in markdown:
            (RESULTS / md_src.name).write_text(markdown[name])
            copied.append(f"{md_src.name} (from gpu_check.json)")
        else:
            continue  # no table of this result came back: its README block stays
        if update_readme(name):
            print(f"updated the results/{name}.md block of benchmarks/README.md")
    where = RESULTS.relative_to(ROOT) if RESULTS.is_relative_to(ROOT) else RESULTS
    print(f"copied {', '.join(copied) or 'nothing'} into {where}")
    return 0 if copied else 1


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_train"]:
        return worker_train(argv[1:])
    if argv[:1] == ["_bench"]:
        return worker_bench(argv[1:])
    if argv[:1] == ["collect"]:
        if len(argv) != 2:
            print("usage: gpu_check.py collect <folder with gpu_check.json>", file=sys.stderr)
            return 2
        return collect(Path(argv[1]))

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry", action="store_true", help="CPU, gloo, tiny shapes (automatic without CUDA)")
    p.add_argument("--out", default=None, help="result folder (default: $OUT, else runs/gpu_check[_dry])")
    p.add_argument("--work", default=None, help="scratch folder for runs and logs (default: a temp folder)")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES, help="a subset, in this order")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole run (gpu 560, dry 480)")
    args = p.parse_args(argv)

    import torch

    dry = args.dry or not torch.cuda.is_available()
    if not args.dry and dry:
        print("[gpu_check] torch sees no CUDA device: dry mode (CPU, gloo, tiny shapes)", flush=True)
    plan = DRY_PLAN if dry else GPU_PLAN
    out = Path(args.out or os.environ.get("OUT") or ROOT / "runs" / ("gpu_check_dry" if dry else "gpu_check"))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="dude_gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    run = Run(plan, out.resolve(), work.resolve(), args.budget or plan.budget_s)
    os.environ["DUDE_SHARED"] = str(run.shared)  # benchmarks.common reads it at import
    print(f"[gpu_check] mode {plan.name}, budget {run.budget:.0f} s, results in {run.out}, scratch in {run.work}",
          flush=True)
    ordered = [s for s in STAGES if s in args.stages]
    try:
        for name in ordered:
            run_stage(run, name)
    finally:
        write_log(run)
        run.write()
    data = run.summary()
    verdict = "PASS" if data["passed"] else "FAIL"
    print(f"[gpu_check] {verdict}: {sum(s.status == 'pass' for s in run.stages.values())}/{len(ordered)} stages "
          f"passed in {data['seconds']:.0f} s on {run.device_name}; see {run.out / 'gpu_check.md'}", flush=True)
    return 0 if data["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
