"""The training loop: ``batches -> forward_backward -> step -> train``.

    python launch/train.py --config configs/tiny_cpu.yaml                # 1 process
    deepspeed --num_gpus 8 launch/train.py --config configs/qwen32b.yaml # ZeRO-3, one node
    torchrun --nproc_per_node 2 launch/train.py --config configs/tiny_cpu.yaml

Construction reads as a table of contents: the run directory (locked for this run), the
checkpoint to resume from, the data, the model with its DuDe layers, the DeepSpeed engine,
the restored state. Then :meth:`Trainer.train` runs optimizer steps; saving, evaluating and
stopping are small decisions taken at each step boundary.

The loss of an optimizer step is the mean over *all* labelled tokens of the global batch
(every rank, every micro-batch), so the gradient does not depend on how the batch is
split over ranks and accumulation steps: a 2-rank run and a 1-process run with the same
global batch take the same steps. The number of labelled tokens of the global batch is
counted on the host from the samples, so the step waits on no collective for it, and one
all-reduce per step carries everything the logs need (loss, stop request, non-finite flags).

What the loop does when something goes wrong:

* a non-finite loss on any rank, or a non-finite gradient, skips the whole optimizer step
  (nothing changes but the data position; ``train/skipped_steps`` counts them); after
  ``train.max_nonfinite_steps`` in a row the run stops with a :class:`TrainingError`
  naming the step and the training samples (a non-finite loss) or the DuDe layer whose
  gradient is non-finite (:mod:`dude_dist.layer_grads`), without writing a checkpoint for it;
* SIGTERM, a first Ctrl-C, or a launcher that died: checkpoint at the next step boundary
  and exit cleanly (:mod:`dude_dist.failures`); ``--resume auto`` continues from there;
* a rank that dies ends the others at their next collective with an error naming it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

import psutil
import torch
from tqdm import tqdm

from dude_dist import checkpoint as ckpt_lib
from dude_dist import comm
from dude_dist.adapters import adapter_parameters
from dude_dist.config import RunConfig, batch_layout
from dude_dist.data import build_datasets, collate_batch
from dude_dist.distributed import DistEnv, init_distributed, on_each_node_first, set_step_timeout
from dude_dist.dynamics import DudeDynamics
from dude_dist.errors import DudeError, TrainingError
from dude_dist.evaluate import TrainingEvaluator
from dude_dist.export import write_adapter_files
from dude_dist.failures import Faults, NonFiniteStreak, StopRequests, is_comm_failure, lost_peer_error, step_problem
from dude_dist.layer_grads import LayerGradNorms, grad_norm_of
from dude_dist.loss import LossInputs, logits_to_keep_support, loss_inputs, summed_loss
from dude_dist.models import load_model, load_tokenizer, prefetch_model
from dude_dist.planner import check_replicated_model_fits
from dude_dist.run_dir import RunDir
from dude_dist.sampler import StepSampler
from dude_dist.sharded_init import Comm, cache_key, inject_and_init
from dude_dist.throughput import StepThroughput
from dude_dist.tracking import Tracker, done_line, peak_memory_bytes
from dude_dist.zero import build_ds_config, initialize_engine, model_init_context, single_gpu_zero3_hint

logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    """One optimizer step. ``skipped``: DeepSpeed did not apply it; ``nonfinite``: the reason
    was a non-finite loss or gradient (not an fp16 loss-scale overflow), described by ``problem``;
    ``stop``: some rank asked to stop after this step; ``dynamics``: the ``dude/*`` scalars (rank 0)."""

    loss: float
    grad_norm: float
    lr: float
    tokens: int
    step_time: float
    skipped: bool = False
    nonfinite: bool = False
    problem: str = ""
    stop: bool = False
    dynamics: dict = field(default_factory=dict)


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
        self.rank, self.world = self.env.rank, self.env.world_size
        self.peers = comm.all_gather_object((self.env.hostname, self.env.pid))
        self.run_dir = RunDir(cfg.output_dir)
        self.run_dir.acquire_for_ranks(self.rank, comm.broadcast_object)
        self.layout = batch_layout(cfg.train, self.world)
        self.device = self.env.device
        torch.manual_seed(cfg.train.seed)
        # A checkpoint that does not fit this config (or is damaged) is refused before anything heavy loads.
        self.resume_from = ckpt_lib.select_checkpoint(self.run_dir.checkpoints, resume, cfg, self.world, force_resume)
        self.start_step = int(ckpt_lib.read_meta(self.resume_from)["step"]) if self.resume_from else 0
        self._setup_data()
        if self.resume_from is None and self.rank == 0:
            self.run_dir.archive_previous()
        comm.barrier()
        self.engine = self._setup_engine()
        self.trainable = adapter_parameters(self.engine.module)
        self.tracker = Tracker(self.run_dir, self.rank, resume_step=self.start_step if self.resume_from else None)
        self.dynamics = DudeDynamics.for_run(  # rank 0 logs dude/* against the step-0 DuDe tensors
            self.engine.module, self.run_dir.dynamics_reference,
            RunDir.of_checkpoint(self.resume_from).dynamics_reference if self.resume_from else None,
        ) if self.rank == 0 and cfg.train.log_dynamics else None
        if self.resume_from is not None:
            ckpt_lib.load_checkpoint(self.engine, self.resume_from, self.rank, trainable=self.trainable)
            logger.info("resumed from %s at step %d", self.resume_from, self.start_step)
        else:
            self.tracker.log(0, self.init_scalars)
        self.faults = Faults.from_env()
        self.layer_grads = LayerGradNorms(self.engine.module, self.rank, self.world)
        self._keep_logits = logits_to_keep_support(self.engine.module)
        self.evaluator = TrainingEvaluator(self.engine, self.eval_set, self.tokenizer, cfg, self.ds_config,
                                           self.env, self.run_dir, self._keep_logits)
        self._can_skip = hasattr(self.engine.optimizer, "overflow")
        # DeepSpeed's ZeRO optimizers report the gradient norm; with ZeRO off (fp32 only, see
        # RunConfig) the engine clips without keeping it, so the trainer measures it before the step
        self._own_grad_norm = self.engine.zero_optimization_stage() == 0
        self._step = self.start_step
        self.stops = StopRequests(self.env.launcher)
        self.throughput = StepThroughput(self.engine.module, self.sampler, self.counts, self.world, self.device,
                                         cfg.train.gradient_checkpointing, cfg.train.peak_tflops)
        set_step_timeout(cfg.deepspeed.step_timeout_s)
        self.startup_seconds = time.perf_counter() - t_start
        logger.info("start-up took %.1f s", self.startup_seconds)

    # ------------------------------------------------------------------ setup steps

    def _setup_data(self) -> None:
        """Tokenizer and datasets (built once per node first, so a hub download or a datasets
        cache is written once), the sampler, and the number of steps. A bad file or field
        fails here, before the model loads."""
        cfg = self.cfg
        with on_each_node_first(self.env):
            prefetch_model(cfg.model)
            self.tokenizer = load_tokenizer(cfg.model)
            data = build_datasets(cfg.data, self.tokenizer, seed=cfg.train.seed)
        self.train_set, self.eval_set = data.train, data.eval
        self.counts = data.counts  # tokens and targets of every row, for the host-side step counts
        self.sampler = StepSampler(len(self.train_set), self.layout, cfg.train.seed,
                                   lengths=data.counts.tokens if cfg.data.group_by_length else None)
        self.total_steps = cfg.train.max_steps or max(1, int(cfg.train.epochs * self.sampler.steps_per_epoch))
        if self.start_step >= self.total_steps:
            raise TrainingError(
                f"nothing to do: checkpoint {self.resume_from} is at step {self.start_step} and the run ends at step "
                f"{self.total_steps} (train.max_steps / train.epochs); raise train.max_steps to train on, or start "
                "over with --resume none")
        logger.info("data: %d training %s, %d steps of %d (micro %d x accum %d x %d ranks)",
                    len(self.train_set), "rows of packed samples" if cfg.data.packing else "samples",
                    self.total_steps, self.layout.global_batch_size,
                    self.layout.micro_batch_size, self.layout.grad_accum, self.world)

    def _setup_engine(self):
        """Model (under ``zero.Init`` for ZeRO-3), DuDe layers and their init, checkpointing,
        optimizer, schedule, and the DeepSpeed engine."""
        cfg = self.cfg
        check_replicated_model_fits(cfg, self.world, self.env.ranks_per_node, psutil.virtual_memory().total,
                                    torch.cuda.get_device_properties(self.device).total_memory
                                    if self.device.type == "cuda" else None)
        self.ds_config = build_ds_config(cfg, self.layout)
        hint = single_gpu_zero3_hint(self.ds_config, self.world, self.device.type)
        if hint and self.rank == 0:
            logger.warning(hint)
        with model_init_context(self.ds_config) as hf_ds_config:  # every rank at once: zero.Init partitions
            model = load_model(cfg.model)
            del hf_ds_config  # from_pretrained is done; transformers needed it alive until here
        self.cache_key = cache_key(cfg.adapter, cfg.model.name_or_path, cfg.model.revision, cfg.model.dtype,
                                   [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)])
        self.init_stats = inject_and_init(model, cfg.adapter, comm=Comm(), cache_dir=self.run_dir.factor_cache,
                                          cache_key=self.cache_key)
        engine = initialize_engine(model, cfg.train, self.total_steps, self.ds_config)
        stats = self.init_stats
        self.init_scalars = stats.scalars()
        logger.info("trainable parameters: %d in %d DuDe layers", stats.trainable_params, stats.layers)
        return engine

    def _logs(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based) is logged."""
        return step % self.cfg.train.log_every == 0 or step == self.total_steps

    # ------------------------------------------------------------------ one step

    def batches(self, step: int) -> list[LossInputs]:
        """This rank's micro-batches for optimizer step ``step`` (0-based), counted on the host
        and then moved to the device. Packed rows carry per-sample ``position_ids`` and the
        samples' cumulative lengths for variable-length attention (:mod:`dude_dist.attention`)."""
        pad, attn = self.tokenizer.pad_token_id, self.cfg.model.attn_implementation
        return [loss_inputs(collate_batch([self.train_set[i] for i in indices], pad), self.device, self._keep_logits,
                            attn_implementation=attn)
                for indices in self.sampler.micro_batches(step, self.rank)]

    def global_counts(self, step: int) -> tuple[int, int]:
        """Labelled targets and real tokens of the whole global batch of ``step``, from the
        rows' host-side counts (every rank has the data): no collective, no device sync. A
        packed row counts the targets of its samples, so the loss is the same token mean as
        over the same samples padded."""
        rows = self.sampler.global_batch(step)
        return int(self.counts.targets[rows].sum()), int(self.counts.tokens[rows].sum())

    def forward_backward(self, step: int, micro_batches: list[LossInputs]
                         ) -> tuple[float, int, int, list[int], bool, float]:
        """Accumulate gradients of (summed token loss / global labelled tokens) and step.

        DeepSpeed divides by the accumulation steps and averages over ranks; the
        ``world * accum`` factor undoes both, leaving the exact global token mean.

        A micro-batch whose loss is non-finite backpropagates NaN (its loss times NaN, decided
        on the device), so ZeRO's reduction spreads it to every rank, finds a non-finite
        gradient norm and skips the optimizer step as it skips an fp16 overflow: no parameter,
        optimizer-state or LR change. One all-reduce at the end tells every rank the summed
        loss, which micro-batches were non-finite, and whether any rank asked to stop; one
        copy to the host reads it together with the gradient norm.

        Returns:
            mean loss, global labelled tokens, global tokens, the training-set indices of the
            micro-batches (any rank) whose loss was non-finite, the stop decision, and the
            gradient norm.
        """
        global_targets, global_tokens = self.global_counts(step)
        scale = self.world * self.layout.grad_accum / max(global_targets, 1)
        accum = len(micro_batches)
        inject_nan = step + 1 in self.faults.nan_steps and self.rank == self.world - 1
        # [summed loss, stop request, a non-finite flag per (rank, micro-batch)], on the device
        stats = torch.zeros(2 + self.world * accum, dtype=torch.float64, device=self.device)
        own_norm = None
        for micro, inputs in enumerate(micro_batches):
            loss = summed_loss(self.engine, inputs)
            if inject_nan and micro == accum - 1:
                loss = loss * float("nan")
            bad = ~torch.isfinite(loss.detach())
            stats[2 + self.rank * accum + micro] = bad.double()
            if not self._can_skip:
                self._refuse_unskippable(step, stats[2:], accum)
            loss = loss * torch.where(bad, float("nan"), 1.0)
            self.engine.backward(loss * scale)
            if self._own_grad_norm and self.engine.is_gradient_accumulation_boundary():
                own_norm = grad_norm_of(list(self.trainable.values()))  # reduced over ranks by now: global
            self.engine.step()
            stats[0] += loss.detach().double()
        stats[1].fill_(1.0 if self.stops.requested() else 0.0)
        comm.all_reduce(stats)
        grad_norm = self.engine.get_global_grad_norm() if own_norm is None else own_norm
        if isinstance(grad_norm, torch.Tensor):
            values = torch.cat([stats, grad_norm.detach().reshape(1).to(stats)]).tolist()
        else:
            values = stats.tolist() + [float("nan") if grad_norm is None else float(grad_norm)]
        bad_samples = sorted(i for slot, flag in enumerate(values[2:-1]) if flag
                             for i in self.sampler.micro_batches(step, slot // accum)[slot % accum])
        return (values[0] / max(global_targets, 1), global_targets, global_tokens, bad_samples, values[1] > 0,
                values[-1])

    def _refuse_unskippable(self, step: int, flags: torch.Tensor, accum: int) -> None:
        """Without a step-skipping optimizer (ZeRO off, fp32) a non-finite loss must stop the run
        before DeepSpeed applies it; this costs a collective and a sync per micro-batch."""
        seen = comm.all_reduce(flags.clone()).tolist()
        bad = [self.sampler.micro_batches(step, slot // accum)[slot % accum] for slot, f in enumerate(seen) if f]
        if bad:
            raise TrainingError(
                f"non-finite loss at step {step + 1} in {self.describe_rows(sorted(i for b in bad for i in b))}; with "
                f"deepspeed.zero_stage={self.cfg.deepspeed.zero_stage} and model.dtype={self.cfg.model.dtype} "
                "DeepSpeed cannot skip a step, so the run stops here (no checkpoint written)")

    def describe_rows(self, rows: list[int]) -> str:
        """Training rows in words for a message ("" for none): their sample indices, and for
        packed rows also the row indices."""
        if not rows:
            return ""
        if "sample_ids" not in self.train_set.column_names:
            return f"training samples {rows}"
        samples = sorted(i for r in rows for i in self.train_set[r]["sample_ids"])
        return f"packed rows {rows} (training samples {samples})"

    def step(self, step: int) -> StepResult:
        """Optimizer step ``step`` (0-based); reports whether DeepSpeed skipped it, and why."""
        t0 = time.perf_counter()
        lr = float(self.engine.get_lr()[0])
        self.layer_grads.reset(step)
        if self.dynamics is not None and (self.cfg.train.measures_dynamics(step + 1, self.total_steps)
                                          or not self.dynamics.ready):
            self.dynamics.arm()  # measured in the first forward: the parameters this step's loss sees
        loss, _, tokens, bad_samples, stop, grad_norm = self.forward_backward(step, self.batches(step))
        skipped = not self.engine.was_step_applied()
        problem = step_problem(step + 1, self.describe_rows(bad_samples), skipped, self.cfg, self.layer_grads.worst)
        return StepResult(loss=loss, grad_norm=grad_norm, lr=lr, tokens=tokens, step_time=time.perf_counter() - t0,
                          skipped=skipped, nonfinite=bool(problem), problem=problem, stop=stop,
                          dynamics=self.dynamics.collect() if self.dynamics is not None else {})

    # ------------------------------------------------------------------ state

    def save(self, step: int) -> None:
        meta = ckpt_lib.run_meta(self.cfg, self.layout, self.world, step)
        ckpt_lib.save_checkpoint(
            self.engine, self.run_dir.checkpoints, step, meta, self.rank, self.cfg.train.keep_last,
            write_extra=lambda folder: write_adapter_files(self.engine.module, folder, self.cfg, self.rank),
            fail_after_files=self.faults.ckpt_crash_step == step, trainable=self.trainable,
            deepspeed_files=self.cfg.train.deepspeed_checkpoint)
        self._last_saved = step

    def _should_save(self, step: int, stopping: bool) -> bool:
        every = self.cfg.train.save_every
        return self._last_saved != step and (stopping or step == self.total_steps or bool(every and step % every == 0))

    def _should_eval(self, step: int) -> bool:
        every = self.cfg.train.eval_every
        return bool(every) and step % every == 0 and step != self.total_steps

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
            if self.world > 1 and not isinstance(exc, DudeError) and is_comm_failure(exc):
                raise lost_peer_error(exc, self.rank, self.peers, self.cfg.deepspeed.step_timeout_s, self._step + 1,
                                      ckpt_lib.find_resume(self.run_dir.checkpoints)) from exc
            raise
        finally:
            self.run_dir.release()

    def _log_step(self, step: int, result: StepResult, bar) -> None:
        speed = self.throughput.scalars(step - 1, result.step_time)
        bar.update(1)
        bar.set_postfix(loss=f"{result.loss:.4f}", gnorm=f"{result.grad_norm:.3f}",
                        tok_s=f"{speed['train/tokens_per_s']:.0f}")
        if self._logs(step) or result.skipped or result.dynamics:
            self.tracker.log(step, {
                "train/loss": result.loss, "train/grad_norm": result.grad_norm, "train/lr": result.lr,
                **speed, "train/step_time_s": result.step_time,
                "train/memory_bytes": peak_memory_bytes(), "train/skipped_steps": self.engine.skipped_steps,
                **result.dynamics,
            })
        every = self.cfg.train.histogram_every or 10 * self.cfg.train.log_every
        if result.dynamics and (step % every == 0 or step == self.total_steps):
            self.tracker.histograms(step, self.dynamics.histograms())

    def _run_steps(self, bar) -> tuple[int, bool, list[float]]:
        """Optimizer steps until the end or a stop; returns the last step, whether it stopped
        early, and the losses."""
        losses: list[float] = []
        step, stopped = self.start_step, False
        streak = NonFiniteStreak(self.cfg.train.max_nonfinite_steps,
                                 lambda: ckpt_lib.find_resume(self.run_dir.checkpoints))
        self._last_saved = self.start_step
        self.engine.train()
        while step < self.total_steps and not stopped:
            self._step = step
            result = self.step(step)
            step += 1
            losses.append(result.loss)
            self._log_step(step, result, bar)
            streak.after(step, result.skipped, result.nonfinite, result.problem)
            if self._should_eval(step):
                self.tracker.log(step, self.evaluator.loss())
            stopped = result.stop
            if self._should_save(step, stopped):
                self.save(step)
            if stopped:
                logger.warning("stopped at step %d (%s); resume with --resume auto", step,
                               self.stops.reason or "another rank was asked to stop")
        return step, stopped, losses

    def _train(self) -> dict:
        summary: dict = {"init": self.init_stats.to_dict(), "start_step": self.start_step,
                         "startup_seconds": self.startup_seconds}
        if not self.start_step:
            self.evaluator.at_start(summary, self.tracker)
        # A context, so the bar is closed before any error line is printed.
        with tqdm(total=self.total_steps, initial=self.start_step, disable=self.rank != 0, desc="train",
                  dynamic_ncols=True) as bar:
            step, stopped, losses = self._run_steps(bar)
        if not stopped:
            self.evaluator.at_end(step, summary, self.tracker)
        summary.update({"end_step": step, "stopped": stopped, "losses": losses,
                        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None})
        if self.rank == 0:
            ckpt_lib.write_text_atomic(self.run_dir.summary, json.dumps(summary, indent=1))
        self.tracker.close()
        return summary


def main(cfg: RunConfig, resume: str = "auto", force_resume: bool = False) -> dict:
    """Train and return the summary; the process group is torn down on the way out."""
    try:
        trainer = Trainer(cfg, resume=resume, force_resume=force_resume)
        summary = trainer.train()
        if trainer.rank == 0:
            logger.info(done_line(summary, cfg.output_dir))
        return summary
    finally:
        comm.destroy()
