"""Scale rehearsal: the whole pipeline at the real layer shapes of Llama-2-70B and Qwen2.5-32B,
and the planner held to what it measures.

    python benchmarks/scale.py                 # both slices, sweeps, plots (~60 min on 2 idle cores)
    python benchmarks/scale.py --ci            # one 8192-wide layer, MLP and vocabulary cut (~1.5 min)
    python benchmarks/scale.py --archs llama70b --no-sweeps

**Slices.** Each model's ``config.json`` facts (``configs/models/``) with
``num_hidden_layers`` cut to 1: the real hidden size, heads, KV heads, MLP width, RoPE,
norms and biases. Llama-2-70B keeps its real 32000-token vocabulary; Qwen2.5-32B's 152064
is cut to 32000 (the same tokenizer serves both: the stories260K one, ids < 512; the full
vocabulary would make every step mostly the LM head, which is not the layer being
rehearsed). Random bf16 weights are saved as safetensors shards of at most 1 GB and loaded
by the trainer's own ``from_pretrained`` under ``zero.Init``.

**Runs** (2 CPU ranks, gloo, ZeRO-3 with the config's ``stage3_param_persistence_threshold``
(100000: every weight is partitioned), bf16, rank 16, randomized SVD, activation
checkpointing, packed GSM8K rows of ``max_seq_len`` tokens, micro-batch 1, global batch 2):

1. ``train``: q,v targets, sharded init, 5 steps at 512 tokens (from step 2-3 on ZeRO-3
   prefetches by its traced module order: the steady state), a checkpoint at step 5, the
   held-out loss before and after (4 samples). Step 1 runs under a memory trace: every
   operator output with at least as many elements as the smallest target weight.
2. ``resume``: the same folder to step 6, from the step-5 checkpoint.
3. ``export``: ``launch/export.py`` of the newest checkpoint on 2 ranks (merged bf16 model).
4. ``tiny``: q,v with 32-token rows of short records, 4 steps: the step's memory with
   almost no activations.
5. ``activations``: one training step of the slice in one process without ZeRO-3, all
   weights already resident (32 to 1024 tokens).
6. ``all7``: all seven projections as targets, init and 1 step.
7. ``seq256`` / ``seq1024`` (llama70b only): step time against sequence length.

Every rank runs ``benchmarks/_scale_worker.py`` (the entry point plus a record of each
phase: seconds, resident memory, its peak from the kernel's ``VmHWM``, the most ZeRO-3
bytes gathered at once). The planner (:func:`dude_dist.planner.plan_run`) is run for the
same slice, world size and config; every memory item is compared with what was measured.
Per-shape init seconds are timed in this process (one thread, as each rank has) and
compared with the planner's per-layer estimate. ``--gpu`` runs the slices as one rank on
the machine's GPU, with device memory per phase (``benchmarks/gpu_scale.sh``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import GSM8K_TRAIN, RESULTS, ROOT, copy_tokenizer, write_results  # noqa: E402

ARCHS = {
    "llama70b": {"facts": "meta-llama--Llama-2-70b-hf.json", "vocab": None},
    "qwen32b": {"facts": "Qwen--Qwen2.5-32B.json", "vocab": 32000},
}
QV = ["q_proj", "v_proj"]
NPROC = 2  # ranks per run; --gpu runs one rank on the one GPU
TRAIN_STEPS = 5  # from step 3 on ZeRO-3 prefetches by the module order it traced: the steady state
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GIB = 2**30
# glibc serves allocations from this size up with their own mappings, returned to the system
# when freed (by default the limit floats up to 32 MiB and freed activations stay resident):
# resident memory then follows the live tensors, as a GPU's allocated bytes do.
MMAP_THRESHOLD = 4 << 20


# --------------------------------------------------------------------------- slices


def slice_facts(arch: str, layers: int = 1, vocab: int | None = None, intermediate: int | None = None) -> dict:
    """The model's ``config.json`` facts with ``layers`` decoder layers (and optional cuts)."""
    from dude_dist.planner import DEFAULT_MODELS_DIR, load_model_facts

    facts = load_model_facts(DEFAULT_MODELS_DIR / ARCHS[arch]["facts"])
    facts["num_hidden_layers"] = layers
    vocab = vocab or ARCHS[arch]["vocab"]
    if vocab:
        facts["vocab_size"] = vocab
    if intermediate:
        facts["intermediate_size"] = intermediate
    if "max_window_layers" in facts:
        facts["max_window_layers"] = layers
    facts.update(bos_token_id=1, eos_token_id=2, pad_token_id=None, torch_dtype="bfloat16")
    return facts


def build_slice(facts: dict, folder: Path) -> Path:
    """Random bf16 weights of ``facts`` saved as safetensors shards, with the stories tokenizer."""
    if (folder / "done").is_file():
        return folder
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    f = dict(facts)
    config = AutoConfig.for_model(f.pop("model_type"), **f)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.to_empty(device="cpu")
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif p.dim() == 1:  # biases
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(0.02))
        for name, b in model.named_buffers():
            if "inv_freq" in name:  # the rotary table to_empty left unset
                b.copy_(model.model.rotary_emb.original_inv_freq)
    model.save_pretrained(folder, max_shard_size="1GB")
    copy_tokenizer(folder)
    (folder / "done").write_text("")
    return folder


