"""dude_dist/planner.py and launch/plan.py: parameter counts, ZeRO-3 memory, init plan, CLI."""

from __future__ import annotations

import functools
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dude_dist.config import DudeConfig
from dude_dist.config_loader import load_config
from dude_dist.planner import (
    PlanError,
    activation_bytes,
    build_meta_model,
    count_parameters,
    deepspeed_estimate,
    find_model_facts,
    gathered_elements,
    host_memory,
    inject_dude_shells,
    largest_block,
    largest_module,
    load_model_facts,
    model_facts_name,
    persistent_params,
    plan_run,
    trainable_closed_form,
    zero_model_states,
)
from dude_dist.sharded_init import plan_init

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "configs" / "models"

# Published totals (Hugging Face model pages / safetensors metadata), base model without DuDe.
PUBLISHED_TOTALS = {
    "Qwen/Qwen2.5-32B": 32.76e9,
    "meta-llama/Llama-2-70b-hf": 68.98e9,
    "meta-llama/Llama-3.1-70B": 70.55e9,
    "Qwen/Qwen2.5-7B": 7.62e9,
    "mistralai/Mistral-7B-v0.1": 7.24e9,
    "microsoft/phi-4": 14.66e9,
}
ADAPTERS = {"microsoft/phi-4": DudeConfig(targets=("qkv_proj",))}  # fused q/k/v in Phi-3/Phi-4


@functools.cache
def built(name: str):
    """``(facts, base_total, model_with_dude_shells, shapes)``, built once per test session."""
    facts = load_model_facts(find_model_facts(name, models_dirs=[MODELS]))
    model = build_meta_model(facts)
    base_total, _ = count_parameters(model)
    shapes = inject_dude_shells(model, ADAPTERS.get(name, DudeConfig()))
    return facts, base_total, model, shapes


@pytest.mark.parametrize("name", sorted(PUBLISHED_TOTALS))
def test_total_parameters_match_the_published_count(name):
    _, total, _, _ = built(name)
    assert total == pytest.approx(PUBLISHED_TOTALS[name], rel=0.005), f"{name}: {total:,}"


@pytest.mark.parametrize("name, expected", [
    # 64 x (16*(5120+5120)+5120  +  16*(5120+1024)+1024)
    ("Qwen/Qwen2.5-32B", 17_170_432),
    # 80 x (16*(8192+8192)+8192  +  16*(8192+1024)+1024)
    ("meta-llama/Llama-2-70b-hf", 33_505_280),
    # 40 x (16*(5120+7680)+7680): one fused qkv_proj per layer
    ("microsoft/phi-4", 8_499_200),
])
def test_trainable_equals_closed_form_and_requires_grad_count(name, expected):
    _, base_total, model, shapes = built(name)
    total, trainable = count_parameters(model)
    assert trainable_closed_form(shapes, 16) == expected
    assert trainable == expected
    assert total == base_total + expected  # the shells add A, B, m and nothing else
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(n.rsplit(".", 1)[1] in ("lora_a", "lora_b", "magnitude") for n in trained)


@pytest.mark.parametrize("name", ["Qwen/Qwen2.5-32B", "meta-llama/Llama-2-70b-hf"])
@pytest.mark.parametrize("nodes", [1, 2])
def test_all_trainable_model_states_agree_with_deepspeed_estimator(name, nodes):
    _, _, model, _ = built(name)
    total, _ = count_parameters(model)
    largest, _ = largest_module(model)
    ours = sum(zero_model_states(total, total, largest, largest, nodes * 8).values())
    theirs = deepspeed_estimate(total, largest, num_gpus_per_node=8, num_nodes=nodes)
    assert ours == pytest.approx(theirs, rel=0.10), f"ours {ours / 2**30:.2f} GiB vs DeepSpeed {theirs / 2**30:.2f} GiB"


