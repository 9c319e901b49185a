"""The training loop: ``batches -> forward_backward -> step -> train``.

    python launch/train.py --config configs/tiny_cpu.yaml                # 1 process
    deepspeed --num_gpus 8 launch/train.py --config configs/qwen32b.yaml # ZeRO-3, one node
    torchrun --nproc_per_node 2 launch/train.py --config configs/tiny_cpu.yaml

The loss of an optimizer step is the mean over *all* labelled tokens of the global batch
(every rank, every micro-batch), so the gradient does not depend on how the batch is
split over ranks and accumulation steps: a 2-rank run and a 1-process run with the same
global batch take the same steps.

What the loop does when something goes wrong:

* a non-finite loss on any rank, or a non-finite gradient, skips the whole optimizer step
  (nothing changes but the data position; ``train/skipped_steps`` counts them); after
  ``train.max_nonfinite_steps`` in a row the run stops with a :class:`TrainingError`
  naming the step and the training samples (a non-finite loss) or the DuDe layer whose
  gradient is non-finite (:mod:`dude_dist.layer_grads`), without writing a checkpoint for it;
* SIGTERM (SLURM preemption, ``scancel``, torchrun's shutdown) checkpoints at the next
  step boundary and exits cleanly; ``--resume auto`` continues from there;
* a rank that dies ends the others at their next collective with an error naming it
  (ranks on this host are checked by pid), instead of a hang until ``deepspeed.timeout_s``.

Fault injection for tests (environment variables): ``DUDE_FAULT_CKPT_CRASH=<step>`` dies
between a checkpoint's files and its commit; ``DUDE_FAULT_NAN_STEPS=5,6,7`` multiplies the
loss of the last micro-batch of the highest rank at those (1-based) steps by NaN;
``DUDE_FAULT_INF_GRAD=5,6,7@<layer>`` makes that layer's gradient non-finite instead.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from dude_dist import checkpoint as ckpt_lib
from dude_dist.adapters import get_dude_layers, inject_and_init
from dude_dist.config import RunConfig, batch_layout, config_to_dict
from dude_dist.distributed import DistEnv, init_distributed
from dude_dist.errors import DudeError, TrainingError
from dude_dist.evaluate import accepts_logits_to_keep, token_loss_sum
from dude_dist.layer_grads import LayerGradNorms
from dude_dist.models import load_model, load_tokenizer
from dude_dist.sampler import StepSampler
from dude_dist.sharded_init import Comm, cache_key
from dude_dist.tracking import Tracker, peak_memory_bytes, setup_logging

logger = logging.getLogger(__name__)

# Keys whose change makes a checkpoint meaningless for this run (checked on resume).
RESUME_KEYS = ("model.name_or_path", "model.revision", "model.gguf_file", "adapter.targets", "adapter.rank",
               "adapter.variant", "adapter.svd", "adapter.seed")



def _lookup(cfg_dict: dict, dotted: str):
    node = cfg_dict
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


RUN_OUTPUTS = ("metrics.jsonl", "tensorboard", "checkpoints", "summary.json", "eval_start.json", "eval_end.json")


def archive_previous_run(output_dir: Path) -> None:
    """Move a previous run's outputs aside (never delete) before starting again at step 0.

    The factor cache (``dude_init``) stays: it is keyed, and reused only if it matches.
    """
    present = [name for name in RUN_OUTPUTS if (output_dir / name).exists()]
    if not present:
        return
    dest = output_dir / "previous" / time.strftime("%Y%m%d-%H%M%S")
    dest.mkdir(parents=True, exist_ok=True)
    for name in present:
        os.replace(output_dir / name, dest / name)
    logger.warning("output_dir held an earlier run; moved %s to %s", ", ".join(present), dest)


def check_output_dir(output_dir: Path) -> None:
    """Fail before any compute if the output directory cannot be written."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write_test.{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise TrainingError(f"output_dir {str(output_dir)!r} is not writable: {exc}") from None


def _all_reduce(values: list[float], op=dist.ReduceOp.SUM) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op)
    return t.tolist()


def _fault_steps(name: str) -> set[int]:
    return {int(s) for s in os.environ.get(name, "").split(",") if s.strip()}


