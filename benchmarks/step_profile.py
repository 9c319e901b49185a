"""Where a training step's time goes: dude_dist vs HF Trainer + PEFT, sampled with py-spy.

    python benchmarks/step_profile.py                    # llama-h512-l4, 2 CPU ranks, dude_dist vs peft_lora (~2 min)
    python benchmarks/step_profile.py --sizes stories260K llama-h512-l4 --systems dude_dist peft_lora peft_dora_pissa
    python benchmarks/step_profile.py --nproc 1 --dtype bfloat16 --sizes qwen0.5b-v32k   # a GPU

Each system runs exactly as in ``benchmarks/train.py`` (same torchrun command, model, data,
ZeRO-3 config, targets and rank) under ``py-spy record --subprocesses --idle`` at 100 Hz, so
every rank's main thread is sampled whether it computes or waits. Only samples inside the
training loop count (dude_dist: ``Trainer._run_steps``; HF: ``Trainer._run_epoch``: both hold
the batch fetch, the step, the optimizer and the per-step logging; dude_dist's checkpoint
after the last step is left out, the HF runs write none). Each sample falls in one
part of the step, by the outermost DeepSpeed engine call on its stack:

* ``forward``: ``DeepSpeedEngine.forward`` (the model and loss; with activation checkpointing
  the recompute runs under ``backward``);
* ``backward``: ``DeepSpeedEngine.backward`` (autograd, ZeRO-3's gathers and reduce-scatters);
* ``optimizer``: ``DeepSpeedEngine.step`` (the accumulation boundary: clipping, Adam, ZeRO's
  bookkeeping);
* ``trainer``: everything else: batches, loss bookkeeping, collectives the trainer issues
  itself, logging, callbacks: the work a trainer adds around the engine.

Columns that overlap those parts: ``adapter code`` (samples with a frame in ``dude_dist/dude.py``
or ``peft/tuners/lora/``: the adapted layers, their matmuls included), ``ZeRO-3 hooks`` (samples in
DeepSpeed's parameter fetch/release hooks), ``grad-norm hooks`` (dude_dist's per-layer
gradient-norm hooks, ``dude_dist/layer_grads.py``) and ``dude/* dynamics`` (the ``dude/*``
measurement of the steps that log it, ``dude_dist/dynamics.py``).
The largest self frames of the ``trainer`` part are listed under the table. Results:
``benchmarks/results/step_profile.{json,md}`` (``--name`` for another stem); the raw py-spy
stacks stay in the work folder.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ROOT, STORIES, proc_env, write_results  # noqa: E402
from benchmarks.train import (  # noqa: E402
    ALL_TARGETS,
    SIZES,
    SYSTEMS,
    TARGETS,
    build_llama_h512,
    build_qwen_shape,
    dude_cmd,
    hf_cmd,
)

WINDOW = {"dude_dist": "Trainer._run_steps (dude_dist/trainer.py)",
          "hf": "Trainer._run_epoch (transformers/trainer.py)"}
# inside the loop but not part of a step: dude_dist's checkpoint at the end (the HF runs save none)
EXCLUDE = ("Trainer.save (dude_dist/trainer.py)",)
PARTS = (("optimizer", "DeepSpeedEngine.step (deepspeed/runtime/engine.py)"),
         ("backward", "DeepSpeedEngine.backward (deepspeed/runtime/engine.py)"),
         ("forward", "DeepSpeedEngine.forward (deepspeed/runtime/engine.py)"))
OVERLAPS = {
    "adapter code": ("dude_dist/dude.py", "peft/tuners/lora/"),
    "ZeRO-3 hooks": ("zero/parameter_offload.py", "zero/partitioned_param_coordinator.py"),
    "grad-norm hooks": ("dude_dist/layer_grads.py",),
    "dude/* dynamics": ("dude_dist/dynamics.py",),
}
_LINE = re.compile(r":\d+\)$")


def frame_name(frame: str) -> str:
    """``func (file:line)`` without the line number."""
    return _LINE.sub(")", frame)


def classify(raw: str, window: str) -> dict:
    """Shares of the step's parts in py-spy's raw (collapsed) output ``raw``, counting only
    stacks that pass through ``window``."""
    parts: collections.Counter = collections.Counter()
    overlaps: collections.Counter = collections.Counter()
    trainer_self: collections.Counter = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [frame_name(f) for f in stack.split(";")]
        if window not in frames or any(f in EXCLUDE for f in frames):
            continue
        n = int(count)
        total += n
        inside = frames[frames.index(window):]
        part = next((name for name, marker in PARTS if marker in inside), "trainer")
        parts[part] += n
        if part == "trainer":
            trainer_self[inside[-1]] += n
        for name, markers in OVERLAPS.items():
            if any(m in f for f in inside for m in markers):
                overlaps[name] += n
    share = (lambda c: c / total) if total else (lambda c: 0.0)
    return {"samples": total,
            "parts": {name: share(parts[name]) for name, _ in PARTS[::-1]} | {"trainer": share(parts["trainer"])},
            "overlaps": {name: share(overlaps[name]) for name in OVERLAPS},
            "trainer_top": [(frame, share(n)) for frame, n in trainer_self.most_common(6)]}


def profile(system: str, model: Path, out: Path, steps: int, nproc: int, dtype: str, targets: tuple[str, ...],
            timeout: float, rate: int, reanalyse: bool = False) -> dict:
    """Run one system under py-spy (or, with ``reanalyse``, read the stacks an earlier run left
    in the work folder); return its classified samples and the wall time."""
    if system == "dude_dist":
        cmd, window = dude_cmd(model, out, steps, nproc, dtype, targets=targets), WINDOW["dude_dist"]
    else:
        cmd, window = hf_cmd(system.removeprefix("peft_"), model, out, steps, nproc, dtype, targets), WINDOW["hf"]
    raw = out.with_suffix(".pyspy.txt")
    if reanalyse:
        if not raw.is_file():
            raise FileNotFoundError(f"no stacks to reanalyse: {raw} is missing (run without --reanalyse first)")
        return {"system": system, "wall_seconds": None, **classify(raw.read_text(), window)}
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    full = [spy, "record", "--subprocesses", "--idle", "--rate", str(rate), "--format", "raw",
            "--output", str(raw), "--nonblocking", "--"] + cmd
    t0 = time.perf_counter()
    log = out.with_suffix(".log")
    with open(log, "w") as f:
        proc = subprocess.run(full, cwd=ROOT, env=proc_env(), stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                              check=False)
    if proc.returncode != 0 or not raw.is_file():
        tail = "\n".join(log.read_text().splitlines()[-20:])
        raise RuntimeError(f"{system} under py-spy failed ({proc.returncode}); last lines of {log}:\n{tail}")
    return {"system": system, "wall_seconds": time.perf_counter() - t0, **classify(raw.read_text(), window)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["llama-h512-l4"], choices=SIZES)
    p.add_argument("--systems", nargs="+", default=["dude_dist", "peft_lora"], choices=list(SYSTEMS))
    p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(ALL_TARGETS))
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--work-dir", default=None)
    p.add_argument("--name", default="step_profile")
    p.add_argument("--reanalyse", action="store_true",
                   help="classify the py-spy stacks already in --work-dir again instead of running")
    args = p.parse_args(argv)
    if args.reanalyse and not args.work_dir:
        p.error("--reanalyse needs the --work-dir of an earlier run")
    spy = shutil.which("py-spy") or Path(sys.executable).with_name("py-spy")
    if not args.reanalyse and not Path(spy).exists():
        print("error: py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 2
    if args.reanalyse and not Path(args.work_dir).is_dir():
        print(f"error: --work-dir {args.work_dir} is not a folder of an earlier run", file=sys.stderr)
        return 2
    try:
        return run(args)
    except (FileNotFoundError, RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; the runs so far are in the work folder, no results written", file=sys.stderr)
        return 130


def run(args: argparse.Namespace) -> int:
    import torch

    cuda = torch.cuda.is_available()
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="dude_step_profile_"))
    work.mkdir(parents=True, exist_ok=True)
    targets = tuple(args.targets)
    records, tables = {}, {}
    for size in args.sizes:
        model = (STORIES if size == "stories260K" or args.reanalyse else build_qwen_shape(work / size)
                 if size == "qwen0.5b-v32k" else build_llama_h512(work / size))
        rows, records[size] = [], []
        for system in args.systems:
            out = work / f"{size}-{system}"
            if not args.reanalyse:
                shutil.rmtree(out, ignore_errors=True)
            rec = profile(system, model, out, args.steps, args.nproc, args.dtype, targets, args.timeout, args.rate,
                          args.reanalyse)
            records[size].append(rec)
            print(f"{size} {system}: {rec['samples']} samples in the loop, parts "
                  + ", ".join(f"{k} {v:.1%}" for k, v in rec["parts"].items()), flush=True)
            rows.append([system, rec["samples"], *(100 * v for v in rec["parts"].values()),
                         *(100 * v for v in rec["overlaps"].values())])
        tables[f"{size}: share of the training loop's samples, % (every rank's main thread, {args.steps} steps)"] = (
            ["system", "samples", *(f"{k} %" for k in records[size][0]["parts"]),
             *(f"{k} %" for k in OVERLAPS)], rows)
        top = [[rec["system"], frame, 100 * share] for rec in records[size] for frame, share in rec["trainer_top"]]
        tables[f"{size}: largest self frames of the trainer part, % of the loop"] = (["system", "frame", "%"], top)
    notes = [
        f"{args.nproc} rank(s) (torchrun), {'1 GPU' if cuda else '1 thread'} each, DeepSpeed ZeRO-3, {args.dtype}, "
        f"rank 4 on {'+'.join(targets)}, global batch 4 (micro 2), max_seq_len 256, activation checkpointing: "
        "the configuration of benchmarks/train.py.",
        "py-spy record --subprocesses --idle at "
        f"{args.rate} Hz; the loop is Trainer._run_steps (dude_dist) or Trainer._run_epoch (HF); parts by the "
        "outermost DeepSpeedEngine forward/backward/step call on the stack, 'trainer' is the rest; dude_dist's "
        "checkpoint after the last step is left out (the HF runs write none). The last four columns overlap the "
        "parts.",
        "With CUDA, a frame that waits for the device holds the samples of the kernels it waits for.",
    ]
    write_results(args.name, title="Where a training step's time goes (py-spy)",
                  settings={**vars(args), "work_dir": str(work)}, tables=tables, records=records, notes=notes,
                  device="cuda" if cuda else "cpu")
    return 0


if __name__ == "__main__":
    sys.exit(main())
