"""``launch/train.py`` with a memory and time record per phase (run by benchmarks/scale.py).

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 benchmarks/_scale_worker.py --config ... --set ...

The run is the entry point's own code path. Wrapped, on every rank, are model loading
(``load_model`` under ``zero.Init``), the DuDe init (``inject_and_init``), the engine
(``initialize_engine``), every optimizer step, the checkpoint save and load, and the
held-out evaluation. For each phase the rank records:

* its seconds, and its resident memory at the start and the end;
* its peak resident memory (the kernel's ``VmHWM``, reset when the phase starts by writing
  5 to ``/proc/self/clear_refs``), and the anonymous and file-backed parts at the sampled
  peak (a thread reads ``/proc/self/status`` every 10 ms);
* with CUDA, the device memory allocated at its start and end and its peak
  (``torch.cuda.max_memory_allocated``, reset when the phase starts);
* during steps, the most bytes of ZeRO-3 parameters gathered at once (partitioned
  parameters whose ``ds_status`` is ``AVAILABLE`` or ``INFLIGHT``, i.e. gathered or being
  prefetched, sampled by the same thread), the most resident memory besides them
  (``other_max``: activations, buffers, and what was resident before), the gathered bytes
  at the sampled peak, and a series of (seconds, resident, gathered) every 0.1 s.

After the engine is built it also counts what the accounting says each rank holds: the
parameter partitions, the parameters kept whole, buffers, and the optimizer's tensors.

``DUDE_SCALE_TRACE_STEP=<k>`` records, during optimizer step ``k`` (1-based), every tensor
an operator creates with at least ``DUDE_SCALE_TRACE_MIN`` elements (a
``TorchDispatchMode``): its operator, shape, dtype, and whether DeepSpeed's ZeRO-3 code is
on the Python stack (the all-gather of a weight). Everything goes to
``<output_dir>/scale_rank<k>.json``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import dude_dist.checkpoint as ckpt_module  # noqa: E402
import dude_dist.trainer as trainer_module  # noqa: E402
from benchmarks._dude_train import _output_dir  # noqa: E402
from benchmarks.common import reset_peak_rss, status_bytes  # noqa: E402
from dude_dist.evaluate import TrainingEvaluator  # noqa: E402
from launch.train import main  # noqa: E402


class Recorder:
    """Phases, a sampling thread, and the ZeRO-3 parameters to watch."""

    def __init__(self) -> None:
        self.phases: list[dict] = []
        self.current: dict | None = None
        self.params: list[torch.nn.Parameter] = []
        self.accounting: dict = {}
        self.trace: list[dict] = []
        self.load_trace: list[dict] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while True:
            st = status_bytes()
            with self._lock:  # the phase cannot end while a sample is recorded into it
                phase = self.current
                if phase is not None:
                    if st["VmRSS"] > phase["sampled_peak"]:
                        phase.update(sampled_peak=st["VmRSS"], anon_at_peak=st["RssAnon"], file_at_peak=st["RssFile"])
                    if phase["name"].startswith("step") and self.params:
                        live = gathered_bytes(self.params)
                        phase["gathered_max"] = max(phase["gathered_max"], live)
                        phase["other_max"] = max(phase["other_max"], st["VmRSS"] - live)
                        if st["VmRSS"] >= phase["sampled_peak"]:
                            phase["gathered_at_peak"] = live
                        if len(phase["series"]) < 4000 and time.perf_counter() - phase["last"] >= 0.1:
                            phase["last"] = time.perf_counter()
                            phase["series"].append((round(phase["last"] - phase["t0"], 2), st["VmRSS"], live))
            time.sleep(0.01)

    def wrap(self, name: str, fn):
        recorder = self

        def wrapper(*args, **kwargs):
            recorder.start(name(args) if callable(name) else name)
            try:
                return fn(*args, **kwargs)
            finally:
                recorder.stop()

        return wrapper

    def start(self, name: str) -> None:
        st = status_bytes()
        reset_peak_rss()
        cuda = _cuda_start()
        with self._lock:
            self.current = {"name": name, "t0": time.perf_counter(), "rss_start": st["VmRSS"],
                            "sampled_peak": st["VmRSS"], "anon_at_peak": st["RssAnon"],
                            "file_at_peak": st["RssFile"], "gathered_max": 0, "gathered_at_peak": 0,
                            "other_max": 0, "series": [], "last": 0.0, **cuda}

    def stop(self) -> None:
        st = status_bytes()
        with self._lock:
            phase, self.current = self.current, None
            phase["seconds"] = time.perf_counter() - phase.pop("t0")
            phase.pop("last")
        phase.update(rss_end=st["VmRSS"], peak=max(st["VmHWM"], phase["sampled_peak"]), **_cuda_stop())
        self.phases.append(phase)


def _cuda_start() -> dict:
    """Device memory at a phase's start (the peak counter is reset), when CUDA is in use."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return {"cuda_start": torch.cuda.memory_allocated()}


def _cuda_stop() -> dict:
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    torch.cuda.synchronize()
    return {"cuda_end": torch.cuda.memory_allocated(), "cuda_peak": torch.cuda.max_memory_allocated()}


