"""Every YAML in configs/ loads and validates; typos are caught; model facts are resolvable."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dude_dist.config import ConfigError, batch_layout
from dude_dist.config_loader import load_config
from dude_dist.evaluate import TASKS as EVAL_TASKS
from dude_dist.planner import find_model_facts, load_model_facts

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
# Keys every model facts file must give for the planner's formulas.
FACT_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "vocab_size", "tie_word_embeddings", "max_position_embeddings",
             "rms_norm_eps", "torch_dtype")


def _is_local(name_or_path: str) -> bool:
    return name_or_path.startswith(("pkg:", ".", "/", "~")) or (ROOT / name_or_path).exists()


def test_the_glob_finds_the_cluster_configs():
    names = {p.stem for p in CONFIGS}
    assert {"qwen32b", "llama70b", "qwen7b", "mistral7b_metamath", "phi4"} <= names, names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.model.name_or_path
    assert batch_layout(cfg.train, 1).global_batch_size > 0  # one process can always run it
    unknown = set(cfg.eval.tasks) - set(EVAL_TASKS)
    assert not unknown, f"{path.name}: eval.tasks {sorted(unknown)} are not tasks of dude_dist.evaluate"
    header = "".join(line + "\n" for line in path.read_text().splitlines() if line.startswith("#"))
    assert path.read_text().startswith("#"), f"{path.name}: the first line should say what the run is"
    assert f"configs/{path.name}" in header, f"{path.name}: the header comment should show the command that runs it"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_misspelled_key_fails_naming_it_and_its_line(path, tmp_path):
    lines = path.read_text().splitlines()
    # The first key inside a section, e.g. "  name_or_path: ..." -> "  name_or_pathh: ...".
    index = next(i for i, line in enumerate(lines) if re.match(r"^  [a-z_]+:", line))
    key = re.match(r"^  ([a-z_]+):", lines[index])[1]
    section = next(line[:-1].split(":")[0] for line in reversed(lines[:index]) if re.match(r"^[a-z_]+:", line))
    lines[index] = lines[index].replace(f"{key}:", f"{key}x:", 1)
    bad = tmp_path / path.name
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    message = str(err.value)
    assert f"{section}.{key}x" in message, message
    assert f"{bad}:{index + 1}" in message, message
    assert f"did you mean '{section}.{key}'" in message, message


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_model_facts_are_resolvable(path):
    name = load_config(path).model.name_or_path
    if _is_local(name):
        pytest.skip(f"{name} is a local path; its own config.json (if any) is the facts")
    facts_path = find_model_facts(name, models_dirs=[ROOT / "configs" / "models"])
    facts = load_model_facts(facts_path)
    missing = [k for k in FACT_KEYS if k not in facts]
    assert not missing, f"{facts_path.name} lacks {missing}"
