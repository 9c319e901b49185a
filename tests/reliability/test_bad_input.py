"""Bad input through the CLI (``python launch/train.py``): a broken YAML, bad values, bad
data, a bad model path, an unwritable output dir. Each run must end with one ``error:``
line that names the file, line or key and what would be valid, exit 2 without a
traceback, and leave nothing a later ``--resume auto`` could mistake for a good run.

tests/unit/test_config.py and test_data.py check the messages in depth; here every case
goes end to end. The cases run side by side in one fixture (start-up dominates).

    OMP_NUM_THREADS=1 python -m pytest tests/reliability/test_bad_input.py -q
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import PY, ROOT, run

BASE_YAML = (ROOT / "configs" / "tiny_cpu.yaml").read_text()
STORIES = ROOT.parent / "shared" / "models" / "stories260K"
GSM8K_TRAIN = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
# What a failed start must not leave behind (a later --resume auto or a reader would trust it).
RUN_OUTPUTS = ("checkpoints", "summary.json", "metrics.jsonl", "tensorboard", "dude_init")


@dataclass
class Case:
    """One bad input: how to make it (YAML edits, ``--set`` overrides, files) and the message."""

    yaml_edit: tuple[str, str] | None = None  # (old, new) applied to configs/tiny_cpu.yaml
    config: str | None = None  # a config path to pass instead of the edited copy
    overrides: tuple[str, ...] = ()
    expect: str = ""  # regex the error line must match ({yaml} = the config path)
    before_model: bool = True  # fails before the model loads ("init plan" never logged)
    before_data: bool = False  # fails before any data is read


def _make_files(tmp: Path) -> dict[str, str]:
    """Bad data files and model folders; returns placeholders for the case table."""
    with open(GSM8K_TRAIN) as f:
        lines = [next(f) for _ in range(8)]
    (tmp / "malformed.jsonl").write_text("".join(lines[:3]) + '{"question": "unterminated\n' + "".join(lines[3:]))
    (tmp / "fields.jsonl").write_text("".join(json.dumps({"prompt": json.loads(x)["question"]}) + "\n" for x in lines))
    (tmp / "empty.jsonl").write_text("")
    bert = tmp / "encoder_model"  # an encoder-only model: no causal LM head exists for it
    bert.mkdir()
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(STORIES / name, bert / name)
    (bert / "config.json").write_text(json.dumps({
        "model_type": "distilbert", "architectures": ["DistilBertForMaskedLM"], "vocab_size": 512, "dim": 32,
        "hidden_dim": 64, "n_layers": 1, "n_heads": 2, "max_position_embeddings": 512}))
    (tmp / "a_file").write_text("not a folder")
    return {"tmp": str(tmp)}


CASES: dict[str, Case] = {
    # ---- the YAML file
    "yaml_syntax": Case(yaml_edit=("  rank: 4\n", "  rank: 4: 5\n"), before_data=True,
                        expect=r"{yaml}:{line_of_rank}: YAML syntax error: mapping values are not allowed here"),
    "unknown_key": Case(yaml_edit=("  max_steps: 20\n", "  max_step: 20\n"), before_data=True,
                        expect=r"{yaml}:\d+: unknown key 'train.max_step'; did you mean 'train.max_steps'\? "
                               r"\(valid keys here: micro_batch_size, .*\)"),
    "wrong_type": Case(yaml_edit=("  max_steps: 20\n", "  max_steps: twenty\n"), before_data=True,
                       expect=r"{yaml}:\d+: train.max_steps: expected an integer, got 'twenty'"),
    "rank_zero": Case(yaml_edit=("  rank: 4\n", "  rank: 0\n"), before_data=True,
                      expect=r"{yaml}:{line_of_rank}: adapter.rank: must be > 0, got 0"),
    "lr_negative": Case(overrides=("train.lr=-1e-4",), before_data=True,
                        expect=r"--set: train.lr: must be > 0, got -0.0001"),
    "warmup_one": Case(overrides=("train.warmup_ratio=1.0",), before_data=True,
                       expect=r"--set: train.warmup_ratio: must be in \[0, 1\), got 1.0"),
    "config_missing": Case(config="{tmp}/nope.yaml", before_data=True,
                           expect=r"config file '{tmp}/nope.yaml' does not exist"),
    "batch_vs_world": Case(overrides=("train.global_batch_size=3",), before_data=True,
                           expect=r"train.global_batch_size: 3 is not a multiple of micro_batch_size 2 x world size 1 "
                                  r"= 2; valid values include \[2, 4, 6, 8\]"),
    "targets_match_nothing": Case(overrides=("adapter.targets=[qkv_proj]",), before_model=False,
                                  expect=r"adapter.targets \['qkv_proj'\] match no nn.Linear in LlamaForCausalLM; "
                                         r"Linear module names there: down_proj, .*q_proj, up_proj, v_proj"),
    # ---- data
    "data_missing": Case(overrides=("data.sources=[{tmp}/no_such.jsonl]",),
                         expect=r"none of data.sources could be loaded .*\n.*no such file or folder: "
                                r"'{tmp}/no_such.jsonl'"),
    "data_malformed_line": Case(overrides=("data.sources=[{tmp}/malformed.jsonl]",),
                                expect=r"{tmp}/malformed.jsonl:4: invalid JSON: Unterminated string"),
    "data_missing_fields": Case(overrides=("data.sources=[{tmp}/fields.jsonl]",),
                                expect=r"format 'gsm8k' expects fields question, answer, but .*fields.jsonl has "
                                       r"fields prompt \(missing: question, answer\)"),
    "data_empty": Case(overrides=("data.sources=[{tmp}/empty.jsonl]",), expect=r"{tmp}/empty.jsonl: the file is empty"),
    "data_all_too_long": Case(overrides=("data.max_seq_len=8",),
                              expect=r"train.jsonl: every one of the 512 samples has a prompt of at least "
                                     r"max_seq_len=8 tokens .*; raise data.max_seq_len above \d+"),
    # ---- model
    "model_missing": Case(overrides=("model.name_or_path=./does/not/exist",), before_data=True,
                          expect=r"model.name_or_path './does/not/exist' does not exist"),
    "model_not_causal": Case(overrides=("model.name_or_path={tmp}/encoder_model",),
                             expect=r"model.name_or_path '{tmp}/encoder_model' is a 'distilbert' model, not a causal "
                                    r"LM"),
    # ---- disk
    "output_dir_unwritable": Case(overrides=("output_dir={tmp}/a_file/run",), before_data=True,
                                  expect=r"output_dir '{tmp}/a_file/run' is not writable"),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path, str]]:
    """Run every case (side by side); name -> (process, its output_dir, its expected regex)."""
    tmp = tmp_path_factory.mktemp("bad_input")
    fill = _make_files(tmp)
    fill["line_of_rank"] = str(BASE_YAML.splitlines().index("  rank: 4") + 1)

    def launch(name: str) -> tuple[subprocess.CompletedProcess, Path, str]:
        case = CASES[name]
        out = tmp / f"out_{name}"
        config = tmp / f"{name}.yaml"
        text = BASE_YAML
        if case.yaml_edit:
            assert case.yaml_edit[0] in text, case.yaml_edit
            text = text.replace(*case.yaml_edit)
        config.write_text(text)
        escaped = {key: re.escape(value) for key, value in {**fill, "yaml": str(config)}.items()}
        if case.config:
            config = Path(case.config.format(**fill))
        overrides = [f"output_dir={out}"] + [o.format(**fill) for o in case.overrides]  # later --set wins
        out = Path([o for o in overrides if o.startswith("output_dir=")][-1].split("=", 1)[1])
        cmd = [PY, "launch/train.py", "--config", str(config), "--resume", "auto"]
        for item in overrides:
            cmd += ["--set", item]
        proc = run(cmd, timeout=180, check=False)
        return proc, out, case.expect.format(**escaped)

    with ThreadPoolExecutor(2) as pool:
        return dict(zip(CASES, pool.map(launch, CASES)))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_error_line_and_leaves_nothing(results, name):
    case = CASES[name]
    proc, out, expect = results[name]
    text = proc.stderr
    assert proc.returncode == 2 and "Traceback" not in text, f"exit {proc.returncode}:\n{text[-4000:]}"
    assert len(re.findall(r"^error: ", text, re.MULTILINE)) == 1, text[-4000:]
    message = text[text.index("error: ") + len("error: "):]  # the error is the last thing printed
    assert re.search(expect, message), f"{message!r} does not match {expect!r}"
    if case.before_model:
        assert "init plan" not in text and "trainable parameters" not in text, text[-4000:]
    if case.before_data:
        assert "dude_dist.data" not in text, text[-4000:]
    left = [name for name in RUN_OUTPUTS if (out / name).exists()]
    assert not left, f"a failed start left {left} in {out}"


def test_tokenizer_without_pad_token_is_given_one():
    """stories260K has no pad token; loading it for training gives it one (no crash)."""
    from transformers import AutoTokenizer

    from dude_dist.config import ModelConfig
    from dude_dist.models import load_tokenizer

    assert AutoTokenizer.from_pretrained(STORIES).pad_token_id is None
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(STORIES)))
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id == tokenizer.unk_token_id
