"""DuDe initialisation: exact vs randomized SVD, sharded init on 1 vs 2 ranks, 32B/70B plans.

    OMP_NUM_THREADS=1 python benchmarks/init.py                 # all three parts (~4 min on 2 idle cores)
    OMP_NUM_THREADS=1 python benchmarks/init.py --parts a c --clock cpu   # shared machine, no torchrun

(a) ``dude_dist.svd_init.factorize`` exact vs randomized (rank 16, oversample 16, 4 power
    iterations) on 1024², 2048², 4096² and 8192x1024 matrices with two synthetic spectra:
    ``power``: ``U diag(s) V^T`` with random orthonormal ``U, V`` and ``s_i = i^-0.5``
    (a slowly decaying spectrum, as trained weights have); ``gaussian``: i.i.d. N(0, 1/in)
    entries (a flat Marchenko-Pastur spectrum, the hardest case for a range finder).
    Error = ``||W - B A||_F / ||W||_F``; excess = randomized error - exact (optimal) error.
(b) ``init_dude_layers`` under ZeRO-3 (``benchmarks/_init_worker.py`` under torchrun, one
    thread per rank, exact SVD so there is real work) on a random-weight Llama
    (hidden 1024, 8 layers, 16 heads, q_proj + v_proj = 16 layers of 1024x1024) with 1 and
    2 ranks: ``InitStats.wall_seconds``, speed-up, and bytes broadcast vs a residual broadcast.
(c) Qwen2.5-32B and Llama-2-70B q_proj + v_proj on 8/32/64 GPUs: the seconds of one
    randomized factorisation (+ the owner's magnitude pass) are measured here for each
    full-size layer shape; ``plan_init`` (LPT) assigns the layers; per-rank seconds are the
    sums of the measured seconds of the layers a rank owns.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import ROOT, median_seconds, proc_env, torchrun_cmd, wait_for_quiet, write_results  # noqa: E402
from dude_dist.config import DudeConfig  # noqa: E402
from dude_dist.sharded_init import _owner_magnitude, plan_init  # noqa: E402
from dude_dist.svd_init import factorize, svd_cost  # noqa: E402

RANK = 16
SVD_SHAPES = [(1024, 1024), (2048, 2048), (4096, 4096), (8192, 1024)]
BIG_MODELS = {
    # name: (layers, q [out, in], v [out, in])  (config.json in configs/models/)
    "Qwen2.5-32B": (64, (5120, 5120), (1024, 5120)),
    "Llama-2-70B": (80, (8192, 8192), (1024, 8192)),
}
WORLD_SIZES = (8, 32, 64)
# An assumption, not a measurement: what one GPU sustains on this workload (QR- and
# GEMM-bound fp32 on [out, in] x [in, 32] products), in svd_cost units (multiply-adds) per second.
GPU_COST_PER_S = 5e11


# --------------------------------------------------------------------------- (a)


def synth(out_f: int, in_f: int, spectrum: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A test matrix and, if known by construction, its singular values."""
    gen = torch.Generator().manual_seed(seed)
    n = min(out_f, in_f)
    if spectrum == "gaussian":
        return torch.randn(out_f, in_f, generator=gen) / in_f**0.5, None
    u, _ = torch.linalg.qr(torch.randn(out_f, n, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(in_f, n, generator=gen))
    s = torch.arange(1, n + 1, dtype=torch.float64).pow(-0.5).float()
    return (u * s) @ v.T, s


def rel_error(w: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> float:
    return float((w - lora_b @ lora_a).norm() / w.norm())


def part_a(args) -> tuple[list[dict], list[list]]:
    records, rows = [], []
    for out_f, in_f in SVD_SHAPES:
        for spectrum in args.spectra:
            w, _ = synth(out_f, in_f, spectrum)
            big = out_f * in_f >= 4096 * 4096 or max(out_f, in_f) >= 8192
            reps_exact = 1 if big else 3
            t_exact, _ = median_seconds(lambda w=w: factorize(w, RANK, method="exact"), repeats=reps_exact,
                                        warmup=0 if big else 1, clock=args.clock)
            exact = factorize(w, RANK, method="exact")
            t_rand, _ = median_seconds(lambda w=w: factorize(w, RANK, method="randomized", name="layer"),
                                       repeats=5, warmup=1, clock=args.clock)
            rand = factorize(w, RANK, method="randomized", name="layer")
            err_exact, err_rand = rel_error(w, exact.lora_a, exact.lora_b), rel_error(w, rand.lora_a, rand.lora_b)
            rec = {"shape": [out_f, in_f], "spectrum": spectrum, "exact_s": t_exact, "randomized_s": t_rand,
                   "speedup": t_exact / t_rand, "exact_rel_error": err_exact, "randomized_rel_error": err_rand,
                   "excess_rel_error": err_rand - err_exact, "energy_exact": exact.energy,
                   "energy_randomized": rand.energy}
            records.append(rec)
            rows.append([f"{out_f}x{in_f}", spectrum, t_exact, t_rand, rec["speedup"], err_exact, err_rand,
                         rec["excess_rel_error"], rand.energy / exact.energy])
            print(f"(a) {out_f}x{in_f} {spectrum}: exact {t_exact:.2f}s randomized {t_rand:.3f}s "
                  f"x{rec['speedup']:.0f}, excess error {rec['excess_rel_error']:.2e}", flush=True)
            del w
    return records, rows


# --------------------------------------------------------------------------- (b)


def build_random_llama(folder: Path, hidden: int, layers: int) -> Path:
    """A random-weight Llama saved with ``save_pretrained`` (reused if already there)."""
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, vocab_size=512,
                      max_position_embeddings=512)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def run_init_worker(model_dir: Path, nproc: int, out_json: Path, svd: str) -> dict:
    cmd = torchrun_cmd(nproc) + [str(ROOT / "benchmarks" / "_init_worker.py"), str(model_dir), str(out_json),
                                 "--svd", svd, "--rank", str(RANK)]
    proc = subprocess.run(cmd, cwd=ROOT, env=proc_env(), capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(out_json.read_text())


def part_b(args, work: Path) -> tuple[list[dict], list[list]]:
    model_dir = build_random_llama(work / f"llama_h{args.hidden}_l{args.layers}", args.hidden, args.layers)
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for i in range(args.init_repeats):
        for nproc in (1, 2) if i % 2 == 0 else (2, 1):
            busy = wait_for_quiet(timeout=args.wait_quiet)
            rec = run_init_worker(model_dir, nproc, work / f"init_{nproc}_{i}.json", "exact")
            rec["cpu_busy_before"] = busy
            runs[nproc].append(rec)
            print(f"(b) {nproc} rank(s), run {i} (CPU {busy:.0%} busy before): init wall {rec['wall_seconds']:.2f}s, "
                  f"SVD seconds per rank {[round(s, 2) for s in rec['svd_seconds_per_rank']]}", flush=True)
    one = statistics.median(r["wall_seconds"] for r in runs[1])
    records, rows = [], []
    for nproc, recs in runs.items():
        wall = statistics.median(r["wall_seconds"] for r in recs)
        last = recs[-1]
        speedup = one / wall
        records.append({"ranks": nproc, "wall_seconds": [r["wall_seconds"] for r in recs],
                        "wall_seconds_median": wall, "speedup": speedup, "efficiency": speedup / nproc,
                        "svd_seconds_per_rank": [r["svd_seconds_per_rank"] for r in recs],
                        "cpu_busy_before": [r["cpu_busy_before"] for r in recs],
                        "layers_per_rank": last["layers_per_rank"], "bytes_broadcast": last["bytes_broadcast"],
                        "bytes_residual_broadcast": last["bytes_residual_broadcast"],
                        "bytes_gathered": last["bytes_gathered"], "partitioned": last["partitioned"],
                        "layers": last["layers"], "shapes": last["shapes"]})
        svd_sum = statistics.median(sum(r["svd_seconds_per_rank"]) for r in recs)
        svd_max = statistics.median(max(r["svd_seconds_per_rank"]) for r in recs)
        rows.append([nproc, last["layers"], "/".join(map(str, last["layers_per_rank"])), wall, svd_max, svd_sum,
                     speedup, speedup / nproc, last["bytes_broadcast"] / 2**20,
                     last["bytes_residual_broadcast"] / 2**20,
                     (last["bytes_broadcast"] / last["bytes_residual_broadcast"]) if nproc > 1 else None,
                     last["bytes_gathered"] / 2**20])
    return records, rows


# --------------------------------------------------------------------------- (c)


def layer_seconds(out_f: int, in_f: int, repeats: int, clock: str) -> float:
    """One owner's work on one layer: randomized factorize + the magnitude pass, fp32."""
    w = torch.randn(out_f, in_f) / in_f**0.5

    def work() -> None:
        fac = factorize(w, RANK, method="randomized", name="model.layers.0.self_attn.q_proj")
        _owner_magnitude(w, fac.lora_a, fac.lora_b)

    t, _ = median_seconds(work, repeats=repeats, warmup=1, clock=clock)
    return t


def part_c(args) -> tuple[list[dict], list[list], dict]:
    cfg = DudeConfig(rank=RANK, svd="randomized")
    shapes_needed = sorted({s for _, q, v in BIG_MODELS.values() for s in (q, v)})
    seconds = {}
    for shape in shapes_needed:
        seconds[shape] = layer_seconds(*shape, repeats=args.layer_repeats, clock=args.clock)
        cost = svd_cost(*shape, RANK, "randomized")
        print(f"(c) randomized factorize {shape[0]}x{shape[1]}: {seconds[shape]:.2f}s "
              f"({cost / seconds[shape] / 1e9:.1f} G cost-units/s)", flush=True)
    records, rows = [], []
    for model, (n_layers, q, v) in BIG_MODELS.items():
        shapes = {}
        for i in range(n_layers):
            shapes[f"model.layers.{i}.self_attn.q_proj"] = q
            shapes[f"model.layers.{i}.self_attn.v_proj"] = v
        serial = sum(seconds[s] for s in shapes.values())
        gpu_serial = sum(svd_cost(*s, RANK, "randomized") for s in shapes.values()) / GPU_COST_PER_S
        for world in WORLD_SIZES:
            plan = plan_init(shapes, world, cfg)
            per_rank = [0.0] * world
            for name, owner in plan.owners.items():
                per_rank[owner] += seconds[shapes[name]]
            per_rank_gpu = [load / GPU_COST_PER_S for load in plan.load]
            counts = [len(plan.layers_of(r)) for r in range(world)]
            rec = {"model": model, "gpus": world, "layers": len(shapes), "cpu_max_rank_s": max(per_rank),
                   "cpu_mean_rank_s": sum(per_rank) / world, "cpu_serial_s": serial,
                   "gpu_assumed_max_rank_s": max(per_rank_gpu), "gpu_assumed_serial_s": gpu_serial,
                   "max_layers_per_rank": max(counts), "min_layers_per_rank": min(counts)}
            records.append(rec)
            rows.append([model, world, len(shapes), f"{min(counts)}–{max(counts)}", max(per_rank),
                         max(per_rank) / (sum(per_rank) / world), max(per_rank) < 60, serial,
                         max(per_rank_gpu), gpu_serial])
    measured = {f"{o}x{i}": t for (o, i), t in seconds.items()}
    return records, rows, measured


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["a", "b", "c"], choices=["a", "b", "c"])
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for (a) and (c) (default: OMP_NUM_THREADS or 1); (b) uses 1 per rank")
    p.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                   help="(a), (c): wall time, or process CPU time (steadier on a shared machine with 1 thread)")
    p.add_argument("--spectra", nargs="+", default=["power", "gaussian"], choices=["power", "gaussian"])
    p.add_argument("--hidden", type=int, default=1024, help="(b) hidden size of the random Llama")
    p.add_argument("--layers", type=int, default=8, help="(b) decoder layers of the random Llama")
    p.add_argument("--init-repeats", type=int, default=2, help="(b) torchrun runs per world size (median)")
    p.add_argument("--layer-repeats", type=int, default=3, help="(c) timed factorisations per shape (median)")
    p.add_argument("--work-dir", default=None, help="(b) where the random model is saved (default: a temp dir)")
    p.add_argument("--name", default="init")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="wait up to this long for an idle CPU before timing (and before each launch)")
    args = p.parse_args(argv)
    busy_at_start = wait_for_quiet(timeout=args.wait_quiet if args.parts != ["b"] else 0)
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(threads)
    t_start = time.perf_counter()

    tables, records, notes = {}, {}, []
    if "a" in args.parts:
        rec, rows = part_a(args)
        records["svd"] = rec
        tables[f"(a) Exact vs randomized SVD, rank {RANK} ({threads} thread(s), {args.clock} clock)"] = (
            ["shape", "spectrum", "exact s", "randomized s", "speed-up", "exact rel. error",
             "randomized rel. error", "excess error", "energy rand/exact"], rows)
        notes.append("(a) goal: ≥ 50× faster at 4096² with excess relative error ≤ 1e-2. power: U diag(i^-0.5) V^T "
                     "with random orthonormal U, V; gaussian: N(0, 1/in) entries. exact timed once at ≥ 4096² "
                     "(median of 3 below), randomized median of 5; times include factorize's energy pass.")
    if "b" in args.parts:
        work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="dude_bench_init_"))
        rec, rows = part_b(args, work)
        records["sharded"] = rec
        tables[f"(b) Sharded init under ZeRO-3, random Llama hidden {args.hidden} × {args.layers} layers, "
               f"q_proj+v_proj, exact SVD, 1 thread per rank"] = (
            ["ranks", "layers", "layers per rank", "init wall s", "max rank SVD s", "sum of SVD s", "speed-up",
             "efficiency", "broadcast MiB", "residual broadcast MiB", "broadcast / residual", "gathered MiB"], rows)
        notes.append(f"(b) goal: speed-up ≥ 0.85·P. Median of {args.init_repeats} torchrun runs per world size; "
                     "wall = InitStats.wall_seconds on rank 0 after a barrier that follows model loading.")
    if "c" in args.parts:
        rec, rows, measured = part_c(args)
        records["plan"] = {"layer_seconds": measured, "gpu_cost_per_s_assumed": GPU_COST_PER_S, "rows": rec}
        tables[f"(c) q_proj+v_proj init plans (LPT, randomized SVD), per-rank seconds from this CPU "
               f"({threads} thread(s), {args.clock} clock) per layer shape"] = (
            ["model", "GPUs", "layers", "layers per rank", "CPU-based max rank s", "max / mean",
             "< 60 s", "CPU-based serial s (Σ all layers)", "GPU-assumed max rank s", "GPU-assumed serial s"], rows)
        notes.append("(c) measured seconds per layer (randomized factorize + owner's magnitude pass, fp32, full size): "
                     + ", ".join(f"{k}: {v:.2f}s" for k, v in measured.items())
                     + ". Communication (gather to owner, factor broadcast) is not included.")
        notes.append(f"(c) GPU-assumed columns are an ASSUMPTION, not a measurement: one GPU at {GPU_COST_PER_S:.0e} "
                     "svd_cost units (multiply-adds) per second. 'serial' is the time if layers are factorised "
                     "one after another over the whole job (see (b)).")
    write_results(args.name, title="DuDe initialisation", settings={**vars(args), "cpu_busy_at_start": busy_at_start, "threads": threads,
                  "rank": RANK, "seconds_total": time.perf_counter() - t_start}, tables=tables,
                  records=records, notes=notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
