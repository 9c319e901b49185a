"""The DeepSpeed ZeRO-3 trainer on CPU: 1 vs 2 ranks, checkpointing, resume, TensorBoard, factor cache.

Each run is a real `launch/train.py` process (torchrun for 2 ranks) on the tiny config
(stories260K on GSM8K, fp32), 30 steps with a checkpoint every 10.
"""

from __future__ import annotations

import shutil

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dude_dist.tracking import read_scalars
from tests.helpers import step_metrics, summary, train

pytestmark = pytest.mark.slow

STEPS = 30
COMMON = (f"train.max_steps={STEPS}", "train.save_every=10", "train.keep_last=3")
DYNAMICS_STEPS = [1, 10, 20, 30]  # train.dynamics_every 0 with log_every 1: step 1, every 10th, the last


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    out = {}
    out["single"] = root / "single"
    train(out["single"], *COMMON)
    out["two"] = root / "two"
    train(out["two"], *COMMON, nproc=2, launcher="torchrun")
    return out


def test_two_ranks_match_one_process(runs):
    """The README's claim: 1 and 2 ranks take the same steps, the losses to the last bit (the
    gradient norm is summed over partitions in another order: measured <= 3e-16 relative)."""
    one, two = step_metrics(runs["single"]), step_metrics(runs["two"])
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    assert [two[step] for step in one] == [one[step] for step in one]
    g1, g2 = step_metrics(runs["single"], "train/grad_norm"), step_metrics(runs["two"], "train/grad_norm")
    for step in g1:
        assert abs(g1[step] - g2[step]) <= 1e-12 * abs(g1[step]), (step, g1[step], g2[step])
    for key in ("dude/magnitude_drift", "dude/direction_change", "dude/update_norm"):
        d1, d2 = step_metrics(runs["single"], key), step_metrics(runs["two"], key)
        assert sorted(d1) == DYNAMICS_STEPS and d1[STEPS] > 0, key  # step 1, then every 10th logged step
        for step in d1:
            assert abs(d1[step] - d2[step]) <= 1e-9 * abs(d1[step]), (key, step, d1[step], d2[step])


def test_loss_falls_and_tensorboard_has_every_step(runs):
    for run_dir in runs.values():
        scalars = read_scalars(run_dir / "tensorboard")
        for tag in ("train/loss", "train/grad_norm", "train/lr", "train/tokens_per_s", "train/step_time_s",
                    "train/memory_bytes"):
            assert [s for s, _ in scalars[tag]] == list(range(1, STEPS + 1)), tag
        assert "eval/loss" in scalars and "init/svd_count" in scalars and "init/bytes_broadcast" in scalars
        change = dict(scalars["dude/direction_change"])
        assert sorted(change) == DYNAMICS_STEPS, change
        assert change[1] == 0.0 and change[30] > change[10] > 0, change  # step 1 sees the step-0 values
        acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"histograms": 0})
        acc.Reload()
        for kind in ("q_proj", "v_proj"):  # one value per layer, every 10th logged step
            events = acc.Histograms(f"dude/direction_change/{kind}")
            assert [e.step for e in events] == [10, 20, 30] and events[-1].histogram_value.num == 5, events
        losses = [v for _, v in scalars["train/loss"]]
        first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        assert last < first - 0.5, f"loss did not fall: first 5 mean {first:.3f}, last 5 mean {last:.3f}"
        eval_loss = [v for _, v in scalars["eval/loss"]]
        assert eval_loss[-1] < eval_loss[0], eval_loss


def test_checkpoints_hold_only_trainable_state(runs, stories_path):
    ckpt_root = runs["two"] / "checkpoints"
    assert (ckpt_root / "latest").read_text().strip() == "step_00000030"
    assert sorted(p.name for p in ckpt_root.iterdir() if p.is_dir()) == [
        "step_00000010", "step_00000020", "step_00000030"]
    trainable = summary(runs["two"])["init"]
    dude_params = 5 * ((4 * (64 + 64) + 64) + (4 * (64 + 32) + 32))  # q and v per layer, rank 4
    assert trainable["layers"] == 10
    size = sum(f.stat().st_size for f in (ckpt_root / "step_00000010").iterdir())
    frozen_bytes = (stories_path / "model.safetensors").stat().st_size
    # fp32 master + Adam m, v (+ the bit16 copy) per DuDe parameter, plus pickling overhead.
    assert size < 8 * 4 * dude_params, f"checkpoint of {size} bytes for {dude_params} DuDe parameters"
    assert size < frozen_bytes / 4