def target_shapes(facts: dict, targets: list[str]) -> dict[str, tuple[int, int]]:
    """``(out, in)`` of each named projection of one decoder layer."""
    h, i = facts["hidden_size"], facts["intermediate_size"]
    head_dim = facts.get("head_dim") or h // facts["num_attention_heads"]
    q, kv = facts["num_attention_heads"] * head_dim, facts["num_key_value_heads"] * head_dim
    shapes = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
              "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    return {t: shapes[t] for t in targets}


def every_target_shape() -> list[tuple[int, int]]:
    """The distinct ``(out, in)`` of all seven projections of both models, smallest first."""
    shapes = {s for arch in ARCHS for s in target_shapes(slice_facts(arch), ALL7).values()}
    return sorted(shapes, key=lambda s: s[0] * s[1])


# --------------------------------------------------------------------------- runs


def short_data(work: Path) -> Path:
    """GSM8K-format records a few tokens long, for the 32-token run that has almost no activations."""
    path = work / "short.jsonl"
    path.write_text("".join(json.dumps({"question": f"{a}+{a}?", "answer": f"{2 * a} #### {2 * a}"}) + "\n"
                            for a in range(64)))
    return path


def overrides(model: Path, out: Path, *, targets: list[str], seq: int, steps: int, save: bool,
              eval_size: int = 4, data: Path = GSM8K_TRAIN) -> list[str]:
    return [f"output_dir={out}", f"model.name_or_path={model}", "model.dtype=bfloat16",
            f"adapter.targets=[{','.join(targets)}]", "adapter.rank=16", "adapter.svd=randomized",
            f"data.sources=[{data}]", f"data.eval_sources=[{GSM8K_TRAIN.with_name('test.jsonl')}]",
            "data.limit=128", f"data.max_seq_len={seq}", "data.packing=true",
            f"data.eval_size={eval_size}", "train.micro_batch_size=1", "train.global_batch_size=2",
            f"train.max_steps={steps}", f"train.save_every={steps if save else 0}", "train.keep_last=2",
            "train.lr=1e-4", "eval.at_end=false", "deepspeed.timeout_s=3600", "deepspeed.step_timeout_s=3600"]


def run_ranks(script: str, args: list[str], log: Path, timeout: float, env_extra: dict | None = None) -> dict:
    """``<script> <args>`` on ``NPROC`` ranks (torchrun; one rank: a plain process), one thread
    each, glibc mapping large allocations on their own: wall seconds and peak RSS per rank."""
    from benchmarks.common import proc_env, torchrun_cmd
    from benchmarks.train import launch

    launcher = torchrun_cmd(NPROC) if NPROC > 1 else [sys.executable]
    cmd = launcher + [str(ROOT / script), *args]
    env = proc_env(MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD), **(env_extra or {}))
    wall, peak_sum, peak_one = launch(cmd, log, timeout, env)
    return {"wall_seconds": wall, "peak_rss_sum": peak_sum, "peak_rss_rank": peak_one}


def train_run(model: Path, out: Path, *, targets: list[str], seq: int, steps: int, save: bool, resume: str = "none",
              trace_min: int = 0, timeout: float = 3600, eval_size: int = 4, data: Path = GSM8K_TRAIN) -> dict:
    if resume == "none":  # a fresh folder: no factor cache, no earlier run to archive
        shutil.rmtree(out, ignore_errors=True)
    args = ["--config", "configs/tiny_cpu.yaml", "--resume", resume]
    for item in overrides(model, out, targets=targets, seq=seq, steps=steps, save=save, eval_size=eval_size,
                          data=data):
        args += ["--set", item]
    env = {"DUDE_SCALE_TRACE_STEP": "1", "DUDE_SCALE_TRACE_MIN": str(trace_min)} if trace_min else {}
    print(f"  train {out.name}: {','.join(targets)} seq {seq}, {steps} steps, resume {resume}", flush=True)
    outer = run_ranks("benchmarks/_scale_worker.py", args, out.parent / f"{out.name}_{resume}.log", timeout, env)
    ranks = [json.loads((out / f"scale_rank{k}.json").read_text()) for k in range(NPROC)]
    summary = json.loads((out / "summary.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"outer": outer, "ranks": ranks, "summary": summary,
            "steps": [m for m in metrics if "train/step_time_s" in m]}


def export_run(model: Path, out: Path, dest: Path, *, targets: list[str], seq: int) -> dict:
    args = ["--config", "configs/tiny_cpu.yaml", "--checkpoint", "auto", "--out", str(dest), "--overwrite"]
    for item in overrides(model, out, targets=targets, seq=seq, steps=TRAIN_STEPS, save=True):
        args += ["--set", item]
    print(f"  export {out.name} -> {dest}", flush=True)
    outer = run_ranks("launch/export.py", args, out.parent / f"{out.name}_export.log", 3600)
    outer["bytes"] = dir_bytes(dest)
    return outer


def phase(rank_record: dict, name: str) -> dict | None:
    return next((p for p in rank_record["phases"] if p["name"] == name), None)


def dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- the planner's view


def plan_for(model: Path, out: Path, *, targets: list[str], seq: int, svd_gflops: float | None = None,
             gpus: int = 2):
    """The planner for a run of this script: the same slice, config and ranks (one node)."""
    from dude_dist.config_loader import load_config
    from dude_dist.planner import plan_run

    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml",
                      overrides(model, out, targets=targets, seq=seq, steps=TRAIN_STEPS, save=True))
    return plan_run(cfg, 1, gpus, model_config=model / "config.json", reserve_gb=0.0, compare_deepspeed=False,
                    svd_gflops=svd_gflops)


