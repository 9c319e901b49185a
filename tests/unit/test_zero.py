"""dude_dist/zero.py: the DeepSpeed config for offload and bf16, and the stage-0-2 memory check."""

from __future__ import annotations

import pytest

from dude_dist.config import ConfigError, batch_layout
from dude_dist.config_loader import load_config
from dude_dist.planner import check_replicated_model_fits
from dude_dist.zero import build_ds_config, single_gpu_zero3_hint

GIB = 2**30


def _cfg(*overrides: str):
    return load_config(None, list(overrides))


def test_offloaded_optimizer_accepts_torch_adamw():
    cfg = _cfg("model.name_or_path=x", "deepspeed.offload_optimizer=cpu", "deepspeed.offload_param=cpu")
    ds = build_ds_config(cfg, batch_layout(cfg.train, 2))
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["zero_force_ds_cpu_optimizer"] is False
    plain = _cfg("model.name_or_path=x")
    assert "zero_force_ds_cpu_optimizer" not in build_ds_config(plain, batch_layout(plain.train, 2))


def test_hpz_and_offload_need_stage3():
    cfg = _cfg("model.name_or_path=x", "deepspeed.hpz_partition_size=8")
    assert build_ds_config(cfg, batch_layout(cfg.train, 16))["zero_optimization"]["zero_hpz_partition_size"] == 8
    with pytest.raises(ConfigError, match="deepspeed.offload_param: 'cpu' needs zero_stage 3"):
        _cfg("model.name_or_path=x", "deepspeed.zero_stage=2", "deepspeed.offload_param=cpu")
    with pytest.raises(ConfigError, match="deepspeed.hpz_partition_size: 8 needs zero_stage 3"):
        _cfg("model.name_or_path=x", "deepspeed.zero_stage=2", "deepspeed.hpz_partition_size=8")


def test_stage2_on_several_ranks_is_refused_when_the_whole_model_does_not_fit():
    llama = _cfg("model.name_or_path=meta-llama/Llama-2-70b-hf", "model.dtype=bfloat16", "deepspeed.zero_stage=2")
    # 69B parameters in bf16 (~128 GiB) on an 80 GiB GPU.
    with pytest.raises(ConfigError, match=r"each GPU would hold the whole model \(12[0-9]\.\d GiB\) but has 80\.0 GiB"):
        check_replicated_model_fits(llama, 8, 8, 2048 * GIB, 80 * GIB)
    # ... and 8 copies of it in 512 GiB of host RAM.
    with pytest.raises(ConfigError, match=r"for the 8 ranks of this node, but the node has 512\.0 GiB of RAM"):
        check_replicated_model_fits(llama, 8, 8, 512 * GIB, None)
    qwen7b = _cfg("model.name_or_path=Qwen/Qwen2.5-7B", "model.dtype=bfloat16", "deepspeed.zero_stage=2")
    check_replicated_model_fits(qwen7b, 8, 8, 1024 * GIB, 80 * GIB)  # 15 GB a rank: fine
    stage3 = _cfg("model.name_or_path=meta-llama/Llama-2-70b-hf", "model.dtype=bfloat16")
    check_replicated_model_fits(stage3, 64, 8, 64 * GIB, 80 * GIB)  # partitioned: never refused here
    check_replicated_model_fits(llama, 1, 1, 64 * GIB, None)  # one process: the planner's business


def test_a_merged_model_too_big_for_one_gpu_is_refused_with_advice(tmp_path, monkeypatch):
    import torch

    from dude_dist.evaluate import check_fits_one_device

    (tmp_path / "model.safetensors").write_bytes(b"\0" * 4096)
    check_fits_one_device(tmp_path, torch.device("cpu"))  # the host: nothing to check
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("P", (), {"total_memory": 4000}))
    with pytest.raises(ConfigError, match=r"do not fit one GPU.*deepspeed --num_gpus 8 launch/evaluate.py"):
        check_fits_one_device(tmp_path, torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("P", (), {"total_memory": 10**6}))
    check_fits_one_device(tmp_path, torch.device("cuda", 0))


def test_zero3_on_one_gpu_without_offload_gets_a_hint_and_nothing_else_does(tmp_path):
    def hint(*overrides, world=1, device="cuda"):
        cfg = _cfg("model.name_or_path=x", "train.global_batch_size=16", *overrides)
        return single_gpu_zero3_hint(build_ds_config(cfg, batch_layout(cfg.train, world)), world, device)

    assert "deepspeed.zero_stage=2" in hint() and "deepspeed.zero_stage=3 on one GPU" in hint()
    assert hint(world=2) is None  # partitions over two GPUs
    assert hint(device="cpu") is None  # no stream to synchronise
    assert hint("deepspeed.offload_param=cpu") is None
    assert hint("deepspeed.zero_stage=2") is None
    override = tmp_path / "ds.json"  # the stage DeepSpeed runs with, a config file merged in
    override.write_text('{"zero_optimization": {"stage": 2}}')
    assert hint(f"deepspeed.config_file={override}") is None


def test_zero_off_needs_fp32_as_deepspeed_accumulates_in_the_model_dtype_there():
    assert _cfg("model.name_or_path=x", "model.dtype=float32", "deepspeed.zero_stage=0").deepspeed.zero_stage == 0
    for dtype in ("bfloat16", "float16"):
        with pytest.raises(ConfigError, match=rf"deepspeed.zero_stage: 0 \(ZeRO off\) needs model.dtype float32, "
                                              rf"got {dtype}.*use zero_stage 2"):
            _cfg("model.name_or_path=x", f"model.dtype={dtype}", "deepspeed.zero_stage=0")
    assert _cfg("model.name_or_path=x", "model.dtype=bfloat16", "deepspeed.zero_stage=2").deepspeed.zero_stage == 2