def test_resume_reproduces_losses(runs, tmp_path):
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(runs["single"] / "dude_init", resumed / "dude_init")
    train(resumed, *COMMON, resume=str(runs["single"] / "checkpoints" / "step_00000010"))
    base, again = step_metrics(runs["single"]), step_metrics(resumed)
    assert sorted(again) == list(range(11, STEPS + 1))
    for step in again:
        assert abs(base[step] - again[step]) <= 1e-6, (step, base[step], again[step])
    assert summary(resumed)["start_step"] == 10
    assert summary(resumed)["init"]["svd_count"] == 0


def test_second_start_runs_no_svd(runs, tmp_path):
    first = summary(runs["single"])["init"]
    assert first["svd_count"] == 10 and not first["from_cache"]
    again = tmp_path / "again"
    shutil.copytree(runs["single"] / "dude_init", again / "dude_init")
    train(again, "train.max_steps=1", "train.save_every=0", nproc=2, launcher="torchrun")
    stats = summary(again)["init"]
    assert stats["svd_count"] == 0 and stats["from_cache"]
    assert step_metrics(again)[1] == pytest.approx(step_metrics(runs["single"])[1], rel=1e-4)
    # A changed key (rank) is detected as stale and factorised again.
    changed = tmp_path / "changed"
    shutil.copytree(runs["single"] / "dude_init", changed / "dude_init")
    proc = train(changed, "train.max_steps=1", "train.save_every=0", "adapter.rank=2")
    assert summary(changed)["init"]["svd_count"] == 10
    assert "stale" in proc.stderr and "rank" in proc.stderr


def test_gradient_checkpointing_same_losses(runs, tmp_path):
    off = tmp_path / "off"
    train(off, *COMMON, "train.gradient_checkpointing=false", "train.save_every=0")
    on_losses, off_losses = step_metrics(runs["single"]), step_metrics(off)
    for step in on_losses:
        assert abs(on_losses[step] - off_losses[step]) <= 1e-5, (step, on_losses[step], off_losses[step])


def test_recomputed_output_same_losses_on_two_ranks(runs, tmp_path):
    # adapter.recompute swaps autograd's saved pre-scale output for a custom backward;
    # under ZeRO-3 on 2 ranks the run must take the same steps as the default.
    recomputed = tmp_path / "recompute"
    train(recomputed, *COMMON, "train.save_every=0", "adapter.recompute=true", nproc=2, launcher="torchrun")
    want, got = step_metrics(runs["two"]), step_metrics(recomputed)
    want_gn, got_gn = step_metrics(runs["two"], "train/grad_norm"), step_metrics(recomputed, "train/grad_norm")
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in got:
        assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), (step, got[step], want[step])
        assert abs(got_gn[step] - want_gn[step]) <= 1e-4 * abs(want_gn[step]), (step, got_gn[step], want_gn[step])


def test_eval_generation_same_with_merged_copy_and_synced_zero3(tmp_path):
    """Small models are evaluated from a merged copy; large ones generate under ZeRO-3 in step.
    Both paths must give the same completions."""
    import json

    completions = {}
    for name, limit in (("merged", "2.0"), ("synced", "0")):
        out = tmp_path / name
        train(out, "train.max_steps=2", "train.save_every=0", "eval.at_end=true", "eval.limit=2",
              "eval.max_new_tokens=8", f"eval.gather_below_gb={limit}", nproc=2, launcher="torchrun")
        records = json.loads((out / "eval_end.json").read_text())["gsm8k"]["records"]
        completions[name] = [r["completion"] for r in records]
    assert len(completions["merged"]) == 2 and all(completions["merged"])
    assert completions["merged"] == completions["synced"]


def test_partitioned_run_takes_the_same_steps_and_resumes(runs, tmp_path):
    """``stage3_param_persistence_threshold: 0`` partitions every tensor at run time (the tiny
    model's largest is below the default threshold): fetch/release, recompute under activation
    checkpointing, gradient hooks, save and resume all run on partitions. The DuDe parameters
    are kept whole on every rank whatever the threshold (their states stay partitioned)."""
    part = tmp_path / "partitioned"
    proc = train(part, *COMMON, "deepspeed.stage3_param_persistence_threshold=0", nproc=2, launcher="torchrun")
    assert "30 DuDe parameters above the persistence threshold kept whole" in proc.stderr, proc.stderr[-3000:]
    want, got = step_metrics(runs["two"]), step_metrics(part)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in got:
        assert abs(got[step] - want[step]) <= 1e-6 * abs(want[step]), (step, got[step], want[step])
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(part / "dude_init", resumed / "dude_init")
    train(resumed, *COMMON, "deepspeed.stage3_param_persistence_threshold=0", nproc=2, launcher="torchrun",
          resume=str(part / "checkpoints" / "step_00000010"))
    again = step_metrics(resumed)
    assert sorted(again) == list(range(11, STEPS + 1))
    for step in again:
        assert abs(again[step] - got[step]) <= 1e-6 * abs(got[step]), (step, again[step], got[step])
    # the dynamics go on against the step-0 reference of the run the checkpoint came from
    assert (resumed / "dude_reference.safetensors").is_file()
    for key in ("dude/direction_change", "dude/update_norm", "dude/magnitude_drift"):
        want_d, part_d, again_d = step_metrics(runs["two"], key), step_metrics(part, key), step_metrics(resumed, key)
        assert sorted(again_d) == [20, 30], key  # a resumed run keeps the cadence (its reference is loaded)
        for step in again_d:
            assert abs(part_d[step] - want_d[step]) <= 1e-5 * abs(want_d[step]), (key, step)
            assert abs(again_d[step] - part_d[step]) <= 1e-5 * abs(part_d[step]), (key, step)