def step_peaks(run: dict) -> list[dict]:
    """Per rank: RSS before load, after the engine, the largest step peak and most gathered."""
    rows = []
    for rec in run["ranks"]:
        steps = [p for p in rec["phases"] if p["name"].startswith("step")]
        rows.append({"base": phase(rec, "load")["rss_start"], "engine": phase(rec, "engine")["rss_end"],
                     "peak": max(p["peak"] for p in steps), "gathered": max(p["gathered_max"] for p in steps)})
    return rows


def measured_items(run: dict, tiny: dict | None, activations: int | None = None) -> list[dict]:
    """Per rank, the measured counterpart of each planner memory item (bytes).

    The step's peak is the largest over all steps (from step 2 on ZeRO-3 prefetches by the
    traced module order and holds more); ``tiny`` is the 32-token run of the same slice, and
    ``activations`` the bytes of one step measured alone (:func:`activation_peak`).
    """
    rows = []
    tiny_peaks = step_peaks(tiny) if tiny is not None else None
    for k, (rec, pk) in enumerate(zip(run["ranks"], step_peaks(run))):
        load = phase(rec, "load")
        acc = {**rec["accounting"], **rec["accounting"].get("after_step", {})}
        row = {
            "rank": k,
            "baseline": pk["base"],
            "params": acc["param_partition"],
            "params_rss": load["rss_end"] - pk["base"],
            "persistent": acc["params_whole"],
            "buffers": acc["buffers"],
            "optimizer_tensors": acc["optimizer_tensors"],
            "gathered": pk["gathered"],
            "total": pk["peak"] - pk["base"],
            "load_peak": load["peak"] - pk["base"],
            "load_anon_at_peak": load["anon_at_peak"],
            "load_file_at_peak": load["file_at_peak"],
            "load_file_over_start": load["file_at_peak"] - rec["phases"][0]["file_at_peak"],
            "steady_rss": rec["phases"][-1]["rss_end"],
        }
        if tiny_peaks is not None:
            t = tiny_peaks[k]
            row["tiny_total"] = t["peak"] - t["base"]
            row["tiny_beyond_gathered"] = t["peak"] - t["engine"] - t["gathered"]
        if activations is not None:
            row["activations_alone"] = activations
        rows.append(row)
    return rows


def compare(plan, items: list[dict], tiny_plan=None) -> list[list]:
    """Rows of item, predicted, measured (the rank with the larger peak), ratio; GiB."""
    m = plan.memory
    worst = max(items, key=lambda r: r["total"])
    pairs = [
        ("params (partition)", m.params, worst["params"]),
        ("persistent (kept whole)", m.persistent, worst["persistent"]),
        ("buffers", m.buffers, worst["buffers"]),
        ("params + persistent + buffers, RSS after load", m.params + m.persistent + m.buffers, worst["params_rss"]),
        ("optimizer + grads + step copy", m.optimizer + m.grads + m.optimizer_step, worst["optimizer_tensors"]),
        ("gathered", m.gathered, worst["gathered"]),
    ]
    if "tiny_total" in worst and tiny_plan is not None:
        t = tiny_plan.memory
        pairs += [("in flight + buckets + activations, 32-token step beyond gathered",
                   t.in_flight + t.buckets + t.activations, worst["tiny_beyond_gathered"]),
                  ("total, 32-token step", t.total, worst["tiny_total"])]
    if "activations_alone" in worst:
        pairs.append(("activations (one step without ZeRO-3, weights resident)", m.activations,
                      worst["activations_alone"]))
    pairs.append(("total (step peak - RSS before load)", m.total, worst["total"]))
    pairs.append(("while loading, rank 1 (load peak - RSS before load)", plan.loading_bytes, items[1]["load_peak"]))
    pairs.append(("checkpoint pages mapped by rank 0 while loading", plan.host["checkpoint_mapped_by_rank0"],
                  items[0]["load_file_over_start"]))
    return [[name, pred / GIB, meas / GIB, (meas / pred) if pred else None] for name, pred, meas in pairs]


# --------------------------------------------------------------------------- activations alone


ACTIVATIONS = r"""
import json, sys
import torch
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM
from dude_dist.config import DudeConfig
from dude_dist.sharded_init import inject_and_init

from benchmarks.common import reset_peak_rss, status_bytes

device = sys.argv[4]
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16).to(device)
inject_and_init(model, DudeConfig(targets=tuple(sys.argv[3].split(",")), rank=16, svd="randomized"))
model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
model.config.use_cache = False
model.train()  # from_pretrained returns eval mode, in which transformers skips checkpointing
ids = torch.randint(3, 500, (1, int(sys.argv[2])), generator=torch.Generator().manual_seed(0)).to(device)
for _ in range(2):  # the second step, with every lazily built buffer in place
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    else:
        start = status_bytes()["VmRSS"]
        reset_peak_rss()
    model(input_ids=ids, labels=ids).loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - start
    else:
        peak = status_bytes()["VmHWM"] - start
    model.zero_grad(set_to_none=True)
print(json.dumps({"seq": int(sys.argv[2]), "peak": peak}))
"""