def test_dude_model_states_are_almost_only_the_partitioned_weights():
    _, _, model, _ = built("Qwen/Qwen2.5-32B")
    total, trainable = count_parameters(model)
    largest, largest_trainable = largest_module(model)
    states = zero_model_states(total, trainable, largest, largest_trainable, 8)
    assert states["params"] == 2 * -(-total // 8)
    assert states["grads"] == 2 * -(-trainable // 8)
    assert states["optimizer"] == 12 * -(-trainable // 8)
    assert largest_trainable == 0  # the largest module is an embedding, frozen
    assert states["grads"] + states["optimizer"] + states["optimizer_step"] < 0.01 * states["params"]


def test_plan_for_equal_layers_splits_evenly():
    plan = plan_init({f"layers.{i}.q_proj": (64, 64) for i in range(8)}, 2, DudeConfig())
    assert [len(plan.layers_of(r)) for r in range(2)] == [4, 4]
    assert plan.load[0] == plan.load[1]


def test_init_rounds_give_each_rank_one_layer_at_a_time_largest_first():
    shapes = {}
    for i in range(5):  # 5 layers of 3 shapes: uneven counts per rank
        shapes[f"layers.{i}.q_proj"] = (256, 256)
        shapes[f"layers.{i}.v_proj"] = (64, 256)
        shapes[f"layers.{i}.up_proj"] = (512, 256)
    for world in (1, 2, 3, 4):
        plan = plan_init(shapes, world, DudeConfig())
        rounds = plan.rounds()
        flat = [n for names in rounds for n in names]
        assert sorted(flat) == sorted(shapes)  # every layer exactly once
        for names in rounds:
            owners = [plan.owners[n] for n in names]
            assert owners == sorted(set(owners))  # at most one layer per rank, in rank order
        for r in range(world):
            costs = [plan.cost[n] for names in rounds for n in names if plan.owners[n] == r]
            assert costs == sorted(costs, reverse=True)
        assert len(rounds) == max(len(plan.layers_of(r)) for r in range(world))


def test_activations_scale_with_tokens_and_checkpointing_saves_memory():
    facts, _, _, _ = built("Qwen/Qwen2.5-7B")
    one = activation_bytes(facts, 1, 512, 2, 1000)
    two = activation_bytes(facts, 2, 512, 2, 1000)
    assert {k: 2 * v for k, v in one.items() if k != "logits"} == {k: v for k, v in two.items() if k != "logits"}
    assert two["logits"] - one["logits"] == 512 * 152064 * 2 * 2  # the chunk's work does not grow
    assert one["checkpoints"] == 28 * 512 * 3584 * 2
    # bf16 logits and their gradient, and the loss's one float32 chunk of 2**24 logits
    assert one["logits"] == 512 * 152064 * 2 * 2 + 4 * 2**24
    # one set of the layer's per-token values (norms 2x5h, q/k/v/rotary/attention 3q+3kv, MLP 4i,
    # residual outputs 2h, DuDe 1000), as measured on a 70B-wide layer
    assert one["recompute_layer"] == 512 * 2 * (10 * 3584 + 3 * 3584 + 3 * 512 + 4 * 18944 + 2 * 3584 + 1000)
    full = activation_bytes(facts, 1, 512, 2, 1000, gradient_checkpointing=False)
    assert full["recompute_layer"] == 28 * one["recompute_layer"] > sum(one.values())


def test_model_fact_files_are_named_after_their_model():
    files = sorted(MODELS.glob("*.json"))
    assert len(files) >= len(PUBLISHED_TOTALS)
    for path in files:
        assert model_facts_name(json.loads(path.read_text())["_name_or_path"]) == path.name


def test_unknown_model_is_an_error_naming_where_it_looked(tmp_path):
    with pytest.raises(PlanError, match=r"org--no-such-model\.json"):
        find_model_facts("org/no-such-model", models_dirs=[tmp_path])


def test_plan_of_a_local_model_fits_or_not_by_gpu_memory(stories_path):
    # randomized: the throughput probe factorises a 4096 x 4096 weight twice, ~1 s (exact: ~30 s)
    cfg = load_config(None, [f"model.name_or_path={stories_path}", "model.dtype=float32",
                             "adapter.rank=4", "adapter.svd=randomized", "data.max_seq_len=128"])
    roomy = plan_run(cfg, 1, 2, gpu_memory_gb=80, compare_deepspeed=False)
    assert roomy.facts_file == str(stories_path / "config.json")
    assert roomy.fits is True
    assert roomy.trainable_params == roomy.trainable_closed_form > 0
    assert roomy.init["svd_gflops_source"].startswith("measured") and roomy.init["svd_gflops"] > 0
    tiny = plan_run(cfg, 1, 2, gpu_memory_gb=0.001, svd_gflops=1.0, compare_deepspeed=False)
    assert tiny.fits is False
    assert tiny.memory.total == roomy.memory.total


def test_plan_cli_prints_json_with_expected_keys():
    # 32 GPUs need a global batch of at least 32 packed rows (the config is sized for 8 or 16).
    cmd = [sys.executable, "launch/plan.py", "--config", "configs/qwen32b.yaml", "--nodes", "4",
           "--gpus-per-node", "8", "--svd-gflops", "20000", "--json", "--set", "train.global_batch_size=32"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    for key in ("model", "world_size", "base_params", "total_params", "trainable_params",
                "trainable_closed_form", "memory", "init", "all_trainable", "gpu_memory_bytes", "fits", "traffic",
                "checkpoint_bytes"):
        assert key in plan, key
    assert isinstance(plan["fits"], bool) and plan["fits"]
    assert plan["world_size"] == 32 and plan["trainable_params"] == plan["trainable_closed_form"] == 17_170_432
    for key in ("params", "grads", "optimizer", "activations", "total"):
        assert plan["memory"][key] > 0, key
    assert plan["memory"]["total"] <= plan["gpu_memory_bytes"]
    init = plan["init"]
    assert len(init["layers_per_rank"]) == 32 and sum(init["layers_per_rank"]) == 128
    assert init["seconds_per_rank"] == pytest.approx([f / 20000e9 for f in init["flops_per_rank"]])
    assert init["bytes_broadcast"] == 4 * 17_170_432
    assert init["bytes_residual"] == 2 * 64 * (5120 * 5120 + 1024 * 5120)
    assert plan["all_trainable"]["ratio"] == pytest.approx(1.0, abs=0.1)


def test_plan_cli_reports_a_missing_model_and_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name_or_path: org/no-such-model\n")
    spec = importlib.util.spec_from_file_location("plan_cli", ROOT / "launch" / "plan.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--config", str(bad), "--no-deepspeed"]) == 2
    assert "org--no-such-model.json" in capsys.readouterr().err


def test_gather_traffic_flat_and_hierarchical():
    from dude_dist.planner import gather_traffic

    # 8 nodes x 8 GPUs, 100 bytes of frozen weights, 2 micro-batches x 3 passes.
    t = gather_traffic(100, nodes=8, gpus_per_node=8, micro_batches=2, passes=3)
    assert t["flat"]["total"] == pytest.approx(6 * 100 * 63 / 64)
    assert t["flat"]["inter_node"] == pytest.approx(6 * 100 * 56 / 64)
    assert t["hpz"]["total"] == pytest.approx(6 * 100 * 7 / 8) and t["hpz"]["inter_node"] == 0
    assert t["hpz_extra_bytes_per_gpu"] == pytest.approx(100 / 8)
    one_node = gather_traffic(100, nodes=1, gpus_per_node=8, micro_batches=1, passes=2)
    assert one_node["flat"]["inter_node"] == 0 and one_node["hpz_extra_bytes_per_gpu"] == 0


def test_a_whole_decoder_layer_is_gathered_not_only_the_largest_module():
    _, _, model, _ = built("meta-llama/Llama-2-70b-hf")
    total, _ = count_parameters(model)
    block = largest_block(model)
    # 4 attention projections (8192^2 twice, 1024x8192 twice), 3 MLP (28672x8192), 2 norms, DuDe q,v
    attention = 2 * 8192 * 8192 + 2 * 1024 * 8192
    mlp = 3 * 28672 * 8192
    dude = 16 * (8192 + 8192) + 8192 + 16 * (8192 + 1024) + 1024
    assert block == attention + mlp + 2 * 8192 + dude
    largest, _ = largest_module(model)
    assert largest == 32000 * 8192  # an embedding: far less than a layer
    live = gathered_elements(total, block, largest, prefetch=50_000_000)
    # the last layer, the LM head fetched while it is still held, and the embedding
    assert live == block + 2 * largest
    assert gathered_elements(total, block, 1_000, prefetch=50_000_000) == block + 50_000_000 + 1_000
    # What is kept for reuse is at most stage3_max_live_parameters; a model without a layer stack
    # keeps its largest module; the whole is at most the model.
    assert gathered_elements(total, block, largest, prefetch=0, max_live=500_000_000) == 500_000_000 + 2 * largest
    assert gathered_elements(total, 0, largest, prefetch=0) == 3 * largest
    assert gathered_elements(300_000_000, block, largest, prefetch=0) == 300_000_000


def test_plan_gathers_a_layer_and_keeps_every_trainable_parameter_whole():
    cfg = load_config(ROOT / "configs" / "llama70b.yaml")
    plan = plan_run(cfg, 1, 8, svd_gflops=1000.0, compare_deepspeed=False)
    _, _, model, _ = built("meta-llama/Llama-2-70b-hf")
    assert plan.memory.gathered == 2 * (largest_block(model) + 2 * 32000 * 8192)
    threshold = cfg.deepspeed.stage3_param_persistence_threshold
    frozen_small = sum(p.numel() for p in model.parameters() if not p.requires_grad and p.numel() <= threshold)
    assert plan.memory.persistent == 2 * (frozen_small + plan.trainable_params)
    assert persistent_params(model, threshold, trainable_whole=False) < frozen_small + plan.trainable_params
    assert plan.memory.persistent == 2 * persistent_params(model, cfg.deepspeed.stage3_param_persistence_threshold)
    # Rank 0 maps the whole bf16 checkpoint while loading; every rank holds two largest modules.
    assert plan.host["checkpoint_mapped_by_rank0"] == 2 * plan.base_params
    assert plan.loading_bytes == plan.memory.params + plan.memory.buffers + 2 * 2 * 32000 * 8192
    # The owner of a q_proj holds it gathered (bf16) and as float32 while it factorises.
    assert plan.init["transient_bytes"] == 6 * 8192 * 8192


def test_host_memory_adds_offloaded_states_and_the_checkpoint_on_node_zero():
    kw = dict(params_partition=100, optimizer_partition=10, per_rank=1000)
    none = host_memory(5_000, 7, 8, 2, offload_param=False, offload_optimizer=False, **kw)
    assert none["node_steady"] == 8 * 1000
    assert none["node0_while_loading"] == 8 * 1000 + 2 * 5_000
    assert none["module_while_loading_per_rank"] == 2 * 2 * 7
    both = host_memory(5_000, 7, 8, 2, offload_param=True, offload_optimizer=True, **kw)
    assert both["node_steady"] == 8 * (1000 + 110)
    opt = host_memory(5_000, 7, 8, 2, offload_param=False, offload_optimizer=True, **kw)
    assert opt["offloaded_per_rank"] == 10


def test_one_rank_gathers_nothing_into_new_memory():
    """ZeRO-3 on one GPU: the partition is the whole weight (measured on an H200, benchmarks/scale.py --gpu)."""
    cfg = load_config(ROOT / "configs" / "mistral7b_metamath.yaml")
    one = plan_run(cfg, 1, 1, svd_gflops=1000.0, compare_deepspeed=False)
    eight = plan_run(cfg, 1, 8, svd_gflops=1000.0, compare_deepspeed=False)
    assert one.memory.gathered == one.memory.in_flight == 0
    assert all(parts["gathered"] == parts["in_flight"] == 0 for parts in one.memory.phases.values())
    assert eight.memory.gathered > 0 and eight.memory.in_flight > 0
    largest = 32000 * 4096
    assert one.host["module_while_loading_per_rank"] == 2 * largest
    assert eight.host["module_while_loading_per_rank"] == 2 * 2 * largest
    assert one.memory.total == (one.memory.params + one.memory.grads + one.memory.optimizer + one.memory.persistent
                                + one.memory.buffers + one.memory.buckets + one.memory.activations
                                + one.memory.reserve)


def test_a_layer_smaller_than_the_lm_head_is_kept_as_itself():
    """Qwen2.5-32B: a 488M layer, a 778M LM head and embedding; the layer is not counted at 778M."""
    _, _, model, _ = built("Qwen/Qwen2.5-32B")
    total, _ = count_parameters(model)
    block, (largest, _) = largest_block(model), largest_module(model)
    assert block < largest == 152064 * 5120
    assert gathered_elements(total, block, largest, prefetch=50_000_000) == block + 2 * largest
