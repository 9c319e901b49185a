"""Pieces of the engine that need no process group: batch layout, sampler, DeepSpeed config,
launcher discovery, activation checkpointing."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from dude_dist.config import ConfigError, RunConfig, TrainConfig, batch_layout
from dude_dist.config_loader import load_config
from dude_dist.distributed import discover_env, expand_slurm_nodelist
from dude_dist.sampler import StepSampler
from dude_dist.zero import build_ds_config


def test_batch_layout_derives_accumulation_and_rejects_bad_globals():
    layout = batch_layout(TrainConfig(micro_batch_size=2, global_batch_size=16), world_size=2)
    assert (layout.grad_accum, layout.global_batch_size, layout.per_rank) == (4, 16, 8)
    assert batch_layout(TrainConfig(micro_batch_size=2, grad_accum=3), 4).global_batch_size == 24
    with pytest.raises(ConfigError, match=r"global_batch_size: 6 is not a multiple of .* = 4"):
        batch_layout(TrainConfig(micro_batch_size=2, global_batch_size=6), world_size=2)


def test_sampler_is_world_size_independent_and_disjoint():
    one = StepSampler(100, batch_layout(TrainConfig(micro_batch_size=4, global_batch_size=8), 1), seed=3)
    two = StepSampler(100, batch_layout(TrainConfig(micro_batch_size=2, global_batch_size=8), 2), seed=3)
    three_layout = batch_layout(TrainConfig(micro_batch_size=1, global_batch_size=6), 3)
    three = StepSampler(100, three_layout, seed=3)
    for step in range(30):  # crosses epoch boundaries (12 steps of 8 per epoch)
        flat_one = [i for mb in one.micro_batches(step, 0) for i in mb]
        flat_two = [i for r in range(2) for mb in two.micro_batches(step, r) for i in mb]
        assert flat_one == flat_two == one.global_batch(step)
        per_rank = [set(i for mb in three.micro_batches(step, r) for i in mb) for r in range(3)]
        assert sum(len(s) for s in per_rank) == 6 and len(set.union(*per_rank)) == 6
    epoch0 = [i for s in range(12) for i in one.global_batch(s)]
    assert len(set(epoch0)) == 96  # no repeats within an epoch
    assert one.global_batch(12) != one.global_batch(0)  # a new order next epoch
    assert StepSampler(100, one.layout, seed=4).global_batch(0) != one.global_batch(0)
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        StepSampler(7, one.layout, seed=0)
    # A resumed run's fresh sampler starts in a later epoch; it gives the same batches.
    assert StepSampler(100, one.layout, seed=3).global_batch(13) == one.global_batch(13)
    exact = StepSampler(8, one.layout, seed=0)  # exactly one global batch is enough
    assert exact.steps_per_epoch == 1 and sorted(exact.global_batch(0)) == list(range(8))


@pytest.mark.parametrize(("num_samples", "micro", "accum", "world", "seed"),
                         [(50, 2, 1, 1, 0), (50, 2, 3, 2, 7), (37, 1, 2, 3, 3), (64, 4, 2, 2, 1)])
def test_sampler_takes_the_documented_slice_of_the_seeded_permutation(num_samples, micro, accum, world, seed):
    """An independent reference: epoch ``e`` is ``randperm(n)`` seeded ``seed + e``; step ``s``
    takes its ``s``-th block of ``global`` indices (the tail that fills no block is dropped);
    rank ``k`` the ``k``-th contiguous slice of that block, cut into micro-batches."""
    from dude_dist.config import BatchLayout

    layout = BatchLayout(micro_batch_size=micro, grad_accum=accum, world_size=world)
    sampler = StepSampler(num_samples, layout, seed=seed)
    size = micro * accum * world
    steps_per_epoch = num_samples // size
    assert sampler.steps_per_epoch == steps_per_epoch
    for step in range(int(2.5 * steps_per_epoch) + 1):
        epoch, within = divmod(step, steps_per_epoch)
        perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        block = perm[within * size:(within + 1) * size]
        assert sampler.global_batch(step) == block, step
        for rank in range(world):
            mine = block[rank * micro * accum:(rank + 1) * micro * accum]
            want = [mine[i * micro:(i + 1) * micro] for i in range(accum)]
            assert sampler.micro_batches(step, rank) == want, (step, rank)


def _cfg(**train) -> RunConfig:
    return load_config(None, ["model.name_or_path=x", *[f"train.{k}={v}" for k, v in train.items()]])


def test_ds_config_from_run_config_and_json_override(tmp_path):
    cfg = _cfg(micro_batch_size=2, global_batch_size=8, max_grad_norm=0.5)
    ds = build_ds_config(cfg, batch_layout(cfg.train, 2))
    assert ds["train_batch_size"] == 8 and ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == 3
    override = tmp_path / "ds.json"
    override.write_text(json.dumps({"zero_optimization": {"stage3_max_live_parameters": 123}}))
    cfg2 = load_config(None, ["model.name_or_path=x", f"deepspeed.config_file={override}"])
    ds2 = build_ds_config(cfg2, batch_layout(cfg2.train, 1))
    assert ds2["zero_optimization"]["stage3_max_live_parameters"] == 123
    assert ds2["zero_optimization"]["stage"] == 3  # keys not overridden survive
    override.write_text(json.dumps({"train_batch_size": 99}))
    with pytest.raises(ValueError, match="train_batch_size=99 disagrees"):
        build_ds_config(cfg2, batch_layout(cfg2.train, 1))
    override.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ValueError, match="'optimizer' is set by dude_dist"):
        build_ds_config(cfg2, batch_layout(cfg2.train, 1))
    override.write_text("{not json")
    with pytest.raises(ValueError, match=r"ds.json:1: invalid JSON"):
        build_ds_config(cfg2, batch_layout(cfg2.train, 1))


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234",
          "TORCHELASTIC_RUN_ID": "x"}, (3, 8, 1, "10.0.0.1", 1234, "torchrun")),
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
          "CROSS_RANK": "0"}, (1, 2, 1, "127.0.0.1", 29500, "deepspeed")),
        ({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "6", "OMPI_COMM_WORLD_LOCAL_RANK": "2",
          "MASTER_ADDR": "head"}, (5, 6, 2, "head", 29500, "mpi")),
        ({"SLURM_PROCID": "7", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "3", "SLURM_JOB_ID": "42",
          "SLURM_STEP_NODELIST": "gpu[07-08]", "MASTER_ADDR": "gpu07"}, (7, 16, 3, "gpu07", 29542, "slurm")),
    ],
)
def test_discover_env_reads_each_launcher(env, expected):
    got = discover_env(env)
    assert (got.rank, got.world_size, got.local_rank, got.master_addr, got.master_port, got.launcher) == expected


def test_discover_env_single_process_and_batch_script():
    single = discover_env({})
    assert (single.rank, single.world_size, single.launcher) == (0, 1, "single") and single.master_port > 0
    # The batch script itself (no srun step) is one process, not rank 0 of SLURM_NTASKS.
    batch = discover_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "9"})
    assert batch.world_size == 1
    with pytest.raises(ValueError, match="RANK='x' is not an integer"):
        discover_env({"RANK": "x", "WORLD_SIZE": "2"})


def test_expand_slurm_nodelist():
    assert expand_slurm_nodelist("node[01-03,07],gpu5") == ["node01", "node02", "node03", "node07", "gpu5"]
    assert expand_slurm_nodelist("a1") == ["a1"]


def test_activation_checkpointing_saves_fewer_activations_same_loss(stories_path):
    from transformers import AutoModelForCausalLM

    from dude_dist import DudeConfig, apply_dude

    ids = torch.randint(3, 500, (2, 48), generator=torch.Generator().manual_seed(0))
    results = {}
    for ckpt in (False, True):
        model = AutoModelForCausalLM.from_pretrained(stories_path, dtype=torch.float32)
        apply_dude(model, DudeConfig(rank=4))
        if ckpt:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        saved = []

        def pack(t, saved=saved):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        saved_during_forward = sum(saved)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        results[ckpt] = (loss.item(), saved_during_forward, grads)
    (loss_off, bytes_off, g_off), (loss_on, bytes_on, g_on) = results[False], results[True]
    assert abs(loss_on - loss_off) <= 1e-5
    assert torch.allclose(g_on, g_off, atol=1e-6, rtol=1e-5)
    assert bytes_on < 0.5 * bytes_off, (bytes_on, bytes_off)


def test_layer_grad_norms_match_the_gradients_and_name_the_culprit(monkeypatch):
    from torch import nn

    from dude_dist import DudeConfig, apply_dude
    from dude_dist.layer_grads import LayerGradNorms

    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("up", nn.Linear(8, 16))
    model.add_module("act", nn.Tanh())
    model.add_module("down", nn.Linear(16, 8))
    apply_dude(model, DudeConfig(targets=["up", "down"], rank=2))
    probe = LayerGradNorms(model)
    assert probe.names == ["up", "down"]
    probe.reset(0)
    (model(torch.randn(5, 8)) * 10).square().sum().backward()
    expected = [torch.cat([p.grad.flatten() for p in m.parameters() if p.requires_grad]).double().norm().item()
                for m in (model.up, model.down)]
    assert probe.norms() == pytest.approx(expected, rel=1e-12)
    top = "up" if expected[0] > expected[1] else "down"
    assert probe.worst() == f"largest gradient norm {max(expected):.4g} in layer {top}"

    # A second micro-batch of the same step adds its squares; reset starts the next step afresh.
    first = [m.magnitude.grad.clone() for m in (model.up, model.down)]
    model.zero_grad()
    (model(torch.randn(3, 8)) * 3).square().sum().backward()
    second = [torch.cat([p.grad.flatten() for p in m.parameters() if p.requires_grad]).double().norm().item()
              for m in (model.up, model.down)]
    assert probe.norms() == pytest.approx([(a * a + b * b) ** 0.5 for a, b in zip(expected, second)], rel=1e-12)
    assert not torch.equal(first[0], model.up.magnitude.grad)
    probe.reset(1)
    assert probe.norms() == [0.0, 0.0]

    # A layer whose gradients do not all arrive (a parameter frozen after the hooks were set)
    # is still measured, from what did arrive.
    model.down.magnitude.requires_grad_(False)
    model.zero_grad()
    model(torch.randn(5, 8)).sum().backward()
    partial_down = torch.cat([p.grad.flatten() for p in model.down.parameters() if p.grad is not None])
    assert probe.norms()[1] == pytest.approx(partial_down.double().norm().item(), rel=1e-12)
    model.down.magnitude.requires_grad_(True)
    probe.remove()

    # The fault hook makes one layer's gradient infinite at the chosen (1-based) step only.
    monkeypatch.setenv("DUDE_FAULT_INF_GRAD", "2@down")
    model.zero_grad()
    probe = LayerGradNorms(model)
    for step, finite in ((0, True), (1, False)):
        probe.reset(step)
        model(torch.randn(5, 8)).sum().backward()
        assert torch.isfinite(model.down.magnitude.grad).all() == finite
        assert probe.worst().startswith("largest gradient norm" if finite else
                                        "layer down has a non-finite gradient (1 of 2 layers non-finite)")


def test_layer_grad_norms_cost_one_norm_per_gradient_and_no_host_read():
    """The hooks run on every micro-batch: per trainable parameter one ``linalg.vector_norm``
    and nothing else that computes (no float64 copy, no sum into a running total); no
    reduction or host copy until asked."""
    from torch import nn
    from torch.utils._python_dispatch import TorchDispatchMode

    from dude_dist import DudeConfig, apply_dude
    from dude_dist.layer_grads import LayerGradNorms

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(16, 16) for _ in range(4)))
    apply_dude(model, DudeConfig(targets=["0", "1", "2", "3"], rank=2))
    x = torch.randn(6, 16)

    def backward_ops() -> list[str]:
        loss = model(x).square().sum()
        with Ops() as ops:
            loss.backward()
        model.zero_grad()
        return [n for n in ops.names if n not in ("detach", "alias")]

    without = backward_ops()
    probe = LayerGradNorms(model)
    probe.reset(0)
    with_hooks = backward_ops()
    extra = list(with_hooks)
    for name in without:
        extra.remove(name)
    assert sorted(extra) == ["linalg_vector_norm"] * 12, extra  # 4 layers x (A, B, m)
    assert len(probe._pending) == 12
    probe.remove()


def test_loss_from_labelled_positions_only_equals_the_full_logits_loss(stories_path):
    from transformers import AutoModelForCausalLM

    from dude_dist import DudeConfig, apply_dude
    from dude_dist.evaluate import token_loss_sum

    model = AutoModelForCausalLM.from_pretrained(stories_path, dtype=torch.float64)
    apply_dude(model, DudeConfig(rank=4))
    ids = torch.randint(3, 500, (3, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[2, 30:] = 0  # right padding
    labels = ids.clone()
    labels[0, :25] = labels[1, :12] = -100  # prompts of different lengths
    labels[2, :] = -100  # a sample with no target at all
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    results = {}
    for keep in (False, True):
        model.zero_grad()
        loss, count = token_loss_sum(model, batch, keep_logits=keep)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        results[keep] = (loss.item(), count, grads)
    assert results[True][1] == results[False][1] == (39 - 24) + (39 - 11)
    with torch.no_grad():  # the reference: cross-entropy of every next token, written out here
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1], dim=-1)
        target = labels[:, 1:]
        picked = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        reference = -(picked * (target != -100)).sum().item()
    assert results[False][0] == pytest.approx(reference, rel=1e-6)  # the loss is summed in float32
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-6)  # float32 sums of other lengths
    assert torch.allclose(results[True][2], results[False][2], rtol=1e-10, atol=1e-14)
    empty = {**batch, "labels": torch.full_like(labels, -100)}
    assert token_loss_sum(model, empty)[1] == 0 and token_loss_sum(model, empty)[0].item() == 0.0


def test_loss_inputs_count_on_the_host_and_keep_logits_from_the_first_label(stories_path):
    from transformers import AutoModelForCausalLM

    from dude_dist.loss import accepts_logits_to_keep, loss_inputs, summed_loss

    ids = torch.randint(3, 500, (3, 10), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0  # right padding
    labels = ids.clone()
    labels[0, :6] = labels[1, :4] = -100
    labels[2, :] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    inputs = loss_inputs(batch)
    # Targets are labels[:, 1:]: 4 + 6 + 0; tokens 10 + 10 + 7; the first labelled target is
    # labels[1, 4], i.e. position 3 of labels[:, 1:].
    assert (inputs.targets, inputs.tokens, inputs.first) == (10, 27, 3)
    assert loss_inputs(batch, keep_logits=False).first is None
    assert loss_inputs({**batch, "labels": torch.full_like(labels, -100)}).first == 8
    moved = loss_inputs(batch, device="meta")
    assert {t.device.type for t in moved.tensors.values()} == {"meta"} and moved.targets == 10

    model = AutoModelForCausalLM.from_pretrained(stories_path, dtype=torch.float64)
    assert accepts_logits_to_keep(model) and not accepts_logits_to_keep(torch.nn.Linear(2, 2))
    kept = []

    def forward(**kwargs):
        kept.append(kwargs.get("logits_to_keep"))
        return model(**kwargs)

    with torch.no_grad():
        short = summed_loss(forward, inputs)
        full = summed_loss(forward, loss_inputs(batch, keep_logits=False))
    assert kept == [10 - 3, None]  # logits for the positions from the first label on, then all
    from dude_dist.loss import token_loss_sum

    with torch.no_grad():
        assert token_loss_sum(forward, batch)[1] == 10 and kept[-1] == 10 - 3  # the default keeps them too
        token_loss_sum(forward, batch, keep_logits=False)
        assert kept[-1] is None
    assert short.item() == pytest.approx(full.item(), rel=1e-6)
    # The attention mask reaches the model: with left padding the pads would otherwise be
    # attended to by every real token.
    left_mask = torch.ones_like(ids)
    left_mask[0, :3] = 0  # row 0 left-padded; its labels start at position 6
    left = {"input_ids": ids, "attention_mask": left_mask, "labels": labels}
    with torch.no_grad():
        got = summed_loss(model, loss_inputs(left, keep_logits=False)).item()
        expected, unmasked = (F.cross_entropy(model(input_ids=ids, attention_mask=m).logits[:, :-1].flatten(0, 1),
                                              left["labels"][:, 1:].flatten(), reduction="sum").item()
                              for m in (left["attention_mask"], None))
    assert got == pytest.approx(expected, rel=1e-12) and abs(unmasked - expected) > 1e-3
