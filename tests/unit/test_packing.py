"""Packing whole samples into rows (dude_dist/data.py, loss.py) and length-grouped batches
(dude_dist/sampler.py): a packed row gives the loss and DuDe gradients of its samples padded.

    OMP_NUM_THREADS=1 python -m pytest tests/unit/test_packing.py -q
"""

from __future__ import annotations

import dataclasses

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from dude_dist import DudeConfig, apply_dude
from dude_dist.adapters import get_dude_layers
from dude_dist.attention import PACKED_SDPA, model_attn_implementation
from dude_dist.config import BatchLayout, DataConfig, ModelConfig, attn_implementation_problem
from dude_dist.data import (
    build_datasets,
    collate_batch,
    pack_dataset,
    pack_lengths,
    position_ids_of,
    row_counts,
)
from dude_dist.errors import ConfigError
from dude_dist.loss import IGNORE_INDEX, loss_inputs, summed_loss, varlen_kwargs
from dude_dist.sampler import StepSampler

datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def tokenizer(stories_path):
    return AutoTokenizer.from_pretrained(stories_path)


@pytest.fixture(scope="module")
def gsm8k(tokenizer, data_dir):
    """The first 40 GSM8K training samples, unpacked and packed into rows of 1024 tokens."""
    cfg = DataConfig(sources=(str(data_dir / "gsm8k" / "train.jsonl"),), limit=40, max_seq_len=1024)
    return build_datasets(cfg, tokenizer), build_datasets(dataclasses.replace(cfg, packing=True), tokenizer, seed=3)


# --------------------------------------------------------------------------- bin packing


def test_pack_lengths_places_every_sample_whole_in_rows_that_fit():
    lengths = np.random.default_rng(0).integers(100, 400, size=500)
    rows = pack_lengths(lengths, 1024, seed=1)
    assert sorted(i for row in rows for i in row) == list(range(500))  # each sample once, never split
    assert max(sum(lengths[row]) for row in rows) <= 1024
    fill = lengths.sum() / (len(rows) * 1024)
    assert fill > 0.97  # 100-400 tokens into 1024: best-fit decreasing leaves little room
    assert len(rows) <= -(-lengths.sum() // 1024) + 2  # within 2 rows of the lower bound


def test_pack_lengths_is_deterministic_and_seeded():
    lengths = [5, 5, 5, 5, 3, 3, 7, 2]
    assert pack_lengths(lengths, 10, seed=0) == pack_lengths(lengths, 10, seed=0)
    # Equal lengths are taken in a seeded order, so which samples meet depends on the seed.
    assert len({str(pack_lengths(lengths, 10, seed=s)) for s in range(8)}) > 1
    for seed in range(8):  # the packing itself is optimal here: 35 tokens in 4 rows of 10
        assert len(pack_lengths(lengths, 10, seed=seed)) == 4


def test_pack_lengths_prefers_the_tightest_row():
    # 6 and 5 open two rows (4 and 5 free); 4 fits both and goes where it fills the row: the 6's.
    assert pack_lengths([6, 5, 4], 10) == [[0, 2], [1]]


def test_pack_lengths_refuses_a_sample_longer_than_a_row():
    with pytest.raises(ValueError, match="sample 1 has 11 tokens; rows hold 1 to 10"):
        pack_lengths([3, 11], 10)


def test_packed_rows_hold_whole_samples_with_their_targets(gsm8k):
    plain, packed = gsm8k
    samples = plain.train.to_list()
    assert packed.stats["rows"] == len(packed.train) < len(samples)
    assert packed.stats["fill"] == pytest.approx(plain.stats["tokens"] / (len(packed.train) * 1024))
    assert packed.stats["fill"] > 0.9
    seen = []
    for row in packed.train:
        assert len(row["input_ids"]) == sum(row["seq_lens"]) <= 1024
        start = 0
        for n in row["seq_lens"]:
            ids, labels = row["input_ids"][start:start + n], row["labels"][start:start + n]
            match = [i for i, s in enumerate(samples) if s["input_ids"] == ids]
            assert match, "a row holds tokens that are not one whole sample"
            assert labels[0] == IGNORE_INDEX and labels[1:] == samples[match[0]]["labels"][1:]
            seen.append(match[0])
            start += n
    assert sorted(seen) == list(range(len(samples)))
    # The host-side counts the loss divides by: the same targets and tokens in total.
    assert packed.counts.targets.sum() == plain.counts.targets.sum() > 0
    assert packed.counts.tokens.sum() == plain.counts.tokens.sum() == plain.stats["tokens"]
    lengths = np.array([len(s["input_ids"]) for s in samples])
    assert packed.counts.square_lengths.sum() == (lengths ** 2).sum()


def test_a_packed_sample_is_no_target_at_its_first_token():
    # In a padded batch a sample's first token is never a target; in a row it would be the
    # target of the previous sample's last token, so packing unlabels it.
    ds = datasets.Dataset.from_dict({"input_ids": [[5, 6, 7], [8, 9]], "labels": [[5, 6, 7], [8, 9]]})
    packed, stats = pack_dataset(ds, 8)
    assert stats == {"rows": 1, "fill": 5 / 8}
    assert packed[0] == {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, -100, 9], "seq_lens": [3, 2],
                         "sample_ids": [0, 1]}
    assert row_counts(packed).targets.tolist() == [3] == [row_counts(ds).targets.sum()]