def test_hierarchical_partitioning_uses_the_residual(runs, tmp_path):
    """ZeRO++ hpZ keeps a second, node-local copy of each frozen weight, which forward passes
    gather from. The init must rebuild it from the edited partition; a stale copy (W0 instead
    of W_f) makes the first loss 8.38 instead of 8.14 on this config."""
    hpz = tmp_path / "hpz"
    train(hpz, *COMMON, "train.save_every=0", "deepspeed.stage3_param_persistence_threshold=0",
          "deepspeed.hpz_partition_size=2", nproc=2, launcher="torchrun")
    want, got = step_metrics(runs["two"]), step_metrics(hpz)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in got:
        assert abs(got[step] - want[step]) <= 1e-6 * abs(want[step]), (step, got[step], want[step])


def test_offloaded_parameters_and_optimizer_take_the_same_steps(runs, tmp_path):
    """``offload_param: cpu`` puts the weight partitions in host memory (the init moves them
    through the process group's device) and ``offload_optimizer: cpu`` runs torch's AdamW on
    the host (DeepSpeed refuses a torch optimizer there unless told otherwise)."""
    off = tmp_path / "offload"
    train(off, *COMMON, "train.save_every=0", "deepspeed.offload_param=cpu",
          "deepspeed.offload_optimizer=cpu", "deepspeed.stage3_param_persistence_threshold=0",
          nproc=2, launcher="torchrun")
    want, got = step_metrics(runs["two"]), step_metrics(off)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in got:
        assert abs(got[step] - want[step]) <= 1e-6 * abs(want[step]), (step, got[step], want[step])


@pytest.mark.parametrize(("stage", "dtype"), [(0, "float32"), (1, "bfloat16"), (2, "bfloat16")])
def test_zero_stages_0_to_2_take_the_same_steps_log_the_norm_and_resume(runs, tmp_path, stage, dtype):
    """ZeRO off and stages 1-2 on 2 ranks take the ZeRO-3 run's steps and log its gradient
    norms. Stages 1 and 2 run in bf16 with fp32 gradients (what a GPU run uses; stage 1 takes
    DeepSpeed's BF16 optimizer): equal to bf16 precision over the first steps. ZeRO off
    (fp32 only) runs micro-batches of 1 with 2 accumulation steps, the same global batches:
    DeepSpeed clips without keeping the norm there, so the trainer measures it at the
    accumulation boundary (NaN was logged before); its replicated optimizer state resumes."""
    run = tmp_path / f"stage{stage}"
    split = ("train.micro_batch_size=1",) if stage == 0 else ()
    train(run, *COMMON, f"deepspeed.zero_stage={stage}", f"model.dtype={dtype}", *split, nproc=2,
          launcher="torchrun")
    want, got = step_metrics(runs["two"]), step_metrics(run)
    want_g, got_g = step_metrics(runs["two"], "train/grad_norm"), step_metrics(run, "train/grad_norm")
    assert sorted(got) == sorted(got_g) == list(range(1, STEPS + 1))
    loss_tol, norm_tol, steps = (1e-6, 1e-5, got) if dtype == "float32" else (1e-2, 2e-2, range(1, 6))
    for step in steps:
        assert abs(got[step] - want[step]) <= loss_tol * abs(want[step]), (step, got[step], want[step])
        assert abs(got_g[step] - want_g[step]) <= norm_tol * want_g[step], (step, got_g[step], want_g[step])
    if stage == 0:
        resumed = tmp_path / "resumed"
        resumed.mkdir()
        shutil.copytree(run / "dude_init", resumed / "dude_init")
        train(resumed, *COMMON, "deepspeed.zero_stage=0", f"model.dtype={dtype}", *split, nproc=2,
              launcher="torchrun", resume=str(run / "checkpoints" / "step_00000010"))
        again = step_metrics(resumed)
        assert sorted(again) == list(range(11, STEPS + 1))
        for step in again:
            assert abs(again[step] - got[step]) <= 1e-6 * abs(got[step]), (step, again[step], got[step])
