"""Merged export from a 2-rank ZeRO-3 run: a plain Hugging Face folder with the training model's logits."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from dude_dist.checkpoint import find_resume
from dude_dist.config_loader import load_config
from dude_dist.export import rebuild_model
from tests.helpers import ROOT, launcher_cmd, proc_env, run, summary, train

pytestmark = pytest.mark.slow

PLAIN_LOAD = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
ids = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    logits = model(input_ids=ids).logits
torch.save(logits, sys.argv[3])
assert not any(m.startswith("dude_dist") for m in sys.modules), "dude_dist was imported"
print(type(model).__name__, sorted({type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__}))
"""


def test_export_from_two_rank_zero3_run(tmp_path):
    out = tmp_path / "run"
    overrides = ("train.max_steps=6", "train.save_every=0")
    train(out, *overrides, nproc=2, launcher="torchrun")
    exported = tmp_path / "exported"
    run(launcher_cmd(2) + ["launch/export.py", "--config", "configs/tiny_cpu.yaml", "--set", f"output_dir={out}",
                           "--checkpoint", "auto", "--out", str(exported)], timeout=300)
    files = sorted(p.name for p in exported.iterdir())
    assert "model.safetensors" in files and "config.json" in files and "tokenizer.json" in files, files

    ids = [[1, 45, 67, 89, 12, 300, 250, 7], [1, 400, 3, 99, 101, 102, 103, 104]]
    logits_file = tmp_path / "plain_logits.pt"
    proc = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(exported), json.dumps(ids), str(logits_file)],
                          cwd=tmp_path, env=proc_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "LlamaForCausalLM" in proc.stdout and "DudeLinear" not in proc.stdout
    plain = torch.load(logits_file, weights_only=True)

    # The training model, rebuilt from the base weights + factor cache + the checkpoint's DuDe tensors.
    cfg = load_config(ROOT / "configs/tiny_cpu.yaml", [f"output_dir={out}", *overrides])
    model = rebuild_model(cfg, find_resume(out / "checkpoints"))
    with torch.no_grad():
        dude_logits = model(input_ids=torch.tensor(ids)).logits
    assert (plain - dude_logits).abs().max().item() <= 1e-4

    # Each exported weight is W' = m (W_f + B A) / ||W_f + B A||_row, materialised here in float64
    # from the checkpoint's tensors (not through the code under test's row_norm/merged_weight).
    from safetensors.torch import load_file

    from dude_dist.adapters import get_dude_layers

    weights = load_file(str(exported / "model.safetensors"))
    layers = get_dude_layers(model)
    assert len(layers) == 10
    for name, layer in layers.items():
        full = layer.weight.double() + layer.lora_b.detach().double() @ layer.lora_a.detach().double()
        want = layer.magnitude.detach().double()[:, None] * full / full.norm(dim=1, keepdim=True)
        got = weights[f"{name}.weight"].double()
        assert (got - want).abs().max().item() <= 1e-6 * want.abs().max().item(), name

    # ... and it is the model the 2-rank engine trained: the same held-out loss.
    from dude_dist.data import build_datasets
    from dude_dist.evaluate import eval_loss
    from dude_dist.models import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    data = build_datasets(cfg.data, tokenizer)
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
    loss = eval_loss(merged, data.eval, tokenizer.pad_token_id, batch_size=4)["loss"]
    assert loss == pytest.approx(summary(out)["eval_loss_end"], rel=1e-4)

    # The PEFT DoRA export (rank 2r on the original base weights) loads with PeftModel alone
    # and gives the same logits as the merged export and the trained DuDe model.
    adapter = tmp_path / "adapter"
    run(launcher_cmd(1, "python") + ["launch/export.py", "--config", "configs/tiny_cpu.yaml", "--set",
                                     f"output_dir={out}", "--format", "peft", "--out", str(adapter)], timeout=300)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["r"] == config["lora_alpha"] == 8
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        peft_logits = peft_model(input_ids=torch.tensor(ids)).logits
    assert (peft_logits - plain).abs().max().item() <= 1e-4
    assert (peft_logits - dude_logits).abs().max().item() <= 1e-4
    # A, A0 [r, in], B, B0 [out, r] and m [out]: 2 r (in + out) + out numbers per layer, nothing else.
    from safetensors.torch import load_file as load_tensors

    stored = load_tensors(str(adapter / "adapter_model.safetensors"))
    per_layer = {n: 2 * 4 * (layer.in_features + layer.out_features) + layer.out_features
                 for n, layer in layers.items()}
    assert sum(t.numel() for t in stored.values()) == sum(per_layer.values())
