"""The baseline that benchmarks/train.py compares dude_dist with: HF ``Trainer`` + PEFT under ZeRO-3.

    OMP_NUM_THREADS=1 ACCELERATE_USE_DEEPSPEED=true torchrun --nproc_per_node 2 \
        benchmarks/_hf_peft_baseline.py --method dora_pissa --model ../shared/models/stories260K --out OUT_DIR

``--method dora_pissa``: ``LoraConfig(use_dora=True, init_lora_weights="pissa_niter_4")``;
``--method lora``: plain LoRA (PEFT's default init). Both on the same targets and rank as
the dude_dist run, with the same DeepSpeed config (built by ``dude_dist.zero.build_ds_config``
from the same run config), the same tokenised samples (``dude_dist.data.build_datasets``)
in the same order (``dude_dist.sampler.StepSampler``: rank ``k`` gets the same micro-batch
at each step as in dude_dist), padded by the same ``collate_batch``, and non-reentrant
gradient checkpointing. Rank 0 writes OUT_DIR/hf_result.json: per-step wall seconds
(between consecutive ``on_step_end`` callbacks) and each rank's process CPU seconds over
the same spans, tokens per step (counted in the collator on every rank), model-load,
adapter-init and start-up seconds.
"""

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

T_PROCESS = time.perf_counter()
os.environ.setdefault("ACCELERATE_USE_DEEPSPEED", "true")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, choices=("dora_pissa", "lora"))
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--data", default=None, help="GSM8K train JSONL (default: ../shared/data/gsm8k/train.jsonl)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"])
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--global-batch-size", type=int, default=4)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--limit", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="model dtype; bfloat16 also turns on DeepSpeed's and the Trainer's bf16")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t_startup = time.perf_counter()  # as dude_dist's startup_seconds: from before the process group starts
    from accelerate import PartialState
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":  # as dude_dist.zero.init_deepspeed_comm: no shm op JIT build
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    state = PartialState(backend="gloo" if not torch.cuda.is_available() else "nccl")
    rank, world = state.process_index, state.num_processes

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from benchmarks.common import GSM8K_TRAIN
    from dude_dist.config import DataConfig, DudeConfig, ModelConfig, RunConfig, TrainConfig, batch_layout
    from dude_dist.data import build_datasets, collate_batch
    from dude_dist.models import load_tokenizer
    from dude_dist.sampler import StepSampler
    from dude_dist.zero import build_ds_config

    run_cfg = RunConfig(
        model=ModelConfig(name_or_path=args.model, dtype=args.dtype),
        adapter=DudeConfig(targets=tuple(args.targets), rank=args.rank),
        data=DataConfig(sources=(args.data or str(GSM8K_TRAIN),), format="gsm8k", max_seq_len=args.max_seq_len,
                        limit=args.limit),
        train=TrainConfig(micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
                          lr=args.lr, warmup_ratio=args.warmup_ratio, max_steps=args.steps, max_grad_norm=1.0,
                          seed=args.seed),
    )
    layout = batch_layout(run_cfg.train, world)
    ds_config = build_ds_config(run_cfg, layout)

    tokenizer = load_tokenizer(run_cfg.model)
    train_set = build_datasets(run_cfg.data, tokenizer).train
    # The exact sample order of dude_dist: step s, rank k -> the k-th slice of the s-th global batch.
    # HF/accelerate hands consecutive micro-batches of a sequential sampler to ranks 0, 1, ... in turn.
    sampler = StepSampler(len(train_set), layout, run_cfg.train.seed)
    order = [i for step in range(args.steps) for i in sampler.global_batch(step)]
    train_set = train_set.select(order)

    tokens_seen: list[int] = []
    pad = tokenizer.pad_token_id

    def collate(samples):
        batch = collate_batch(samples, pad)
        tokens_seen.append(int(batch["attention_mask"].sum()))
        return batch

    training_args = TrainingArguments(
        output_dir=args.out, per_device_train_batch_size=layout.micro_batch_size,
        gradient_accumulation_steps=layout.grad_accum, max_steps=args.steps, learning_rate=args.lr,
        lr_scheduler_type="cosine", warmup_steps=args.warmup_ratio, max_grad_norm=1.0, weight_decay=0.0,
        logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, seed=args.seed,
        gradient_checkpointing=not args.no_gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False}, remove_unused_columns=False,
        dataloader_num_workers=0, deepspeed=ds_config, accelerator_config={"use_configured_state": True},
        bf16=args.dtype == "bfloat16", use_cpu=args.dtype == "bfloat16" and not torch.cuda.is_available(),
    )

    t0 = time.perf_counter()  # TrainingArguments(deepspeed=...) made from_pretrained partition under zero.Init
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    model.config.use_cache = False
    load_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    if args.method == "dora_pissa":
        peft_cfg = LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=0.0, target_modules=list(args.targets),
                              use_dora=True, init_lora_weights="pissa_niter_4", task_type="CAUSAL_LM")
    else:
        peft_cfg = LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=0.0, target_modules=list(args.targets),
                              task_type="CAUSAL_LM")
    model = get_peft_model(model, peft_cfg)
    adapter_seconds = time.perf_counter() - t0
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.begin = None
            self.ends: list[float] = []
            self.cpu_marks: list[float] = []
            self.losses: list[float] = []

        def on_train_begin(self, args, state, control, **kw):
            self.begin = time.perf_counter()
            self.cpu_marks.append(time.process_time())

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())
            self.cpu_marks.append(time.process_time())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    class OrderedTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    timer = Timer()
    trainer = OrderedTrainer(model=model, args=training_args, train_dataset=train_set, data_collator=collate,
                             callbacks=[timer])
    trainer.train()

    marks = [timer.begin] + timer.ends
    step_seconds = [b - a for a, b in zip(marks, marks[1:])]
    cpu_seconds = [b - a for a, b in zip(timer.cpu_marks, timer.cpu_marks[1:])]
    per_rank_tokens, per_rank_cpu = [None] * world, [None] * world
    torch.distributed.all_gather_object(per_rank_tokens, tokens_seen)
    torch.distributed.all_gather_object(per_rank_cpu, cpu_seconds)
    steps = len(step_seconds)
    accum = layout.grad_accum  # the collator runs once per micro-batch, accum times per step and rank
    tokens_per_step = [sum(sum(r[s * accum:(s + 1) * accum]) for r in per_rank_tokens) for s in range(steps)]
    if rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "hf_result.json").write_text(json.dumps({
            "method": args.method, "world_size": world, "steps": steps, "step_seconds": step_seconds,
            "step_cpu_seconds_per_rank": per_rank_cpu,
            "tokens_per_step": tokens_per_step, "load_seconds": load_seconds, "adapter_init_seconds": adapter_seconds,
            "startup_seconds": timer.begin - t_startup, "process_to_first_step_seconds": timer.begin - T_PROCESS,
            "trainable_params": trainable, "losses": timer.losses, "ds_config": ds_config,
        }, indent=1))
    torch.distributed.barrier()
    # Every rank is done and the result is written: leave without the interpreter's teardown.
    # With gloo's threads alive at exit a rank could abort ("terminate called without an
    # active exception"), even after destroy_process_group, and fail a finished run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