def test_row_counts_match_what_the_loss_counts(gsm8k):
    for data in gsm8k:
        pad = 0
        for i in range(len(data.train)):
            inputs = loss_inputs(collate_batch([data.train[i]], pad))
            assert data.counts.targets[i] == inputs.targets
            assert data.counts.tokens[i] == inputs.tokens


def test_counts_shape_pads_each_micro_batch_to_its_longest_row(gsm8k):
    plain, _ = gsm8k
    lengths = plain.counts.tokens
    tokens, slots, square, targets = plain.counts.shape([[0, 1], [2]])
    assert tokens == lengths[:3].sum()
    assert slots == 2 * max(lengths[0], lengths[1]) + lengths[2]
    assert square == (lengths[:3] ** 2).sum()
    assert targets == plain.counts.targets[:3].sum() > 0


# --------------------------------------------------------------------------- collation


def test_collate_packed_rows_restart_positions_per_sample():
    rows = [{"input_ids": [1, 5, 6, 1, 7], "labels": [-100, 5, 6, -100, 7], "seq_lens": [3, 2]},
            {"input_ids": [1, 8], "labels": [-100, 8], "seq_lens": [2]}]
    batch = collate_batch(rows, pad_token_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 5, 6, -100, 7], [-100, 8, -100, -100, -100]]
    assert "position_ids" not in collate_batch([{"input_ids": [1, 2], "labels": [-100, 2]}], 0)
    assert position_ids_of([4], 4).tolist() == [0, 1, 2, 3]


def test_packed_rows_go_to_the_model_with_positions_and_no_mask():
    rows = [{"input_ids": [1, 5, 6, 1, 7], "labels": [-100, 5, 6, -100, 7], "seq_lens": [3, 2]},
            {"input_ids": [1, 8], "labels": [-100, 8], "seq_lens": [2]}]
    inputs = loss_inputs(collate_batch(rows, 0), attn_implementation="flash_attention_2")
    assert sorted(inputs.tensors) == ["input_ids", "labels", "position_ids"]
    assert inputs.targets == 4 and inputs.tokens == 7
    assert inputs.forward_kwargs["use_cache"] is False
    # flattened rows [0 1 2 0 1 | 0 1 0 1 2]: sequences start at 0, 3, 5, 7 and end at 10
    assert inputs.forward_kwargs["cu_seq_lens_q"].tolist() == [0, 3, 5, 7, 10]
    assert inputs.forward_kwargs["cu_seq_lens_q"].dtype == torch.int32
    assert inputs.forward_kwargs["max_length_q"] == inputs.forward_kwargs["max_length_k"] == 3
    # sdpa slices on the host; eager gets transformers' block-diagonal mask instead
    on_meta = loss_inputs(collate_batch(rows, 0), "meta")  # sdpa: the batch moves, the lengths do not
    assert on_meta.tensors["input_ids"].is_meta and on_meta.forward_kwargs["cu_seq_lens_q"].device.type == "cpu"
    assert loss_inputs(collate_batch(rows, 0), "meta", attn_implementation="flash_attention_2"
                       ).forward_kwargs["cu_seq_lens_q"].is_meta
    assert "cu_seq_lens_q" not in loss_inputs(collate_batch(rows, 0), attn_implementation="eager").forward_kwargs
    padded = loss_inputs(collate_batch([{"input_ids": [1, 2], "labels": [-100, 2]}], 0))
    assert sorted(padded.tensors) == ["attention_mask", "input_ids", "labels"] and padded.forward_kwargs == {}
    assert varlen_kwargs(torch.tensor([[0, 1, 2, 3]]))["cu_seq_lens_k"].tolist() == [0, 4]


# --------------------------------------------------------------------------- same loss and gradients


