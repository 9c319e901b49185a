"""End-to-end training throughput on 2 CPU ranks: dude_dist vs HF Trainer + PEFT (DoRA+PiSSA, LoRA).

    python benchmarks/train.py                          # both model sizes, one run each (~5 min, 2 idle cores)
    python benchmarks/train.py --repeats 3              # medians of 3 rounds (a shared machine)
    python benchmarks/train.py --sizes stories260K      # the real tiny model only (~2 min)
    python benchmarks/train.py --packing                # dude_dist packed vs padded at max_seq_len 1024 (~12 min)

Three systems, each launched with ``torchrun --nproc_per_node 2`` (one thread per rank),
DeepSpeed ZeRO-3 with the same config (``dude_dist.zero.build_ds_config`` of the same run
config), fp32, the same GSM8K samples in the same order (max_seq_len 256, first 512
records), global batch 4 = micro 2 x 2 ranks, non-reentrant gradient checkpointing,
targets q_proj + v_proj at rank 4:

* ``dude_dist``: ``launch/train.py --config configs/tiny_cpu.yaml --set ...`` (through
  ``benchmarks/_dude_train.py``, which only adds a stopwatch around model loading);
* ``peft_dora_pissa``: HF ``Trainer`` + PEFT ``use_dora=True, init_lora_weights="pissa_niter_4"``;
* ``peft_lora``: HF ``Trainer`` + PEFT LoRA (``benchmarks/_hf_peft_baseline.py`` for both).

Model sizes: ``stories260K`` is the real pretrained 260K-parameter Llama (hidden 64, 5
layers) where per-step overheads dominate; ``llama-h512-l4`` is a random-weight Llama
(hidden 512, 4 layers, 8 heads, MLP 1376, the stories tokenizer) saved to a temp folder,
big enough that the layers' cost shows; ``qwen0.5b-v32k`` is a random-weight model of
Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads, 2 KV heads, MLP 4864, q/k/v bias,
tied embeddings) with the vocabulary cut to 32768 (the stories tokenizer uses ids < 512),
for a GPU. ``--nproc`` and ``--dtype`` set the ranks and the precision (a GPU run:
``--nproc 1 --dtype bfloat16 --sizes qwen0.5b-v32k``; NCCL whenever CUDA is present).

``--packing`` compares dude_dist with itself on GSM8K at ``max_seq_len`` 1024 (same 2 ranks,
ZeRO-3, fp32, rank 4, checkpointing): ``padded`` (micro-batches of 2 random samples padded
to the longer), ``grouped`` (the same with ``data.group_by_length``) and ``packed``
(``data.packing``: micro-batches of 2 rows of up to 1024 tokens, each holding whole samples
that attend only to themselves). Every mode has micro-batches of at most 2 x 1024 tokens
(the activation memory a run at that ``max_seq_len`` must plan for) and a global batch of
4 (samples, or rows); it reports real tokens/s, the padding ratio, the packing fill ratio
and the loss curves side by side.

Measured: tokens/s in steady state (sum of non-padding tokens over the steps after the
first ``--skip``, divided by the sum of their step seconds), start-up and init seconds,
and peak resident memory of the rank processes (psutil, sampled every 50 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    GSM8K_TRAIN,
    ROOT,
    STORIES,
    copy_tokenizer,
    mib,
    proc_env,
    torchrun_cmd,
    wait_for_quiet,
    write_results,
)

SYSTEMS = ("dude_dist", "peft_dora_pissa", "peft_lora")
SIZES = ("stories260K", "llama-h512-l4", "qwen0.5b-v32k")
RANK = 4
TARGETS = ("q_proj", "v_proj")
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_llama_h512(folder: Path) -> Path:
    """A random-weight Llama (hidden 512, 4 layers) with the stories tokenizer (reused if present)."""
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=512, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    copy_tokenizer(folder)
    return folder


def build_qwen_shape(folder: Path, *, layers: int = 24, vocab: int = 32768, hidden: int = 896, heads: int = 14,
                     kv_heads: int = 2, intermediate: int = 4864) -> Path:
    """A random-weight Qwen2 model (Qwen2.5-0.5B's shape by default, vocabulary cut to ``vocab``),
    saved in bfloat16 with the stories tokenizer (reused if present)."""
    if (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file():
        return folder
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                      max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)
    copy_tokenizer(folder)
    return folder


class RssSampler:
    """Peak resident memory of a launcher's direct children (the ranks), sampled in a thread.

    Grandchildren are left out: a rank that forks (to run a helper program) shows a child
    whose RSS counts the parent's pages again for as long as it lives.
    """

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_sum = 0
        self.peak_each: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            try:
                children = self.root.children(recursive=False)
            except psutil.Error:
                break
            for child in children:
                try:
                    rss = child.memory_info().rss
                except psutil.Error:
                    continue
                total += rss
                self.peak_each[child.pid] = max(self.peak_each.get(child.pid, 0), rss)
            self.peak_sum = max(self.peak_sum, total)
            self._stop.wait(self.interval)

    def stop(self) -> tuple[int, int]:
        """(peak of the sum over ranks, peak of the largest rank)."""
        self._stop.set()
        self._thread.join()
        return self.peak_sum, max(self.peak_each.values(), default=0)


def launch(cmd: list[str], log: Path, timeout: float, env: dict[str, str] | None = None) -> tuple[float, int, int]:
    """Run a torchrun command; return (wall seconds, peak RSS sum, peak RSS of one rank).

    The command runs in its own process group: an interrupt or a timeout here ends the
    ranks too, not only the launcher.
    """
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env or proc_env(), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        sampler = RssSampler(proc.pid)
        try:
            rc = proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
            peak_sum, peak_one = sampler.stop()
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({rc}); last lines of {log}:\n"
                           + "\n".join(log.read_text().splitlines()[-30:]))
    return time.perf_counter() - t0, peak_sum, peak_one


def dude_cmd(model: Path, out: Path, steps: int, nproc: int = 2, dtype: str = "float32",
             extra: tuple[str, ...] = (), targets: tuple[str, ...] = TARGETS) -> list[str]:
    """The torchrun command of a dude_dist run (``launch/train.py`` through ``_dude_train.py``)."""
    overrides = [f"output_dir={out}", f"model.name_or_path={model}", f"train.max_steps={steps}",
                 "train.save_every=0", "data.eval_size=0", f"adapter.rank={RANK}", f"model.dtype={dtype}",
                 f"data.sources=[{GSM8K_TRAIN}]", f"adapter.targets=[{','.join(targets)}]", *extra]
    cmd = torchrun_cmd(nproc) + [str(ROOT / "benchmarks" / "_dude_train.py"), "--config", "configs/tiny_cpu.yaml",
                                 "--resume", "none"]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def hf_cmd(method: str, model: Path, out: Path, steps: int, nproc: int = 2, dtype: str = "float32",
           targets: tuple[str, ...] = TARGETS) -> list[str]:
    """The torchrun command of an HF Trainer + PEFT run (``method``: dora_pissa or lora)."""
    return torchrun_cmd(nproc) + [str(ROOT / "benchmarks" / "_hf_peft_baseline.py"), "--method", method,
                                  "--model", str(model), "--out", str(out), "--steps", str(steps), "--rank", str(RANK),
                                  "--data", str(GSM8K_TRAIN), "--dtype", dtype, "--targets", *targets]


def run_dude(model: Path, out: Path, steps: int, timeout: float, nproc: int = 2, dtype: str = "float32",
             extra: tuple[str, ...] = (), targets: tuple[str, ...] = TARGETS) -> dict:
    cmd = dude_cmd(model, out, steps, nproc, dtype, extra, targets)
    wall, peak_sum, peak_one = launch(cmd, out.with_suffix(".log"), timeout)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps_rows = [r for r in rows if "train/step_time_s" in r]
    summary = json.loads((out / "summary.json").read_text())
    timing = json.loads((out / "bench_timing.json").read_text())
    cpu = [json.loads((out / f"bench_cpu_rank{k}.json").read_text()) for k in range(nproc)]
    return {
        "step_seconds": [r["train/step_time_s"] for r in steps_rows],
        "step_cpu_seconds_per_rank": cpu,
        "tokens_per_step": [round(r["train/tokens_per_s"] * r["train/step_time_s"]) for r in steps_rows],
        "padding_ratio": [r.get("train/padding_ratio") for r in steps_rows],
        "losses": summary["losses"], "load_seconds": timing["load_seconds"],
        "adapter_init_seconds": timing["inject_and_init_seconds"], "init_wall_seconds": summary["init"]["wall_seconds"],
        "startup_seconds": summary["startup_seconds"], "trainable_params": summary["init"]["trainable_params"],
        "wall_seconds": wall, "peak_rss_sum": peak_sum, "peak_rss_rank": peak_one,
    }


def run_hf(method: str, model: Path, out: Path, steps: int, timeout: float, nproc: int = 2,
           dtype: str = "float32", targets: tuple[str, ...] = TARGETS) -> dict:
    cmd = hf_cmd(method, model, out, steps, nproc, dtype, targets)
    wall, peak_sum, peak_one = launch(cmd, out.with_suffix(".log"), timeout)
    rec = json.loads((out / "hf_result.json").read_text())
    rec.pop("ds_config", None)
    return {**rec, "wall_seconds": wall, "peak_rss_sum": peak_sum, "peak_rss_rank": peak_one}


def steady(rec: dict, skip: int) -> tuple[float, float, float]:
    """Over the steps after ``skip``: (tokens per wall second, median step seconds,
    tokens per CPU second of the busier rank, step by step)."""
    secs, toks = rec["step_seconds"][skip:], rec["tokens_per_step"][skip:]
    cpu = [max(ranks) for ranks in zip(*rec["step_cpu_seconds_per_rank"])][skip:]
    return sum(toks) / sum(secs), statistics.median(secs), sum(toks) / sum(cpu)


PACKING_MODES = {
    "padded": (),
    "grouped": ("data.group_by_length=true",),
    "packed": ("data.packing=true",),
}
PACKING_SEQ_LEN = 1024


def fill_ratio(seed: int = 0) -> float:
    """Real tokens over ``rows * max_seq_len`` of the packed training set the runs use."""
    from transformers import AutoTokenizer

    from dude_dist.config_loader import load_config
    from dude_dist.data import build_datasets

    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml", [f"data.sources=[{GSM8K_TRAIN}]", "data.packing=true",
                                                          f"data.max_seq_len={PACKING_SEQ_LEN}", "data.eval_size=0"])
    return build_datasets(cfg.data, AutoTokenizer.from_pretrained(STORIES), seed=seed).stats["fill"]


def ranks_text(nproc: int) -> str:
    return f"{nproc} rank{'s' if nproc != 1 else ''}"


def setting_text(args: argparse.Namespace, cuda: bool) -> str:
    """How every run of a results file ran: ranks, device per rank, backend, ZeRO-3, dtype."""
    return (f"{ranks_text(args.nproc)} (torchrun), {'1 GPU' if cuda else '1 thread'} each, "
            f"{'nccl' if cuda else 'gloo'}, DeepSpeed ZeRO-3, {'fp32' if args.dtype == 'float32' else args.dtype}")


def results_title(what: str, args: argparse.Namespace, cuda: bool, detail: str = "") -> str:
    """``<what>, <N> CPU|GPU rank(s), ZeRO-3<detail>`` and the dtype unless fp32."""
    title = f"{what}, {args.nproc} {'GPU' if cuda else 'CPU'} {ranks_text(args.nproc).split()[1]}, ZeRO-3{detail}"
    return title + (f", {args.dtype}" if args.dtype != "float32" else "")


def resolve_attn(name: str, cuda: bool, dtype: str) -> str:
    """``--attn``: ``auto`` is ``flash_attention_2`` where it can run (a CUDA GPU, the
    ``flash_attn`` package and a 16-bit model), ``sdpa`` otherwise; a named implementation
    that cannot run here is refused with dude_dist's own reason."""
    from dude_dist.config import attn_implementation_problem

    if name == "auto":
        flash = dtype != "float32" and attn_implementation_problem("flash_attention_2", cuda=cuda) is None
        return "flash_attention_2" if flash else "sdpa"
    problem = attn_implementation_problem(name, cuda=cuda)
    if problem:
        raise SystemExit(f"benchmarks/train.py: --attn {name}: {problem}")
    return name


def packing_main(args: argparse.Namespace, work: Path, busy_at_start: float, t_start: float, cuda: bool) -> int:
    """Packed vs padded (and length-grouped) dude_dist runs, side by side."""
    attn = resolve_attn(args.attn, cuda, args.dtype)
    common = (f"data.max_seq_len={PACKING_SEQ_LEN}", "train.micro_batch_size=2", "train.global_batch_size=4",
              "train.seed=0", f"model.attn_implementation={attn}")
    fill = fill_ratio(seed=0)
    records: dict[str, dict[str, list[dict]]] = {}
    tables = {}
    for size in args.sizes:
        if size == "stories260K":
            model, skip = STORIES, args.skip
        elif size == "qwen0.5b-v32k":
            model, skip = build_qwen_shape(work / size), args.skip_large
        else:
            model, skip = build_llama_h512(work / "llama-h512-l4"), args.skip_large
        steps = args.steps
        runs: dict[str, list[dict]] = {mode: [] for mode in args.modes}
        for r in range(args.repeats):
            order = args.modes[r % len(args.modes):] + args.modes[: r % len(args.modes)]
            for mode in order:
                out = work / f"packing-{size}-{mode}-{r}"
                shutil.rmtree(out, ignore_errors=True)
                busy = wait_for_quiet(timeout=args.wait_quiet)
                rec = run_dude(model, out, steps, args.timeout, args.nproc, args.dtype,
                               extra=common + PACKING_MODES[mode])
                rec["tokens_per_s"], rec["median_step_s"], rec["tokens_per_cpu_s"] = steady(rec, skip)
                rec["padding"] = statistics.mean(p for p in rec["padding_ratio"][skip:] if p is not None)
                rec["skip"], rec["cpu_busy_before"] = skip, busy
                runs[mode].append(rec)
                print(f"{size} {mode} run {r} (CPU {busy:.0%} busy before): {rec['tokens_per_s']:.0f} real tok/s, "
                      f"{rec['tokens_per_cpu_s']:.0f} tok/CPU-s, padding {rec['padding']:.1%}, "
                      f"loss {rec['losses'][0]:.3f} -> {rec['losses'][-1]:.3f}", flush=True)
        records[size] = runs
        med = {mode: {key: statistics.median(run[key] for run in recs)
                      for key in ("tokens_per_s", "tokens_per_cpu_s", "median_step_s", "padding")}
               for mode, recs in runs.items()}
        base = med.get("padded")
        rows = []
        for mode, m in med.items():
            first = runs[mode][0]
            rows.append([mode, m["tokens_per_s"], m["tokens_per_s"] / base["tokens_per_s"] if base else None,
                         m["tokens_per_cpu_s"], m["tokens_per_cpu_s"] / base["tokens_per_cpu_s"] if base else None,
                         m["padding"], fill if mode == "packed" else None, m["median_step_s"] * 1e3,
                         statistics.median(first["tokens_per_step"][skip:]), first["losses"][0], first["losses"][-1]])
        tables[f"{size}: {steps} steps, real tokens/s over steps {skip + 1}-{steps}, median of {args.repeats} run(s)"] = (
            ["mode", "real tokens/s", "× padded", "real tokens/CPU-s", "× padded (CPU)", "padding ratio",
             "fill ratio", "median step ms", "real tokens / step", "loss step 1", f"loss step {steps}"], rows)
        curves = [[step + 1] + [runs[mode][0]["losses"][step] for mode in args.modes] for step in range(steps)]
        tables[f"{size}: training loss per step (mean over the labelled tokens of each global batch)"] = (
            ["step"] + list(args.modes), curves)
    notes = [
        "Goal: packed ≥ 1.5× padded real tokens/s.",
        f"{setting_text(args, cuda)}, rank {RANK} on q_proj+v_proj, non-reentrant activation checkpointing, "
        f"{attn} attention, GSM8K train (first 512 records), max_seq_len "
        f"{PACKING_SEQ_LEN}; micro-batch 2 and global batch 4 in every mode (samples when padded, rows when packed).",
        "real tokens = non-padding tokens (train/tokens_per_s); padding ratio = padding over the token slots the "
        "model ran on (train/padding_ratio, steady steps); fill ratio = real tokens over rows x max_seq_len of the "
        "whole packed set (best-fit decreasing). tokens/CPU-s: the same tokens over the busier rank's process CPU "
        "seconds per step (steadier than wall time on a shared machine).",
        "A packed step holds ~2.8x the samples of a padded step, so its loss curve averages more tokens per step; "
        "the loss is the mean over the labelled tokens of the global batch in every mode, and a packed row gives "
        "the loss and gradients of its samples padded (tests/unit/test_packing.py).",
        "stories260K: real pretrained weights; llama-h512-l4: random weights (same tokenizer), for layer cost.",
    ]
    write_results(args.name, title=results_title("Packed vs padded training", args, cuda,
                                                 f", max_seq_len {PACKING_SEQ_LEN}"),
                  settings={**vars(args), "cpu_busy_at_start": busy_at_start, "rank": RANK, "work_dir": str(work),
                            "fill_ratio": fill, "attn_implementation": attn,
                            "seconds_total": time.perf_counter() - t_start},
                  tables=tables, records=records, notes=notes, device="cuda" if cuda else "cpu")
    return 0


def main(argv=None) -> int:
    from dude_dist.config import ATTN_IMPLEMENTATIONS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["stories260K", "llama-h512-l4"], choices=SIZES)
    p.add_argument("--steps", type=int, default=20, help="optimizer steps for stories260K (every size with --packing)")
    p.add_argument("--steps-large", type=int, default=12, help="optimizer steps for llama-h512-l4 and qwen0.5b-v32k")
    p.add_argument("--skip", type=int, default=5, help="first steps left out of tokens/s (stories260K)")
    p.add_argument("--skip-large", type=int, default=3, help="first steps left out of tokens/s (the larger sizes)")
    p.add_argument("--nproc", type=int, default=2, help="ranks per system (GPUs when CUDA is present)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--repeats", type=int, default=1,
                   help="runs per system, in rounds with a rotating order; the table gives medians")
    p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(ALL_TARGETS),
                   help="projections adapted in every system (default q_proj v_proj)")
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    p.add_argument("--work-dir", default=None, help="run folders (default: a temp dir)")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--name", default=None, help="results file stem (default: train, or train_packing)")
    p.add_argument("--packing", action="store_true",
                   help="compare dude_dist packed vs padded (and length-grouped) at max_seq_len 1024 instead")
    p.add_argument("--modes", nargs="+", default=list(PACKING_MODES), choices=list(PACKING_MODES),
                   help="with --packing: the modes to run")
    p.add_argument("--attn", default="sdpa", choices=("auto", *ATTN_IMPLEMENTATIONS),
                   help="with --packing: model.attn_implementation of every mode (auto: flash_attention_2 where it "
                        "can run, else sdpa)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="wait up to this long for an idle CPU before timing (and before each launch)")
    args = p.parse_args(argv)
    args.name = args.name or ("train_packing" if args.packing else "train")
    busy_at_start = wait_for_quiet(timeout=args.wait_quiet)
    import torch

    cuda = torch.cuda.is_available()
    ranks = ranks_text(args.nproc)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="dude_bench_train_"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    if args.packing:
        return packing_main(args, work, busy_at_start, t_start, cuda)

    targets = tuple(args.targets)
    records: dict[str, dict[str, list[dict]]] = {}
    tables = {}
    for size in args.sizes:
        if size == "stories260K":
            model, steps, skip = STORIES, args.steps, args.skip
        elif size == "qwen0.5b-v32k":
            model, steps, skip = build_qwen_shape(work / size), args.steps_large, args.skip_large
        else:
            model, steps, skip = build_llama_h512(work / "llama-h512-l4"), args.steps_large, args.skip_large
        runs: dict[str, list[dict]] = {system: [] for system in args.systems}
        for r in range(args.repeats):  # rounds; the order of the systems rotates so load hits them alike
            order = args.systems[r % len(args.systems):] + args.systems[: r % len(args.systems)]
            for system in order:
                out = work / f"{size}-{system}-{r}"
                shutil.rmtree(out, ignore_errors=True)
                busy = wait_for_quiet(timeout=args.wait_quiet)
                if system == "dude_dist":
                    rec = run_dude(model, out, steps, args.timeout, args.nproc, args.dtype, targets=targets)
                else:
                    rec = run_hf(system.removeprefix("peft_"), model, out, steps, args.timeout, args.nproc, args.dtype,
                                 targets=targets)
                rec["tokens_per_s"], rec["median_step_s"], rec["tokens_per_cpu_s"] = steady(rec, skip)
                rec["skip"] = skip
                rec["cpu_busy_before"] = busy
                runs[system].append(rec)
                print(f"{size} {system} run {r} (CPU {busy:.0%} busy before): {rec['tokens_per_s']:.0f} tok/s, "
                      f"{rec['tokens_per_cpu_s']:.0f} tok/CPU-s (steps {skip + 1}-{steps}), "
                      f"start-up {rec['startup_seconds']:.1f}s, peak RSS {mib(rec['peak_rss_sum']):.0f} MiB", flush=True)
        records[size] = runs
        med = {system: {key: statistics.median(run[key] for run in recs)
                        for key in ("tokens_per_s", "tokens_per_cpu_s", "median_step_s", "load_seconds",
                                    "adapter_init_seconds", "startup_seconds", "peak_rss_rank", "peak_rss_sum")}
               for system, recs in runs.items()}
        same = len({tuple(run["tokens_per_step"]) for recs in runs.values() for run in recs}) == 1
        rows = []
        for system, m in med.items():
            dora, lora = med.get("peft_dora_pissa"), med.get("peft_lora")
            tps = [run["tokens_per_s"] for run in runs[system]]
            rows.append([system, m["tokens_per_s"], f"{min(tps):.0f}–{max(tps):.0f}",
                         m["tokens_per_s"] / dora["tokens_per_s"] if dora else None,
                         m["tokens_per_s"] / lora["tokens_per_s"] if lora else None, m["median_step_s"] * 1e3,
                         m["tokens_per_cpu_s"], m["tokens_per_cpu_s"] / dora["tokens_per_cpu_s"] if dora else None,
                         m["tokens_per_cpu_s"] / lora["tokens_per_cpu_s"] if lora else None,
                         m["load_seconds"], m["adapter_init_seconds"], m["startup_seconds"],
                         mib(m["peak_rss_rank"]), mib(m["peak_rss_sum"]), runs[system][0]["losses"][0],
                         runs[system][0]["losses"][-1]])
        tables[f"{size}: {steps} steps, tokens/s over steps {skip + 1}-{steps}, median of {args.repeats} run(s); "
               f"same tokens per step in every system: {'yes' if same else 'NO'}"] = (
            ["system", "tokens/s", "range", "× peft_dora_pissa", "× peft_lora", "median step ms", "tokens/CPU-s",
             "× peft_dora_pissa (CPU)", "× peft_lora (CPU)", "model load s",
             "adapter init s", "start-up s", "peak RSS / rank MiB", f"peak RSS {ranks} MiB", "loss step 1",
             "loss last"], rows)
    notes = [
        "Goals: dude_dist ≥ 1.3× peft_dora_pissa tokens/s and ≥ 1.0× peft_lora tokens/s.",
        f"{setting_text(args, cuda)}, global batch 4 (micro 2), max_seq_len 256, "
        f"rank {RANK} on {'+'.join(targets)}, non-reentrant gradient checkpointing, GSM8K train (first 512 records).",
        "tokens = non-padding tokens of the global batch. Step seconds: dude_dist's train/step_time_s (metrics.jsonl); "
        "HF: time between consecutive on_step_end callbacks (includes fetching the batch). tokens/CPU-s: the same "
        "tokens over the per-step maximum across ranks of process CPU seconds (steadier than wall time when other "
        "processes share the cores; blocking waits in collectives are not counted).",
        "model load: from_pretrained under zero.Init; adapter init: dude_dist inject_and_init (SVD + broadcast), "
        "PEFT get_peft_model (PiSSA's SVD for dora_pissa); start-up: dude_dist summary.json startup_seconds "
        "(tokenizer+data+model+init+engine), HF: from tokenizer load to on_train_begin (DeepSpeed engine built).",
        "Losses differ by definition: dude_dist averages over all labelled tokens of the global batch, HF Trainer "
        "over each micro-batch's tokens; step 1 is identical for the same model and adapter init.",
        "stories260K: real pretrained weights; llama-h512-l4: random weights (same tokenizer), for layer cost.",
    ]
    if "qwen0.5b-v32k" in args.sizes:
        notes.append("qwen0.5b-v32k: random weights of Qwen2.5-0.5B's shape (24 layers, hidden 896, 14/2 heads, "
                     "MLP 4864), vocabulary cut to 32768, stories tokenizer.")
    write_results(args.name, title=results_title("Training throughput", args, cuda),
                  settings={**vars(args), "cpu_busy_at_start": busy_at_start, "rank": RANK, "work_dir": str(work),
                            "seconds_total": time.perf_counter() - t_start},
                  tables=tables, records=records, notes=notes, device="cuda" if cuda else "cpu")
    return 0


if __name__ == "__main__":
    sys.exit(main())