def gathered_bytes(params: list[torch.nn.Parameter]) -> int:
    """Bytes of partitioned ZeRO-3 parameters whose full value is present or being gathered now."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    total = 0
    live = (ZeroParamStatus.AVAILABLE, ZeroParamStatus.INFLIGHT)
    for p in params:
        if getattr(p, "ds_status", None) in live and not getattr(p, "ds_persist", False):
            total += p.ds_numel * p.element_size()
    return total


def count_holdings(engine) -> dict:
    """What this rank holds by the accounting (bytes), after the engine is built."""
    model = engine.module
    params = list(model.parameters())
    partition = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in params
                    if hasattr(p, "ds_tensor") and not getattr(p, "ds_persist", False))
    whole = sum(p.ds_numel * p.element_size() for p in params if getattr(p, "ds_persist", False))
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    zero = engine.optimizer  # DeepSpeed's stage-3 optimizer: fp32 masters, fp32 gradient partitions, Adam
    seen, optimizer = set(), 0
    tensors = list(getattr(zero, "fp32_partitioned_groups_flat", []))
    grads = getattr(zero, "grad_partitions_flat_buffer", None)
    tensors += [grads] if grads is not None else []
    inner = getattr(zero, "optimizer", zero)
    tensors += [t for state in inner.state.values() for t in state.values() if torch.is_tensor(t) and t.dim() > 0]
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            optimizer += t.untyped_storage().nbytes()
    return {"param_partition": partition, "params_whole": whole, "buffers": buffers, "optimizer_tensors": optimizer,
            "trainable_elements": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                                      for p in params if p.requires_grad)}


class LargeTensors(TorchDispatchMode):
    """Record every operator output with at least ``min_numel`` elements."""

    def __init__(self, min_numel: int, out: list[dict]) -> None:
        super().__init__()
        self.min_numel, self.out = min_numel, out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        outputs = result if isinstance(result, (tuple, list)) else (result,)
        for t in outputs:
            if isinstance(t, torch.Tensor) and t.numel() >= self.min_numel:
                stack = traceback.extract_stack()
                files = [f.filename for f in stack]
                where = next((f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(stack)
                              if "/dude_dist/" in f.filename or "/transformers/" in f.filename), "")
                self.out.append({"op": str(func), "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                                 "zero3": any("deepspeed/runtime/zero" in f for f in files), "where": where})
        return result


def _traced(fn):
    def wrapper(*args, **kwargs):
        with LargeTensors(TRACE_MIN, REC.load_trace):
            return fn(*args, **kwargs)

    return wrapper


REC = Recorder()
TRACE_STEP = int(os.environ.get("DUDE_SCALE_TRACE_STEP", "0"))
TRACE_MIN = int(os.environ.get("DUDE_SCALE_TRACE_MIN", str(1 << 62)))


def _engine(fn):
    def wrapper(model, *args, **kwargs):
        engine = fn(model, *args, **kwargs)
        REC.params = [p for p in engine.module.parameters() if hasattr(p, "ds_status")]
        REC.accounting = count_holdings(engine)
        return engine

    return wrapper


def _step(fn):
    def wrapper(self, step, *args, **kwargs):
        if step + 1 != TRACE_STEP:
            result = fn(self, step, *args, **kwargs)
        else:
            with LargeTensors(TRACE_MIN, REC.trace):
                result = fn(self, step, *args, **kwargs)
        if "after_step" not in REC.accounting:  # Adam's moments exist from the first step on
            REC.accounting["after_step"] = count_holdings(self.engine)
        return result

    return wrapper


if __name__ == "__main__":
    REC.start("startup")
    load = _traced(trainer_module.load_model) if os.environ.get("DUDE_SCALE_TRACE_LOAD") else trainer_module.load_model
    trainer_module.load_model = REC.wrap("load", load)
    trainer_module.inject_and_init = REC.wrap("init", trainer_module.inject_and_init)
    trainer_module.initialize_engine = REC.wrap("engine", _engine(trainer_module.initialize_engine))
    trainer_module.Trainer.step = REC.wrap(lambda a: f"step{a[1] + 1}", _step(trainer_module.Trainer.step))
    ckpt_module.save_checkpoint = REC.wrap("save", ckpt_module.save_checkpoint)
    trainer_module.ckpt_lib.load_checkpoint = REC.wrap("resume_load", ckpt_module.load_checkpoint)
    TrainingEvaluator.at_start = REC.wrap("eval_start", TrainingEvaluator.at_start)
    TrainingEvaluator.at_end = REC.wrap("eval_end", TrainingEvaluator.at_end)
    first = REC.current
    REC.stop()  # the "startup" phase so far: imports; the real start is below
    first_rss = first["rss_end"]
    rc = main()
    out = _output_dir(sys.argv[1:])
    rank = os.environ.get("RANK", "0")
    record = {"rank": int(rank), "rss_after_imports": first_rss, "phases": REC.phases,
              "accounting": REC.accounting, "trace": REC.trace, "load_trace": REC.load_trace, "trace_step": TRACE_STEP, "trace_min": TRACE_MIN}
    if out.is_dir():
        (out / f"scale_rank{rank}.json").write_text(json.dumps(record))
    from dude_dist.cli import exit_process

    exit_process(rc)