def dude_model(stories_path, attn: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(stories_path, dtype=torch.float32,
                                                 attn_implementation=model_attn_implementation(attn))
    apply_dude(model, DudeConfig(targets=("q_proj", "v_proj"), rank=4))
    return model.train()


def token_losses(model, batch: dict, attn: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """Summed loss through summed_loss, the per-target losses ``[batch, seq-1]`` (0 where
    unlabelled), the logits, and the DuDe gradients of (summed loss / targets)."""
    model.zero_grad()
    seen = {}

    def forward(**kwargs):
        out = model(**kwargs)
        seen["logits"] = out.logits
        return out

    inputs = loss_inputs(batch, keep_logits=False, attn_implementation=attn)
    total = summed_loss(forward, inputs)
    (total / inputs.targets).backward()
    logits = seen["logits"][:, :-1]
    per_token = F.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="none",
                                ignore_index=IGNORE_INDEX).view(logits.shape[:2])
    grads = {f"{name}.{p}": getattr(layer, p).grad.clone() for name, layer in get_dude_layers(model).items()
             for p in layer.adapter_params()}
    return total.detach(), per_token.detach(), seen["logits"].detach(), grads


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_one_packed_row_gives_the_losses_and_gradients_of_the_padded_batch(stories_path, gsm8k, attn):
    plain, _ = gsm8k
    shortest = sorted(range(len(plain.train)), key=lambda i: len(plain.train[i]["input_ids"]))[:8]
    samples = [plain.train[i] for i in sorted(shortest)]
    model = dude_model(stories_path, attn)
    padded = collate_batch(samples, pad_token_id=0)
    lengths = [len(s["input_ids"]) for s in samples]
    row = {"input_ids": [t for s in samples for t in s["input_ids"]],
           "labels": [IGNORE_INDEX if j == 0 else t for s in samples for j, t in enumerate(s["labels"])],
           "seq_lens": lengths}
    packed = collate_batch([row], pad_token_id=0)
    total_p, per_p, _, grads_p = token_losses(model, padded, attn)
    total_k, per_k, _, grads_k = token_losses(model, packed, attn)
    start = 0
    for i, n in enumerate(lengths):  # target t of sample i sits at packed position start + t
        # sdpa runs a sample in a row through another kernel call than in the padded batch:
        # 1e-5, absolute and relative, is float32 rounding (eager agrees bit for bit)
        assert torch.allclose(per_k[0, start:start + n - 1], per_p[i, :n - 1], atol=1e-5, rtol=1e-5)
        start += n
    assert per_k.count_nonzero() == per_p.count_nonzero() > 0
    assert torch.allclose(total_k, total_p, rtol=1e-6, atol=0)
    assert grads_p.keys() == grads_k.keys() and len(grads_p) == 5 * 2 * 3
    for name in grads_p:
        assert grads_p[name].abs().max() > 0, name
        assert torch.allclose(grads_k[name], grads_p[name], atol=1e-5, rtol=0), name


def packed_row(samples: list[dict]) -> dict:
    """One packed row of ``samples`` as :func:`dude_dist.data.pack_dataset` stores it."""
    return {"input_ids": [t for s in samples for t in s["input_ids"]],
            "labels": [IGNORE_INDEX if j == 0 else t for s in samples for j, t in enumerate(s["labels"])],
            "seq_lens": [len(s["input_ids"]) for s in samples]}


def test_packed_rows_compute_logits_only_at_their_labelled_targets(stories_path, gsm8k):
    plain, _ = gsm8k
    samples = [plain.train[i] for i in range(8)]
    model = dude_model(stories_path, "sdpa")
    kept = []

    def forward(**kwargs):
        out = model(**kwargs)
        kept.append((kwargs.get("logits_to_keep"), tuple(out.logits.shape)))
        return out

    for rows in ([packed_row(samples)], [packed_row(samples[:3]), packed_row(samples[3:])]):
        batch = collate_batch(rows, pad_token_id=0)
        results = {}
        for keep in (False, True):
            model.zero_grad()
            inputs = loss_inputs(batch, keep_logits=keep)
            total = summed_loss(forward, inputs)
            (total / inputs.targets).backward()
            grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
            results[keep] = (total.item(), grads)
        labelled = (batch["labels"][:, 1:] != IGNORE_INDEX).any(0).nonzero().reshape(-1)
        positions, shape = kept[-1]
        # the union over the rows of the positions that meet a label, passed as positions
        assert torch.equal(positions, labelled) and shape == (len(rows), len(labelled), 512)
        assert len(labelled) < batch["input_ids"].shape[1] - 1 - int(labelled[0])  # later prompts skipped
        if len(rows) == 1:
            assert len(labelled) == inputs.targets  # one logit per target
        assert kept[-2][0] is None  # keep_logits=False: every position
        assert results[True][0] == pytest.approx(results[False][0], rel=1e-6)
        assert results[True][1].abs().max() > 0
        assert torch.allclose(results[True][1], results[False][1], rtol=1e-5, atol=1e-7)
    # Labels that run unbroken to the end (a padded batch) keep the slice; so does a model
    # whose logits_to_keep is a count only; anything else is refused.
    padded = collate_batch(samples[:2], pad_token_id=0)
    assert loss_inputs(padded).positions is None and loss_inputs(padded).first is not None
    gaps = collate_batch([packed_row(samples[:2])], pad_token_id=0)
    assert loss_inputs(gaps, keep_logits="last").positions is None
    assert loss_inputs(gaps, keep_logits="positions").positions is not None
    assert loss_inputs(gaps, device="meta").positions.is_meta
    # A single labelled position is sliced from: a 1-element tensor could pass for a count.
    one = {"input_ids": torch.arange(1, 7)[None], "attention_mask": torch.ones(1, 6, dtype=torch.long),
           "labels": torch.tensor([[-100, -100, 5, -100, -100, -100]])}
    assert loss_inputs(one).positions is None and loss_inputs(one).first == 1
    # Two labelled positions with a gap are already gathered.
    two = {**one, "labels": torch.tensor([[-100, -100, 5, -100, 6, -100]])}
    assert torch.equal(loss_inputs(two).positions, torch.tensor([1, 3])) and loss_inputs(two).first == 1
    with pytest.raises(ValueError, match="keep_logits must be a bool, 'last' or 'positions', got 'all'"):
        loss_inputs(gaps, keep_logits="all")


def test_logits_to_keep_support_reads_the_forward_signature(stories_path):
    from dude_dist.loss import logits_to_keep_support

    class CountOnly(torch.nn.Module):
        def forward(self, input_ids, logits_to_keep: int = 0):
            return input_ids

    assert logits_to_keep_support(dude_model(stories_path, "sdpa")) == "positions"
    assert logits_to_keep_support(CountOnly()) == "last"
    assert logits_to_keep_support(torch.nn.Linear(2, 2)) == ""


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_no_logit_changes_when_an_unrelated_sample_is_packed_beside(stories_path, gsm8k, attn):
    plain, _ = gsm8k
    a, b, c = (plain.train[i] for i in range(3))
    model = dude_model(stories_path, attn)

    def row(*samples):
        return {"input_ids": [t for s in samples for t in s["input_ids"]],
                "labels": [t for s in samples for t in s["labels"]],
                "seq_lens": [len(s["input_ids"]) for s in samples]}

    n_a, n_b = len(a["input_ids"]), len(b["input_ids"])
    with torch.no_grad():
        alone = token_losses_logits(model, attn, collate_batch([row(a)], 0))[0, :n_a]
        after_b = token_losses_logits(model, attn, collate_batch([row(b, a)], 0))[0, n_b:n_b + n_a]
        before_c = token_losses_logits(model, attn, collate_batch([row(a, c)], 0))[0, :n_a]
        beside = token_losses_logits(model, attn, collate_batch([row(b, a, c), row(c)], 0))[0, n_b:n_b + n_a]
    for other in (after_b, before_c, beside):
        assert (other - alone).abs().max() < 1e-4
    # Without position_ids the same row lets a's tokens attend to b's: their logits change.
    crossed = model(input_ids=collate_batch([row(b, a)], 0)["input_ids"], use_cache=False).logits
    assert (crossed[0, n_b:n_b + n_a] - alone).abs().max() > 1e-2


def test_sdpa_runs_each_packed_sample_on_its_own(stories_path, gsm8k, monkeypatch):
    plain, _ = gsm8k
    a, b, c = (plain.train[i] for i in range(3))
    model = dude_model(stories_path, "sdpa")
    assert model.config._attn_implementation == PACKED_SDPA
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(q, k, v, **kwargs):
        calls.append((q.shape[2], k.shape[2], kwargs.get("is_causal"), kwargs.get("attn_mask")))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    rows = [{"input_ids": a["input_ids"] + b["input_ids"], "labels": a["labels"] + b["labels"],
             "seq_lens": [len(a["input_ids"]), len(b["input_ids"])]},
            {"input_ids": c["input_ids"], "labels": c["labels"], "seq_lens": [len(c["input_ids"])]}]
    batch = collate_batch(rows, 0)
    with torch.no_grad():
        token_losses_logits(model, "sdpa", batch)
    n_a, n_b, n_c = (len(s["input_ids"]) for s in (a, b, c))
    width = batch["input_ids"].shape[1]
    per_layer = [n_a, n_b] + [n_c] + ([width - n_c] if width > n_c else [])  # row 2's padding is its own
    assert [(q, k, causal, mask) for q, k, causal, mask in calls] == [
        (n, n, True, None) for n in per_layer] * model.config.num_hidden_layers


def token_losses_logits(model, attn: str, batch: dict) -> torch.Tensor:
    seen = {}

    def forward(**kwargs):
        out = model(**kwargs)
        seen["logits"] = out.logits
        return out

    summed_loss(forward, loss_inputs(batch, keep_logits=False, attn_implementation=attn))
    return seen["logits"]


# --------------------------------------------------------------------------- length-grouped batches


def padding_slots(sampler: StepSampler, lengths: np.ndarray, steps: int) -> tuple[int, int]:
    tokens = slots = 0
    for step in range(steps):
        for rank in range(sampler.layout.world_size):
            for micro in sampler.micro_batches(step, rank):
                tokens += lengths[micro].sum()
                slots += len(micro) * lengths[micro].max()
    return tokens, slots


def test_length_grouped_batches_pad_little_and_stay_world_size_independent():
    lengths = np.random.default_rng(0).integers(100, 1000, size=4096)
    one = StepSampler(4096, BatchLayout(4, 4, 1), seed=7, lengths=lengths)
    two = StepSampler(4096, BatchLayout(4, 2, 2), seed=7, lengths=lengths)
    plain = StepSampler(4096, BatchLayout(4, 4, 1), seed=7)
    steps = one.steps_per_epoch
    assert [one.global_batch(s) for s in range(steps)] == [two.global_batch(s) for s in range(steps)]
    assert sorted(i for s in range(steps) for i in one.global_batch(s)) == list(range(4096))  # each once
    tokens, slots = padding_slots(one, lengths, steps)
    plain_tokens, plain_slots = padding_slots(plain, lengths, steps)
    assert tokens == plain_tokens
    assert 1 - tokens / slots < 0.02 < 0.2 < 1 - plain_tokens / plain_slots
    # seeded: the next epoch and another seed give other batches; the same seed the same ones
    assert one.global_batch(steps) != one.global_batch(0)
    again = StepSampler(4096, BatchLayout(4, 4, 1), seed=7, lengths=lengths)
    assert again.global_batch(5) == one.global_batch(5)
    other = StepSampler(4096, BatchLayout(4, 4, 1), seed=8, lengths=lengths)
    assert other.global_batch(5) != one.global_batch(5)
    # batches of one window come in a shuffled order, not longest first
    firsts = [lengths[one.global_batch(s)].max() for s in range(64)]
    assert firsts != sorted(firsts, reverse=True)


# --------------------------------------------------------------------------- config


def test_attn_implementation_is_one_of_three_and_checked_against_the_machine(monkeypatch):
    assert ModelConfig(name_or_path="x").attn_implementation == "sdpa"
    with pytest.raises(ConfigError, match="model.attn_implementation: 'flash' is not one of sdpa, "
                                          "flash_attention_2, eager"):
        ModelConfig(name_or_path="x", attn_implementation="flash")
    assert attn_implementation_problem("sdpa") is None and attn_implementation_problem("eager") is None
    assert "needs a CUDA GPU" in attn_implementation_problem("flash_attention_2", cuda=False)
    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: False)
    assert "needs the flash_attn package" in attn_implementation_problem("flash_attention_2", cuda=True)
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    assert attn_implementation_problem("flash_attention_2", cuda=True) is None


def test_packed_rows_name_their_samples_for_messages(gsm8k):
    from types import SimpleNamespace

    from dude_dist.trainer import Trainer

    plain, packed = gsm8k
    ids = packed.train["sample_ids"]
    assert sorted(i for row in ids for i in row) == list(range(len(plain.train)))
    for r in (0, len(ids) - 1):  # a row is its samples' tokens back to back, in sample_ids order
        want = [t for i in ids[r] for t in plain.train[i]["input_ids"]]
        assert packed.train[r]["input_ids"] == want
        assert packed.train[r]["seq_lens"] == [len(plain.train[i]["input_ids"]) for i in ids[r]]
    where = Trainer.describe_rows(SimpleNamespace(train_set=packed.train), [1, 0])
    assert where == f"packed rows [1, 0] (training samples {sorted(ids[0] + ids[1])})"
    assert Trainer.describe_rows(SimpleNamespace(train_set=plain.train), [4, 9]) == "training samples [4, 9]"
    assert Trainer.describe_rows(SimpleNamespace(train_set=plain.train), []) == ""
