"""Model FLOPs of adapter training and MFU (dude_dist/throughput.py) against counted FLOPs.

    OMP_NUM_THREADS=1 python -m pytest tests/unit/test_throughput.py -q
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

from dude_dist import DudeConfig, apply_dude
from dude_dist.throughput import PEAK_TFLOPS, FlopModel, peak_tflops, throughput_scalars


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0),
    ("AMD Instinct MI300X", 1307.0),
])
def test_known_devices_get_their_bf16_peak(name, peak):
    assert peak_tflops(name) == peak


def test_unknown_devices_have_no_peak_unless_given():
    assert peak_tflops("Tesla T4") is None and peak_tflops("cpu") is None
    assert peak_tflops("Tesla T4", override=65.0) == 65.0
    assert peak_tflops("NVIDIA H100 80GB HBM3", override=500.0) == 500.0
    assert all(value > 0 for value in PEAK_TFLOPS.values())


def stories_dude(stories_path, rank: int = 4, **adapter) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(stories_path, dtype=torch.float32, attn_implementation="eager")
    apply_dude(model, DudeConfig(targets=("q_proj", "v_proj"), rank=rank, **adapter))
    return model.train()


def test_flop_model_reads_the_shapes_of_the_model(stories_path):
    model = stories_dude(stories_path)
    c = model.config  # hidden 64, 5 layers, 8 heads (4 kv), MLP 172, vocab 512
    kv = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    per_layer = 2 * c.hidden_size * c.hidden_size + 2 * c.hidden_size * kv + 3 * c.hidden_size * c.intermediate_size
    fm = FlopModel.from_model(model, checkpointing=False)
    assert fm.head == c.vocab_size * c.hidden_size
    assert fm.frozen == c.num_hidden_layers * per_layer + fm.head
    q, v = (c.hidden_size, c.hidden_size), (kv, c.hidden_size)
    assert fm.adapter == c.num_hidden_layers * sum(2 * 4 * (o + i) for o, i in (q, v))
    assert fm.norms == fm.norm_grads == c.num_hidden_layers * sum(2 * 4 * o * i for o, i in (q, v))
    assert fm.rebuilt == 0 and fm.attention_width == c.num_hidden_layers * c.hidden_size
    detached = FlopModel.from_model(stories_dude(stories_path, norm_grad="detach", recompute=True), False)
    assert detached.norm_grads == 0 and detached.rebuilt == c.num_hidden_layers * sum(2 * o * i for o, i in (q, v))


@pytest.mark.parametrize("checkpointing,kept", [(False, None), (True, None), (True, 30)])
def test_step_flops_match_the_flops_torch_counts(stories_path, checkpointing, kept):
    model = stories_dude(stories_path)
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    n = 100
    ids = torch.randint(3, 500, (1, n), generator=torch.Generator().manual_seed(0))
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)  # every input gradient runs
    # DudeLinear's fused function adds its low-rank products in place (addmm_), which torch's
    # counter has no formula for: count them as the addmm they are.
    in_place = {torch.ops.aten.addmm_: lambda acc, a, b, **kwargs: 2 * a[0] * a[1] * b[1]}
    # kept: the LM head runs at these positions only (a packed row's labelled targets)
    positions = {} if kept is None else {"logits_to_keep": torch.arange(0, 2 * kept, 2)}
    with FlopCounterMode(display=False, custom_mapping=in_place) as counter:
        model(inputs_embeds=embeds, use_cache=False, **positions).logits.pow(2).mean().backward()
    fm = FlopModel.from_model(model, checkpointing)
    expected = fm.step_flops(n, n * n, passes=1, logits=kept)
    # eager attention multiplies the whole n x n square, where the model counts its causal half
    expected += (3 + checkpointing) * 2 * fm.attention_width * n * n
    if checkpointing:
        # torch's non-reentrant checkpoint stops recomputing once the saved tensors are back: a
        # frozen down_proj saves nothing, so the last matmul of each layer is not recomputed
        c = model.config
        expected -= c.num_hidden_layers * 2 * c.hidden_size * c.intermediate_size * n
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-3)


def test_six_n_overstates_adapter_training(stories_path):
    fm = FlopModel.from_model(stories_dude(stories_path), checkpointing=False)
    tokens = 1000
    ratio = fm.six_n_flops(tokens) / fm.step_flops(tokens, 0, passes=0)
    assert ratio == pytest.approx(6 * fm.frozen / (4 * fm.frozen + 3 * fm.adapter))
    assert 1.45 < ratio <= 1.5  # frozen weights get no weight gradient: 4N, not 6N
    with_recompute = FlopModel.from_model(stories_dude(stories_path), checkpointing=True)
    assert with_recompute.step_flops(tokens, 0, 0) - fm.step_flops(tokens, 0, 0) == pytest.approx(
        tokens * (2 * (fm.frozen - fm.head) + fm.adapter))


def test_throughput_scalars():
    out = throughput_scalars(flops=8e12, tokens=3000, slots=4000, seconds=2.0, world_size=2, peak=1000.0)
    assert out["train/tokens_per_s"] == 1500.0
    assert out["train/padding_ratio"] == 0.25
    assert out["train/model_tflops_per_s"] == 2.0  # per device: 8e12 / 2 s / 2 devices
    assert out["train/mfu"] == 0.002
    assert "train/mfu" not in throughput_scalars(8e12, 3000, 3000, 2.0, 2, None)
    assert throughput_scalars(8e12, 3000, 3000, 2.0, 2, None)["train/padding_ratio"] == 0.0


def test_the_planner_states_step_time_at_a_given_peak_and_mfu(stories_path):
    from dude_dist.config_loader import load_config
    from dude_dist.planner import format_plan, plan_run

    cfg = load_config(None, [f"model.name_or_path={stories_path}", "model.dtype=float32", "adapter.rank=4",
                             "data.max_seq_len=128", "train.micro_batch_size=2", "train.global_batch_size=8"])
    plan = plan_run(cfg, 1, 2, svd_gflops=1.0, compare_deepspeed=False, peak_tflops=100.0, mfu=0.5)
    step = plan.step
    fm = FlopModel.from_model(stories_dude(stories_path), checkpointing=True)
    assert step["tokens_per_step"] == 8 * 128
    # 2 ranks x 2 accumulation steps = 4 forward passes; attention over whole 128-token rows
    assert step["flops_per_step"] == pytest.approx(fm.step_flops(8 * 128, 8 * 128 * 128, passes=4))
    assert step["step_seconds"] == pytest.approx(step["flops_per_step"] / (2 * 100e12 * 0.5))
    assert step["tflops_per_gpu"] == pytest.approx(50.0)
    assert "at MFU 50% of 100 TFLOP/s per GPU" in format_plan(plan)
    assert plan.to_dict()["step"] == step


@pytest.mark.parametrize("flags,message", [
    (["--mfu", "0"], r"--mfu 0.0: must be a fraction in \(0, 1\]"),
    (["--mfu", "1.5"], r"--mfu 1.5: must be a fraction"),
    (["--peak-tflops", "-1"], r"--peak-tflops -1.0: must be one GPU's positive bf16 peak"),
])
def test_plan_cli_refuses_an_impossible_peak_or_mfu(flags, message, capsys):
    import importlib.util
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("plan_cli", root / "launch" / "plan.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--config", str(root / "configs" / "qwen32b.yaml"), "--no-deepspeed", *flags]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_step_throughput_counts_the_lm_head_at_the_step_targets(stories_path):
    import numpy as np

    from dude_dist.data import RowCounts
    from dude_dist.throughput import StepThroughput

    class TwoRanks:  # step 0: rank 0 has rows [0, 1] then [2]; rank 1 has row [3]
        def micro_batches(self, step, rank):
            return [[0, 1], [2]] if rank == 0 else [[3]]

    counts = RowCounts(tokens=np.array([10, 20, 30, 40]), targets=np.array([4, 5, 6, 7]),
                       square_lengths=np.array([100, 400, 500, 1600]))
    model = stories_dude(stories_path)
    meter = StepThroughput(model, TwoRanks(), counts, world_size=2, device=torch.device("cpu"), checkpointing=True)
    out = meter.scalars(0, seconds=0.5)
    fm = FlopModel.from_model(model, checkpointing=True)
    expected = fm.step_flops(100, 2600, passes=3, logits=22)
    assert out["train/model_tflops_per_s"] * 0.5 * 2 * 1e12 == pytest.approx(expected, rel=1e-12)
    assert expected < fm.step_flops(100, 2600, passes=3)  # the prompts' logits are not model work
    assert out["train/tokens_per_s"] == 200.0 and out["train/padding_ratio"] == pytest.approx(1 - 100 / 110)  # slots 2*20 + 30 + 40