def activation_peak(model: Path, seq: int, targets: list[str] = QV, device: str = "cpu") -> int:
    """Resident bytes one training step of the slice adds, with every weight already in memory
    and no ZeRO-3 (one process, checkpointing, the same DuDe targets): its activations."""
    import subprocess

    from dude_dist.distributed import child_env

    env = child_env(MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    out = subprocess.run([sys.executable, "-c", ACTIVATIONS, str(model), str(seq), ",".join(targets), device],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"activation measurement at {seq} tokens failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


# --------------------------------------------------------------------------- init by shape


def init_by_shape(shapes: list[tuple[int, int]], rank: int = 16, device: str = "cpu") -> list[dict]:
    """Seconds of one randomized factorisation of a random bf16 weight of each shape (1 thread
    on CPU), and the planner's estimate from its probe on the same device."""
    import torch

    from dude_dist.config import DudeConfig
    from dude_dist.planner import calibrate_svd_gflops, svd_layer_seconds
    from dude_dist.svd_init import factorize

    torch.set_num_threads(1)
    adapter = DudeConfig(rank=rank, svd="randomized")
    gflops = calibrate_svd_gflops(adapter, dtype="bfloat16", threads=1, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    rows = []
    for out_f, in_f in shapes:
        w = (torch.randn(out_f, in_f) * 0.02).to(device=device, dtype=torch.bfloat16)
        factorize(w[:256], rank, method="randomized", name="w")  # kernels loaded
        sync()
        t0 = time.perf_counter()
        factorize(w, rank, method="randomized", name="w", oversample=adapter.svd_oversample, niter=adapter.svd_niter)
        sync()
        seconds = time.perf_counter() - t0
        rows.append({"shape": [out_f, in_f], "seconds": seconds,
                     "predicted": svd_layer_seconds(out_f, in_f, adapter, gflops), "svd_gflops": gflops})
        print(f"  init {out_f}x{in_f}: {seconds:.2f} s (planner {rows[-1]['predicted']:.2f} s)", flush=True)
        del w
    return rows


# --------------------------------------------------------------------------- main


def rehearse(arch: str, work: Path, *, sweeps: bool) -> dict:
    facts = slice_facts(arch)
    model = build_slice(facts, work / f"{arch}-slice")
    shapes = target_shapes(facts, QV)
    trace_min = min(o * i for o, i in shapes.values())
    res: dict = {"arch": arch, "facts": facts, "slice_bytes": dir_bytes(model)}
    out = work / f"{arch}-train"
    res["train"] = train_run(model, out, targets=QV, seq=512, steps=TRAIN_STEPS, save=True, trace_min=trace_min)
    ckpt = sorted((out / "checkpoints").glob("step_*"))[-1]
    res["checkpoint_bytes"] = dir_bytes(ckpt)
    res["resume"] = train_run(model, out, targets=QV, seq=512, steps=TRAIN_STEPS + 1, save=True, resume="auto")
    res["export"] = export_run(model, out, work / f"{arch}-export", targets=QV, seq=512)
    shutil.rmtree(work / f"{arch}-export", ignore_errors=True)
    res["tiny"] = train_run(model, work / f"{arch}-tiny", targets=QV, seq=32, data=short_data(work), steps=4,
                            save=False, eval_size=0)
    res["activations"] = {str(seq): activation_peak(model, seq) for seq in ((32, 256, 512, 1024) if sweeps else (512,))}
    res["all7"] = train_run(model, work / f"{arch}-all7", targets=ALL7, seq=512, steps=1, save=False, eval_size=0)
    if sweeps:
        for seq in (256, 1024):
            res[f"seq{seq}"] = train_run(model, work / f"{arch}-seq{seq}", targets=QV, seq=seq, steps=4, save=False,
                                         eval_size=0)
    return res


def step_seconds(run: dict, skip: int = 1) -> float:
    """Median step time after the first ``skip`` steps (the first pays for warm-up and the trace)."""
    import statistics

    times = [m["train/step_time_s"] for m in run["steps"]]
    return statistics.median(times[skip:] or times)


def trace_summary(run: dict, shapes: dict[str, tuple[int, int]]) -> dict:
    """Large tensors created during the traced step, outside and inside ZeRO-3's code."""
    weight_shapes = {tuple(s) for s in shapes.values()} | {tuple(reversed(s)) for s in shapes.values()}
    out = {"outside_zero3": {}, "target_weight_shaped_outside_zero3": [], "zero3_allgathers": 0}
    for rec in run["ranks"]:
        for t in rec["trace"]:
            if t["zero3"]:
                out["zero3_allgathers"] += t["op"].startswith("c10d._allgather")
                continue
            if t["op"].startswith(("aten.detach", "aten.view", "aten.t.", "aten.slice", "aten._unsafe_view",
                                   "aten.transpose", "aten.expand", "aten.alias", "aten.as_strided")):
                continue  # views share the storage of a tensor counted where it was made
            key = f"{t['op']} {tuple(t['shape'])} {t['dtype']} at {t['where']} (rank {rec['rank']})"
            out["outside_zero3"][key] = out["outside_zero3"].get(key, 0) + 1
            if tuple(t["shape"]) in weight_shapes:
                out["target_weight_shaped_outside_zero3"].append(key)
    return out


def full_model_figures(gflops: float) -> list[dict]:
    """The calibrated planner's figures for the real models on 8, 32 and 64 GPUs (init seconds
    at ``gflops`` per rank)."""
    from dude_dist.config_loader import load_config
    from dude_dist.planner import plan_run

    rows = []
    for config in ("qwen32b", "llama70b"):
        for gpus in (8, 32, 64):
            cfg = load_config(ROOT / "configs" / f"{config}.yaml", [f"train.global_batch_size={max(16, gpus)}"])
            plan = plan_run(cfg, gpus // 8, 8, svd_gflops=gflops, compare_deepspeed=False)
            m, init = plan.memory, plan.init
            rows.append({"config": config, "gpus": gpus, "memory_per_gpu": m.total, "params": m.params,
                         "gathered": m.gathered, "activations": m.activations, "loading": plan.loading_bytes,
                         "init_seconds_max": max(init["seconds_per_rank"]), "init_transient": init["transient_bytes"],
                         "checkpoint_bytes": plan.checkpoint_bytes,
                         "gather_bytes_per_step": plan.traffic["flat"]["total"],
                         "gather_inter_node": plan.traffic["flat"]["inter_node"],
                         "host_node0_loading": plan.host["node0_while_loading"],
                         "step_seconds": plan.step["step_seconds"]})
    return rows


def plots(work: Path, data: dict, init_rows: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    sizes = [r["shape"][0] * r["shape"][1] / 1e6 for r in init_rows]
    axes[0].plot(sizes, [r["seconds"] for r in init_rows], "o-", label="measured")
    axes[0].plot(sizes, [r["predicted"] for r in init_rows], "s--", label="planner")
    for r, x in zip(init_rows, sizes):
        axes[0].annotate(f"{r['shape'][0]}x{r['shape'][1]}", (x, r["seconds"]), fontsize=7)
    axes[0].set(xlabel="weight elements (millions)", ylabel="seconds (1 thread)", title="Randomized SVD init, one layer")
    axes[0].legend()
    top = 0.0
    for arch, d in data.items():
        for key, label in (("train", "q,v"), ("all7", "all seven")):
            init = d[key]["summary"]["init"]
            planned = d[f"plan_{key}"]["seconds_per_rank"]  # set by report()
            for r, (n, sec, x) in enumerate(zip(init["layers_per_rank"], init["svd_seconds_per_rank"], planned)):
                axes[1].plot(x, sec, "o" if arch == "llama70b" else "s", color="C0" if key == "train" else "C1")
                axes[1].annotate(f"{arch} {label} r{r}: {n} layer{'s' if n > 1 else ''}", (x, sec), fontsize=6)
                top = max(top, x, sec)
    axes[1].plot([0, top * 1.05], [0, top * 1.05], "k:", lw=0.8, label="measured = planner")
    axes[1].set(xlabel="planner seconds on the rank", ylabel="measured SVD seconds on the rank",
                title="Sharded init, 2 ranks (q,v and all seven)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    path = RESULTS / "scale_init.png"
    fig.savefig(path, dpi=110)
    made.append(path.name)
    if "llama70b" in data and "seq256" in data["llama70b"]:
        d = data["llama70b"]
        seqs = [(256, d["seq256"]), (512, d["train"]), (1024, d["seq1024"])]
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.plot([q for q, _ in seqs], [step_seconds(r) for _, r in seqs], "o-")
        ax.set(xlabel="tokens per rank per step", ylabel="step seconds",
               title="One Llama-2-70B layer (+ LM head), 2 CPU ranks")
        fig.tight_layout()
        path = RESULTS / "scale_steps.png"
        fig.savefig(path, dpi=110)
        made.append(path.name)
    plt.close("all")
    return made


def report(work: Path, name: str) -> None:
    data = {arch: json.loads((work / f"{arch}.json").read_text()) for arch in ARCHS if (work / f"{arch}.json").is_file()}
    init_rows = json.loads((work / "init_shapes.json").read_text())
    gflops = init_rows[0]["svd_gflops"]  # the planner's probe, run in the same process just before
    tables: dict = {}
    records: dict = {"runs": data, "init_by_shape": init_rows}
    pipeline_rows, memory_tables, load_rows, init_rank_rows, trace = [], {}, [], [], {}
    for arch, d in data.items():
        model = work / f"{arch}-slice"
        plan = plan_for(model, work / f"{arch}-train", targets=QV, seq=512, svd_gflops=gflops)
        plan7 = plan_for(model, work / f"{arch}-all7", targets=ALL7, seq=512, svd_gflops=gflops)
        records[f"plan_{arch}"] = plan.to_dict()
        train, resume = d["train"], d["resume"]
        rank0 = train["ranks"][0]
        save = phase(rank0, "save")
        pipeline_rows.append([
            arch, d["facts"]["hidden_size"], d["facts"]["intermediate_size"], d["facts"]["vocab_size"],
            plan.base_params / 1e9, d["slice_bytes"] / GIB, phase(rank0, "load")["seconds"],
            train["summary"]["init"]["wall_seconds"], train["summary"]["init"]["bytes_gathered"] / 1e6,
            train["summary"]["init"]["bytes_broadcast"] / 1e6, step_seconds(train), d["checkpoint_bytes"] / 2**20,
            save["seconds"], phase(resume["ranks"][0], "resume_load")["seconds"],
            f"{train['summary']['losses'][-1]:.4f} / {resume['summary']['losses'][0]:.4f}",
            d["export"]["wall_seconds"], d["export"]["peak_rss_rank"] / GIB,
            f"{train['summary']['eval_loss_start']:.3f} -> {train['summary']['eval_loss_end']:.3f}"])
        items = measured_items(train, d["tiny"], d.get("activations", {}).get("512"))
        records[f"measured_{arch}"] = items
        memory_tables[arch] = compare(plan, items, plan_for(model, work / f"{arch}-tiny", targets=QV, seq=32,
                                                             svd_gflops=gflops))
        for k, rec in enumerate(train["ranks"]):
            ld = phase(rec, "load")
            load_rows.append([arch, k, (ld["peak"] - ld["rss_start"]) / GIB, ld["anon_at_peak"] / GIB,
                              ld["file_at_peak"] / GIB, (plan.loading_bytes + (plan.host["checkpoint_mapped_by_rank0"]
                                                                                if k == 0 else 0)) / GIB,
                              rec["phases"][-1]["rss_end"] / GIB])
        for key, p in (("train", plan), ("all7", plan7)):
            d[f"plan_{key}"] = {"seconds_per_rank": p.init["seconds_per_rank"]}
            init = d[key]["summary"]["init"]
            for r in range(2):
                pred = p.init["seconds_per_rank"][r]
                meas = init["svd_seconds_per_rank"][r]
                init_rank_rows.append([arch, "q,v" if key == "train" else "all seven", r, init["layers_per_rank"][r],
                                       p.init["layers_per_rank"][r], meas, pred, meas / pred])
        trace[arch] = trace_summary(train, target_shapes(d["facts"], QV))
    tables["The pipeline at full layer width (2 CPU ranks, ZeRO-3, bf16)"] = (
        ["slice", "hidden", "MLP", "vocab", "params (B)", "safetensors GiB", "load s", "init s",
         "init: MB gathered to owners", "init: MB broadcast", "step s (512 tok)", "checkpoint MiB", "save s",
         "resume load s", f"loss at step {TRAIN_STEPS} / step {TRAIN_STEPS + 1} after resume", "export s",
         "export peak RSS GiB/rank", "held-out loss"], pipeline_rows)
    for arch, rows in memory_tables.items():
        tables[f"{arch}: planner vs measured, per rank (GiB; the rank with the larger peak)"] = (
            ["item", "planner", "measured", "measured / planner"], rows)
    tables["Host RAM while loading under zero.Init (GiB)"] = (
        ["slice", "rank", "peak over start", "anonymous at peak", "file-backed at peak", "planner", "RSS at the end"],
        load_rows)
    tables["Init seconds by layer shape (randomized SVD, rank 16, one thread)"] = (
        ["shape", "measured s", "planner s", "measured / planner"],
        [[f"{r['shape'][0]}x{r['shape'][1]}", r["seconds"], r["predicted"], r["seconds"] / r["predicted"]]
         for r in init_rows])
    tables["Init per rank in the runs (SVD seconds)"] = (
        ["slice", "targets", "rank", "layers", "planned layers", "measured s", "planner s", "measured / planner"],
        init_rank_rows)
    if "llama70b" in data and "seq256" in data["llama70b"]:
        d = data["llama70b"]
        tables["Step time against sequence length, one Llama-2-70B layer"] = (
            ["tokens per rank", "step s", "peak RSS GiB/rank"],
            [[q, step_seconds(r), max(p["peak"] for rec in r["ranks"] for p in rec["phases"]
                                      if p["name"].startswith("step")) / GIB]
             for q, r in ((256, d["seq256"]), (512, d["train"]), (1024, d["seq1024"]))])
    full = full_model_figures(gflops=gflops)
    gpu_file = RESULTS / "gpu_scale.json"
    gpu_gflops = json.loads(gpu_file.read_text())["settings"]["svd_gflops"] if gpu_file.is_file() else None
    if gpu_gflops:
        for row, at_gpu in zip(full, full_model_figures(gflops=gpu_gflops)):
            row["init_seconds_max_gpu"] = at_gpu["init_seconds_max"]
    records["full_models"] = full
    tables["The real models, by the calibrated planner (8 GPUs per node, 80 GB)"] = (
        ["config", "GPUs", "GiB per GPU", "gathered GiB", "activations GiB", "while loading GiB",
         "init s (max rank, one CPU core each)", "init s (max rank, at the H200's measured SVD rate)",
         "checkpoint MB", "gathered GB per GPU per step", "across nodes GB", "node 0 host RAM while loading GiB"],
        [[r["config"], r["gpus"], r["memory_per_gpu"] / GIB, r["gathered"] / GIB, r["activations"] / GIB,
          r["loading"] / GIB, r["init_seconds_max"], r.get("init_seconds_max_gpu"), r["checkpoint_bytes"] / 1e6,
          r["gather_bytes_per_step"] / 1e9,
          r["gather_inter_node"] / 1e9, r["host_node0_loading"] / GIB] for r in full])
    records["trace"] = trace
    made = plots(work, data, init_rows)
    notes = [
        "Memory trace of step 1 (every operator output with at least as many elements as the smallest target "
        "weight): tensors of a target weight's shape made outside ZeRO-3's code: "
        + "; ".join(f"{a}: {len(t['target_weight_shaped_outside_zero3'])}" for a, t in trace.items())
        + ". Other large tensors made outside ZeRO-3 (activations; counts over both ranks): "
        + "; ".join(f"{a}: " + ", ".join(f"{n}x {k}" for k, n in sorted(t["outside_zero3"].items())[:8])
                    for a, t in trace.items()),
        "Measured memory is resident memory (RSS) per rank: 'before load' is the RSS when model loading starts "
        "(torch, transformers, DeepSpeed, data); glibc is set to map every allocation of 4 MiB or more on its own "
        "(MALLOC_MMAP_THRESHOLD_), so freed tensors leave RSS as they leave a GPU's allocated bytes.",
        "params, persistent, buffers and optimizer are counted from the tensors (ds_tensor partitions, parameters "
        "kept whole, buffers, the optimizer's state); gathered is the most bytes of partitioned parameters whose "
        "full value was present or being fetched at once (sampled every 10 ms); activations are what one "
        "training step of the slice adds to resident memory in one process without ZeRO-3 (all weights "
        "already resident, checkpointing on, the same DuDe targets and tokens). Steps are the largest over the "
        "run: from step 2 or 3 on ZeRO-3 prefetches by the module order it traced and holds more.",
        f"Planner init seconds use its own probe of this machine ({gflops:.1f} Gflop/s in svd_cost units, one "
        "thread, a 4096x4096 bf16 weight). The real-model table gives init seconds at the same rate, i.e. if "
        "every rank factorised on one CPU core, and at the rate the same probe measured on an H200 "
        f"({gpu_gflops or 0:.0f} Gflop/s, results/gpu_scale.md; on a GPU each layer also pays a few ms of "
        "latency that the rate leaves out). On GPUs pass the rate the trainer logs ('init plan ... Gflop/s "
        "measured there') as launch/plan.py --svd-gflops.",
        "Full-model figures: configs/qwen32b.yaml and configs/llama70b.yaml (rank 16 on q,v, max_seq_len 2048 "
        "packed, micro-batch 1, global batch max(16, GPUs), activation checkpointing, bf16), gather traffic "
        "without hpZ.",
        f"Plots: {', '.join(made)}.",
    ]
    write_results(name, title="Scale rehearsal at the real layer shapes (2 CPU ranks)", settings={
        "work": str(work), "mmap_threshold": MMAP_THRESHOLD, "seq": 512, "targets": QV}, tables=tables,
        records=records, notes=notes)


def gpu_rehearsal(work: Path, name: str, archs: list[str]) -> None:
    """One rank on one GPU: each slice trained under ZeRO-3 in bf16 with device memory per
    phase, its activations alone, init per layer shape on the GPU, and the planner for the
    same slice on one GPU (its SVD rate from the same device's probe)."""
    import torch

    global NPROC
    NPROC = 1
    init_rows = init_by_shape(every_target_shape(), device="cuda")
    gflops = init_rows[0]["svd_gflops"]
    tables, records = {}, {"init_by_shape": init_rows}
    for arch in archs:
        try:
            gpu_slice(arch, work, gflops, tables, records)
        except Exception as exc:  # keep what the other slices measured
            records[f"{arch}_error"] = repr(exc)[-2000:]
            print(f"{arch}: {exc!r}"[-2000:], flush=True)
    tables["Init seconds by layer shape on the GPU (randomized SVD, rank 16, bf16 weight)"] = (
        ["shape", "measured s", "planner s", "measured / planner"],
        [[f"{r['shape'][0]}x{r['shape'][1]}", r["seconds"], r["predicted"], r["seconds"] / r["predicted"]]
         for r in init_rows])
    write_results(name, title=f"Scale rehearsal on one GPU ({torch.cuda.get_device_name()})", device="cuda",
                  settings={"svd_gflops": gflops, "seq": 512, "targets": QV}, tables=tables, records=records,
                  notes=[f"SVD rate of the planner's probe on this GPU: {gflops:.0f} Gflop/s (svd_cost units, "
                         "4096x4096 bf16).",
                         "Device memory is torch.cuda.memory_allocated / max_memory_allocated, per phase.",
                         "The real models' figures at this GPU's SVD rate are in results/scale.md (computed by the "
                         "planner; no GPU needed)."])


def gpu_slice(arch: str, work: Path, gflops: float, tables: dict, records: dict) -> None:
    """One slice of :func:`gpu_rehearsal`."""
    facts = slice_facts(arch)
    model = build_slice(facts, work / f"{arch}-slice")
    train = train_run(model, work / f"{arch}-train", targets=QV, seq=512, steps=TRAIN_STEPS, save=True)
    tiny = train_run(model, work / f"{arch}-tiny", targets=QV, seq=32, data=short_data(work), steps=4,
                     save=False, eval_size=0)
    acts = activation_peak(model, 512, device="cuda")
    plan = plan_for(model, work / f"{arch}-train", targets=QV, seq=512, svd_gflops=gflops, gpus=1)
    tplan = plan_for(model, work / f"{arch}-tiny", targets=QV, seq=32, svd_gflops=gflops, gpus=1)
    rec, trec = train["ranks"][0], tiny["ranks"][0]
    steps = [p for p in rec["phases"] if p["name"].startswith("step")]
    tsteps = [p for p in trec["phases"] if p["name"].startswith("step")]
    acc = {**rec["accounting"], **rec["accounting"].get("after_step", {})}
    m = plan.memory
    rows = [
        ("params (partition)", m.params, acc["param_partition"]),
        ("gathered (status, most at once; extra memory only with more than one rank)", m.gathered,
         max(p["gathered_max"] for p in steps)),
        ("activations (one step without ZeRO-3)", m.activations, acts),
        ("after load (cuda allocated)", m.params + m.persistent + m.buffers, phase(rec, "load")["cuda_end"]),
        ("while loading (cuda peak)", plan.loading_bytes, phase(rec, "load")["cuda_peak"]),
        ("total, 32-token step (cuda peak)", tplan.memory.total, max(p["cuda_peak"] for p in tsteps)),
        ("total (cuda peak over the steps)", m.total, max(p["cuda_peak"] for p in steps)),
    ]
    tables[f"{arch} slice on one GPU: planner vs measured (GiB)"] = (
        ["item", "planner", "measured", "measured / planner"],
        [[n, a / GIB, b / GIB, b / a if a else None] for n, a, b in rows])
    init = train["summary"]["init"]
    tables[f"{arch} slice on one GPU: the pipeline"] = (
        ["load s", "init s (wall)", "SVD s", "planner SVD s", "step s (median after step 1)", "checkpoint save s",
         "held-out loss"],
        [[phase(rec, "load")["seconds"], init["wall_seconds"], init["svd_seconds_per_rank"][0],
          plan.init["seconds_per_rank"][0], step_seconds(train), phase(rec, "save")["seconds"],
          f"{train['summary']['eval_loss_start']:.3f} -> {train['summary']['eval_loss_end']:.3f}"]])
    records[arch] = {"train": train, "tiny": tiny, "activations": acts, "plan": plan.to_dict()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    p.add_argument("--ci", action="store_true", help="the CI-sized variant only (one 8192-wide layer)")
    p.add_argument("--no-sweeps", action="store_true", help="skip the sequence-length runs")
    p.add_argument("--work", default=None, help="folder for slices and runs (default: a temp folder)")
    p.add_argument("--name", default="scale")
    p.add_argument("--gpu", action="store_true", help="one rank on this machine's GPU (results: --name, gpu_scale)")
    args = p.parse_args(argv)
    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="dude_scale_"))
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"error: --work {args.work}: {exc.strerror}", file=sys.stderr)
        return 2
    if args.gpu:
        gpu_rehearsal(work, args.name if args.name != "scale" else "gpu_scale", args.archs)
        return 0
    if args.ci:
        result = ci_check(work)
        print(json.dumps(result["table"], indent=1))
        return 0 if result["ok"] else 1
    for arch in args.archs:
        raw = work / f"{arch}.json"
        if not raw.is_file():
            print(f"{arch}: rehearsal in {work}", flush=True)
            raw.write_text(json.dumps(rehearse(arch, work, sweeps=not args.no_sweeps and arch == "llama70b")))
    shapes_file = work / "init_shapes.json"
    if not shapes_file.is_file():
        shapes_file.write_text(json.dumps(init_by_shape(every_target_shape())))
    report(work, args.name)
    return 0


# The rows the CI variant holds to its tolerance: every item the planner counts, and the
# totals. The RSS cross-checks of small quantities (what loading leaves behind, tens of MiB of
# activations, the in-flight and bucket memory of a 32-token step, the page cache of a 0.4 GB
# checkpoint) carry fixed overheads of 30-70 MiB that are within 3% at 70B width but not at
# this size; the full rehearsal holds them to 10%.
CI_CHECKED = ("params (partition)", "persistent (kept whole)", "buffers", "optimizer + grads + step copy",
              "gathered", "total, 32-token step", "total (step peak - RSS before load)",
              "while loading, rank 1 (load peak - RSS before load)")


def ci_check(work: Path, tolerance: float = 0.15) -> dict:
    """One 8192-wide Llama-2-70B layer (MLP 2048, vocabulary 512), q,v, 4 steps of 128 tokens.

    Returns the comparison table and whether the rows of ``CI_CHECKED`` are within ``tolerance``.
    """
    facts = slice_facts("llama70b", intermediate=2048, vocab=512)
    model = build_slice(facts, work / "ci-slice")
    out = work / "ci-train"
    trace_min = min(o * i for o, i in target_shapes(facts, QV).values())
    run = train_run(model, out, targets=QV, seq=128, steps=4, save=True, eval_size=0, timeout=600,
                    trace_min=trace_min)
    tiny = train_run(model, work / "ci-tiny", targets=QV, seq=32, data=short_data(work), steps=4, save=False,
                     eval_size=0, timeout=600)
    plan = plan_for(model, out, targets=QV, seq=128, svd_gflops=1.0)
    tiny_plan = plan_for(model, out, targets=QV, seq=32, svd_gflops=1.0)
    table = compare(plan, measured_items(run, tiny, activation_peak(model, 128)), tiny_plan)
    ok = all(abs(r[3] - 1) <= tolerance for r in table if r[0] in CI_CHECKED)
    return {"table": table, "ok": ok, "plan": plan.to_dict(), "run": run, "tiny": tiny,
            "trace": trace_summary(run, target_shapes(facts, QV))}


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the ranks of the run in progress were ended with it (run_ranks)
        print("error: interrupted; finished slices are kept in --work as <arch>.json, rerun to go on",
              file=sys.stderr)
        sys.exit(130)