@dataclass
class StepResult:
    """One optimizer step. ``skipped``: DeepSpeed did not apply it; ``nonfinite``: the reason
    was a non-finite loss or gradient (not an fp16 loss-scale overflow), described by ``problem``."""

    loss: float
    grad_norm: float
    lr: float
    tokens: int
    step_time: float
    skipped: bool = False
    nonfinite: bool = False
    problem: str = ""
    extra: dict = field(default_factory=dict)


class Trainer:
    """Builds everything from a :class:`RunConfig` and trains only the DuDe parameters.

    Args:
        cfg: the run config.
        resume: ``auto`` (newest complete checkpoint under ``output_dir``, if any),
            ``none``, or a checkpoint directory.
        force_resume: resume even if the checkpoint was made with different model/adapter keys.
    """

    def __init__(self, cfg: RunConfig, resume: str = "auto", force_resume: bool = False) -> None:
        t_start = time.perf_counter()
        self.cfg = cfg
        self.env: DistEnv = init_distributed(cfg.deepspeed.backend, cfg.deepspeed.timeout_s)
        setup_logging(self.env.rank)
        self.rank, self.world = self.env.rank, self.env.world_size
        self.peers = self._gather_peers()
        self.output_dir = Path(cfg.output_dir)
        if self.rank == 0:
            check_output_dir(self.output_dir)
        self._barrier()
        self.layout = batch_layout(cfg.train, self.world)
        self.device = torch.device(f"cuda:{self.env.local_rank}" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(cfg.train.seed)
        self.ckpt_root = self.output_dir / "checkpoints"
        # A checkpoint that does not fit this config (or fails the pickle check) is refused
        # before anything heavy loads.
        resume_from = self._find_resume(resume, force_resume)

        # Data first: a bad file or field fails before the model is loaded.
        from dude_dist.data import build_datasets, collate_batch

        self.tokenizer = load_tokenizer(cfg.model)
        data = build_datasets(cfg.data, self.tokenizer)
        self.train_set, self.eval_set = data.train, data.eval
        self.collate = collate_batch
        self.sampler = StepSampler(len(self.train_set), self.layout, cfg.train.seed)
        self.total_steps = cfg.train.max_steps or max(1, int(cfg.train.epochs * self.sampler.steps_per_epoch))
        logger.info("data: %d training samples, %d steps of %d (micro %d x accum %d x %d ranks)",
                    len(self.train_set), self.total_steps, self.layout.global_batch_size,
                    self.layout.micro_batch_size, self.layout.grad_accum, self.world)

        if resume_from is None and self.rank == 0:
            archive_previous_run(self.output_dir)
        self._barrier()
        self.engine = self._build_engine()
        self.tracker = Tracker(self.output_dir, self.rank)
        self.tracker.log(0, self.init_scalars)
        self.start_step = 0
        if resume_from is not None:
            ckpt_lib.load_checkpoint(self.engine, resume_from, self.rank)
            self.start_step = int(ckpt_lib.read_meta(resume_from)["step"])
            logger.info("resumed from %s at step %d", resume_from, self.start_step)
        self._fault_nan_steps = _fault_steps("DUDE_FAULT_NAN_STEPS")
        self.layer_grads = LayerGradNorms(self.engine.module, self.rank, self.world)
        self._keep_logits = accepts_logits_to_keep(self.engine.module)
        self._step = self.start_step
        self._stop_requested = False
        signal.signal(signal.SIGTERM, self._on_sigterm)
        self.startup_seconds = time.perf_counter() - t_start
        logger.info("start-up took %.1f s", self.startup_seconds)

    # ------------------------------------------------------------------ build

    def _build_engine(self):
        from transformers import get_cosine_schedule_with_warmup

        from dude_dist.zero import build_ds_config, initialize_engine, model_init_context

        cfg = self.cfg
        self.ds_config = build_ds_config(cfg, self.layout)
        with model_init_context(self.ds_config) as hf_ds_config:
            model = load_model(cfg.model)
            del hf_ds_config  # from_pretrained is done; transformers needed it alive until here
        key = cache_key(cfg.adapter, cfg.model.name_or_path, cfg.model.revision, cfg.model.dtype,
                        [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)])
        self.cache_key = key
        self.init_stats = inject_and_init(model, cfg.adapter, comm=Comm(), cache_dir=self.output_dir / "dude_init",
                                          cache_key=key)
        self.trainable = self.init_stats.trainable_params
        if cfg.train.gradient_checkpointing:
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, betas=cfg.train.betas,
                                      weight_decay=cfg.train.weight_decay)
        warmup = math.ceil(cfg.train.warmup_ratio * self.total_steps)
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, self.total_steps)
        engine = initialize_engine(model, optimizer, scheduler, self.ds_config)
        stats = self.init_stats
        self.init_scalars = {
            "init/wall_seconds": stats.wall_seconds,
            "init/svd_count": stats.svd_count,
            "init/bytes_broadcast": stats.bytes_broadcast,
            "init/bytes_residual_broadcast": stats.bytes_residual_broadcast,
            "init/bytes_gathered": stats.bytes_gathered,
            "init/energy_mean": (sum(stats.energy.values()) / len(stats.energy)) if stats.energy else 0.0,
            "init/trainable_params": self.trainable,
            **{f"init/svd_seconds_rank{r}": s for r, s in enumerate(stats.svd_seconds_per_rank)},
        }
        logger.info("trainable parameters: %d in %d DuDe layers", self.trainable, self.init_stats.layers)
        return engine

    def _fingerprint(self) -> dict:
        cfg_dict = config_to_dict(self.cfg)
        return {k: _lookup(cfg_dict, k) for k in RESUME_KEYS}

    def _find_resume(self, resume: str, force: bool) -> Path | None:
        """The checkpoint to continue from (None: start at step 0), checked against this config."""
        if resume == "none":
            return None
        ckpt = ckpt_lib.find_resume(self.ckpt_root) if resume == "auto" else Path(resume)
        if ckpt is None:
            return None
        if not (ckpt / ckpt_lib.META).is_file():
            raise TrainingError(f"--resume {resume}: {ckpt} is not a complete checkpoint (no {ckpt_lib.META})")
        meta = ckpt_lib.read_meta(ckpt)
        saved = meta.get("fingerprint", {})
        now = self._fingerprint()
        differ = [k for k in RESUME_KEYS if k in saved and saved[k] != now[k]]
        if differ and not force:
            detail = "; ".join(f"{k}: checkpoint {saved[k]!r} vs config {now[k]!r}" for k in differ)
            raise TrainingError(f"refusing to resume from {ckpt}: {detail} (pass --force-resume to override)")
        ckpt_lib.verify_checkpoint_files(ckpt)
        return ckpt

    def _gather_peers(self) -> list[tuple[str, int]]:
        """(host, pid) of every rank, so a rank that dies can be named by the others."""
        me = (socket.gethostname(), os.getpid())
        if self.world == 1:
            return [me]
        peers: list = [None] * self.world
        dist.all_gather_object(peers, me)
        return peers

    # ------------------------------------------------------------------ loop pieces

    def batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches for optimizer step ``step`` (0-based)."""
        pad = self.tokenizer.pad_token_id
        out = []
        for indices in self.sampler.micro_batches(step, self.rank):
            batch = self.collate([self.train_set[i] for i in indices], pad)
            out.append({k: v.to(self.device) for k, v in batch.items()})
        return out

    def _loss_sum(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        return token_loss_sum(self.engine, batch, self._keep_logits)

    def forward_backward(self, step: int, micro_batches: list[dict[str, torch.Tensor]]
                         ) -> tuple[float, int, int, list[int]]:
        """Accumulate gradients of (summed token loss / global labelled tokens).

        DeepSpeed divides by the accumulation steps and averages over ranks; the
        ``world * accum`` factor undoes both, leaving the exact global token mean.

        Before each backward every rank learns whether any rank's loss is non-finite (one
        all-reduce of a per-rank flag). From the first such micro-batch on, every rank
        backpropagates a NaN loss, so ZeRO finds a non-finite gradient norm and skips the
        optimizer step as it skips an fp16 overflow: no parameter, optimizer-state or LR
        change, ``engine.skipped_steps`` + 1. Every backward/step call is still made, so
        DeepSpeed's micro-step and accumulation counters stay in step.

        Returns:
            mean loss, global labelled tokens, global tokens, and the training-set indices
            of the micro-batches (any rank) whose loss was non-finite.
        """
        local_targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)
        local_tokens = sum(int(b["attention_mask"].sum()) for b in micro_batches)
        global_targets, global_tokens = _all_reduce([local_targets, local_tokens])
        scale = self.world * self.layout.grad_accum / max(global_targets, 1.0)
        inject_nan = step + 1 in self._fault_nan_steps and self.rank == self.world - 1
        loss_sum = 0.0
        bad_samples: list[int] = []
        for micro, batch in enumerate(micro_batches):
            loss, _ = self._loss_sum(batch)
            if inject_nan and micro == len(micro_batches) - 1:
                loss = loss * float("nan")
            flags = [0.0] * self.world
            flags[self.rank] = 0.0 if bool(torch.isfinite(loss.detach())) else 1.0
            for rank, flag in enumerate(_all_reduce(flags)):
                if flag:
                    bad_samples += self.sampler.micro_batches(step, rank)[micro]
            if bad_samples:
                if not hasattr(self.engine.optimizer, "overflow"):
                    raise TrainingError(
                        f"non-finite loss at step {step + 1} in training samples {sorted(bad_samples)}; with "
                        f"deepspeed.zero_stage={self.cfg.deepspeed.zero_stage} and model.dtype={self.cfg.model.dtype} "
                        "DeepSpeed cannot skip a step, so the run stops here (no checkpoint written)")
                loss = loss * float("nan")
            self.engine.backward(loss * scale)
            self.engine.step()
            loss_sum += float(loss.detach())
        (total,) = _all_reduce([loss_sum])
        return total / max(global_targets, 1.0), int(global_targets), int(global_tokens), sorted(bad_samples)

    def step(self, step: int) -> StepResult:
        """Optimizer step ``step`` (0-based); reports whether DeepSpeed skipped it, and why."""
        t0 = time.perf_counter()
        lr = float(self.engine.get_lr()[0])
        self.layer_grads.reset(step)
        loss, _, tokens, bad_samples = self.forward_backward(step, self.batches(step))
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        skipped = not self.engine.was_step_applied()
        number = step + 1
        if bad_samples and not skipped:
            raise TrainingError(
                f"non-finite loss at step {number} in training samples {bad_samples}, and DeepSpeed applied the "
                f"update anyway (deepspeed.zero_stage={self.cfg.deepspeed.zero_stage}, "
                f"model.dtype={self.cfg.model.dtype}): the parameters may be non-finite; stopping without a "
                "checkpoint")
        if bad_samples:
            problem = f"non-finite loss at step {number} in training samples {bad_samples}"
        elif skipped and self.cfg.model.dtype != "float16":
            problem = f"non-finite gradient norm at step {number} (the loss was finite): {self.layer_grads.worst()}"
        else:  # an fp16 loss-scale overflow: DeepSpeed lowers the scale; that is routine
            problem = ""
        return StepResult(loss=loss, grad_norm=grad_norm, lr=lr, tokens=tokens, step_time=time.perf_counter() - t0,
                          skipped=skipped, nonfinite=bool(problem), problem=problem)

    @torch.no_grad()
    def evaluate_loss(self) -> dict[str, float]:
        """Token-weighted loss on the held-out set, sharded over ranks (every rank runs
        the same number of forwards, padding with label-free batches, as ZeRO-3 requires)."""
        if self.eval_set is None or len(self.eval_set) == 0:
            return {}
        self.engine.eval()
        micro = self.layout.micro_batch_size
        n = len(self.eval_set)
        rounds = math.ceil(n / (micro * self.world))
        loss_sum, targets = 0.0, 0
        pad = self.tokenizer.pad_token_id
        for b in range(rounds):
            start = (b * self.world + self.rank) * micro
            idx = list(range(start, min(start + micro, n)))
            samples = [self.eval_set[i] for i in idx] or [self.eval_set[0]]
            batch = {k: v.to(self.device) for k, v in self.collate(samples, pad).items()}
            if not idx:
                batch["labels"].fill_(-100)
            loss, count = self._loss_sum(batch)
            loss_sum += float(loss)
            targets += count
        self.engine.train()
        total, count = _all_reduce([loss_sum, targets])
        mean = total / max(count, 1.0)
        return {"eval/loss": mean, "eval/perplexity": math.exp(min(mean, 50.0))}

    def evaluate_accuracy(self, when: str) -> dict[str, float]:
        """Generation accuracy on the configured tasks (every rank runs, ZeRO-3 stays in step)."""
        from dude_dist.evaluate import run_eval

        self.engine.eval()
        model = self.engine.module
        synced = self.world > 1 and self.ds_config["zero_optimization"]["stage"] == 3
        weight_bytes = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in model.parameters())
        if synced and weight_bytes <= self.cfg.eval.gather_below_gb * 2**30:
            from dude_dist.export import merged_copy

            model, synced = merged_copy(model).to(self.device), False
        results = run_eval(model, self.tokenizer, self.cfg.eval, synced_gpus=synced)
        del model
        self.engine.train()
        scalars = {f"eval/{task}_accuracy": res["accuracy"] for task, res in results.items()}
        if self.rank == 0:
            import json

            path = self.output_dir / f"eval_{when}.json"
            ckpt_lib.write_text_atomic(path, json.dumps(results, indent=1))
            for task, res in results.items():
                logger.info("eval (%s) %s: accuracy %.3f on %d items", when, task, res["accuracy"], res["n"])
        return scalars

    def save(self, step: int) -> None:
        meta = {"fingerprint": self._fingerprint(), "samples_seen": step * self.layout.global_batch_size,
                "config": config_to_dict(self.cfg), "world_size": self.world}
        fail = os.environ.get("DUDE_FAULT_CKPT_CRASH") == str(step)
        from dude_dist.export import DUDE_PARAMS_FILE, save_dude_params

        ckpt_lib.save_checkpoint(
            self.engine, self.ckpt_root, step, meta, self.rank, self.cfg.train.keep_last,
            write_extra=lambda d: save_dude_params(self.engine.module, d / DUDE_PARAMS_FILE, self.rank),
            fail_after_files=fail)

    def _on_sigterm(self, signum, frame) -> None:
        logger.warning("SIGTERM received: will checkpoint at the next step boundary and exit")
        self._stop_requested = True

    def _should_stop(self) -> bool:
        (flag,) = _all_reduce([1.0 if self._stop_requested else 0.0], op=dist.ReduceOp.MAX)
        return flag > 0

    # ------------------------------------------------------------------ train

    def train(self) -> dict:
        """Run from ``start_step`` to ``total_steps``; return a summary (also written to summary.json).

        Raises:
            TrainingError: too many non-finite steps in a row, or a peer rank was lost (the
                message names it when it ran on this host).
        """
        try:
            return self._train()
        except RuntimeError as exc:
            if self.world > 1 and not isinstance(exc, DudeError) and _is_comm_failure(exc):
                raise self._lost_peer_error(exc) from exc
            raise

    def _lost_peer_error(self, exc: BaseException) -> TrainingError:
        """Name the ranks that are gone (those on this host are checked by pid)."""
        import psutil

        host = socket.gethostname()
        gone = []
        for rank, (peer_host, pid) in enumerate(self.peers):
            if rank == self.rank or peer_host != host:
                continue
            try:
                alive = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                alive = False
            if not alive:
                gone.append(f"rank {rank} (pid {pid})")
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        if gone:
            who = f"lost {', '.join(gone)}: the process has exited"
        elif "timed out" in str(exc).lower() or "timeout" in str(exc).lower():
            who = (f"a collective timed out after deepspeed.timeout_s={self.cfg.deepspeed.timeout_s} s: "
                   "a peer rank died or hangs")
        else:
            who = "a peer rank died or became unreachable"
        latest = ckpt_lib.find_resume(self.ckpt_root)
        kept = f"the newest complete checkpoint is {latest.name}" if latest else "no checkpoint was written yet"
        return TrainingError(f"rank {self.rank}: {who} (during step {self._step + 1}; {first_line}); {kept}; "
                             "restart with --resume auto")

    def _train(self) -> dict:
        from tqdm import tqdm

        cfg = self.cfg.train
        summary: dict = {"init": self.init_stats.to_dict(), "start_step": self.start_step,
                         "startup_seconds": self.startup_seconds}
        if self.cfg.eval.at_start and self.start_step == 0:
            summary["eval_start"] = self.evaluate_accuracy("start")
            self.tracker.log(0, summary["eval_start"])
        if self.start_step == 0 and self.eval_set is not None:
            first_eval = self.evaluate_loss()
            summary["eval_loss_start"] = first_eval.get("eval/loss")
            self.tracker.log(0, first_eval)
        bar = tqdm(total=self.total_steps, initial=self.start_step, disable=self.rank != 0,
                   desc="train", dynamic_ncols=True)
        losses: list[float] = []
        step = self.start_step
        last_saved = self.start_step
        stopped = False
        nonfinite_streak: list[int] = []  # consecutive steps skipped for a non-finite loss or gradient
        self.engine.train()
        while step < self.total_steps:
            self._step = step
            result = self.step(step)
            step += 1
            losses.append(result.loss)
            if not result.skipped:
                nonfinite_streak = []
            elif result.nonfinite:
                nonfinite_streak.append(step)
                logger.warning("step %d skipped: %s (%d in a row; train.max_nonfinite_steps=%d)", step,
                               result.problem, len(nonfinite_streak), cfg.max_nonfinite_steps)
            tok_s = result.tokens / max(result.step_time, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{result.loss:.4f}", gnorm=f"{result.grad_norm:.3f}", tok_s=f"{tok_s:.0f}")
            if step % cfg.log_every == 0 or step == self.total_steps or result.skipped:
                self.tracker.log(step, {
                    "train/loss": result.loss, "train/grad_norm": result.grad_norm, "train/lr": result.lr,
                    "train/tokens_per_s": tok_s, "train/step_time_s": result.step_time,
                    "train/memory_bytes": peak_memory_bytes(), "train/skipped_steps": self.engine.skipped_steps,
                })
            if len(nonfinite_streak) >= cfg.max_nonfinite_steps:
                # Checked before any save: the failing step gets no checkpoint. (A checkpoint
                # written at an earlier skipped step holds the parameters from before the streak.)
                bar.close()
                latest = ckpt_lib.find_resume(self.ckpt_root)
                kept = f"The newest checkpoint, {latest.name}," if latest else "No checkpoint"
                raise TrainingError(
                    f"{result.problem}: {len(nonfinite_streak)} steps in a row skipped (steps {nonfinite_streak[0]}-"
                    f"{nonfinite_streak[-1]}), train.max_nonfinite_steps={cfg.max_nonfinite_steps}; stopping. "
                    f"{kept} holds the parameters from before step {nonfinite_streak[0]}")
            if cfg.eval_every and step % cfg.eval_every == 0 and step != self.total_steps:
                self.tracker.log(step, self.evaluate_loss())
            if cfg.save_every and step % cfg.save_every == 0:
                self.save(step)
                last_saved = step
            if self._should_stop():
                if last_saved != step:
                    self.save(step)
                    last_saved = step
                stopped = True
                logger.warning("stopped at step %d after SIGTERM; resume with --resume auto", step)
                break
        bar.close()
        if not stopped:
            if last_saved != step:
                self.save(step)
            final_eval = self.evaluate_loss()
            if final_eval:
                self.tracker.log(step, final_eval)
                summary["eval_loss_end"] = final_eval["eval/loss"]
            if self.cfg.eval.at_end:
                summary["eval_end"] = self.evaluate_accuracy("end")
                self.tracker.log(step, summary["eval_end"])
        summary.update({"end_step": step, "stopped": stopped, "losses": losses,
                        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None})
        if self.rank == 0:
            import json

            ckpt_lib.write_text_atomic(self.output_dir / "summary.json", json.dumps(summary, indent=1))
        self.tracker.close()
        return summary

    def _barrier(self) -> None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()


# What gloo and NCCL say when a peer is gone or a collective times out.
_COMM_FAILURE_TEXT = ("connection closed by peer", "connection reset by peer", "broken pipe", "timed out",
                      "operation timeout", "nccl error", "ncclremoteerror")


def _is_comm_failure(exc: BaseException) -> bool:
    """Whether ``exc`` came out of a collective whose peer is gone (gloo/NCCL/store errors)."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()
    return any(marker in text for marker in _COMM_FAILURE_TEXT)


def get_layers(engine) -> dict:
    """DuDe layers of a trained engine's module (for tools and tests)."""
    return get_dude_layers(engine.module)


def main(cfg: RunConfig, resume: str = "auto", force_resume: bool = False) -> dict:
    """Train and return the summary; the process group is torn down on the way out."""
    try:
        trainer = Trainer(cfg, resume=resume, force_resume=force_resume)
        summary = trainer.train()
        if trainer.rank == 0:
            held_out = ""
            if summary.get("eval_loss_start") is not None and summary.get("eval_loss_end") is not None:
                held_out = f", held-out loss {summary['eval_loss_start']:.4f} -> {summary['eval_loss_end']:.4f}"
            logger.info("done: steps %d-%d, training loss %.4f -> %.4f%s; output in %s", summary["start_step"],
                        summary["end_step"], summary["first_loss"] or float("nan"),
                        summary["last_loss"] or float("nan"), held_out, cfg.output_dir)
        return summary
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
