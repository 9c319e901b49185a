"""Data loading, prompt formats and tokenisation (dude_dist/data.py) on the real data files.

    OMP_NUM_THREADS=1 python -m pytest tests/unit/test_data.py -q
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from dude_dist import data
from dude_dist.config import DataConfig
from dude_dist.data import (
    DataError,
    build_datasets,
    collate_batch,
    ensure_pad_token,
    gsm8k_prompt,
    instruction_prompt,
    load_records,
    question_prompt,
)

datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def tokenizer(stories_path: Path):
    return AutoTokenizer.from_pretrained(stories_path)


def read_jsonl(path: Path, n: int) -> list[dict]:
    with open(path) as f:
        return [json.loads(next(f)) for _ in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def check_sample(tokenizer, sample: dict, prompt: str, response: str) -> None:
    """Prompt ids carry -100, the rest is labelled with its own ids and ends in eos."""
    ids, labels = sample["input_ids"], sample["labels"]
    prompt_ids = tokenizer(prompt)["input_ids"]
    n = len(prompt_ids)
    assert ids[:n] == prompt_ids
    assert labels[:n] == [-100] * n
    assert labels[n:] == ids[n:]
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[n:-1]).strip() == response.strip()


# --------------------------------------------------------------------------- formats on real data


def test_gsm8k_format_on_real_train_data(tokenizer, data_dir):
    cfg = DataConfig(sources=(str(data_dir / "gsm8k"),), format="gsm8k", limit=16, max_seq_len=4096)
    out = build_datasets(cfg, tokenizer)
    records = read_jsonl(data_dir / "gsm8k" / "train.jsonl", 16)
    assert len(out.train) == 16 and out.train.column_names == ["input_ids", "labels"]
    for sample, record in zip(out.train, records):
        check_sample(tokenizer, sample, f"Question: {record['question']}\nAnswer:", record["answer"])
    assert out.stats["samples"] == 16 and out.stats["truncated"] == 0 and out.stats["dropped"] == 0
    assert out.stats["tokens"] == sum(len(s["input_ids"]) for s in out.train)
    assert out.stats["label_tokens"] == sum(sum(x != -100 for x in s["labels"]) for s in out.train)
    assert out.eval is None


@pytest.mark.parametrize("task", ["boolq", "ARC-Challenge"])
def test_commonsense_format_on_real_train_data(tokenizer, data_dir, task):
    cfg = DataConfig(sources=(str(data_dir / "commonsense" / task),), format="commonsense", limit=8, max_seq_len=4096)
    out = build_datasets(cfg, tokenizer)
    records = json.loads((data_dir / "commonsense" / task / "train.json").read_text())[:8]
    for sample, record in zip(out.train, records):
        prompt = instruction_prompt(record["instruction"], record["input"])
        assert prompt.startswith("Below is an instruction that describes a task.")
        assert prompt.endswith(f"### Instruction:\n{record['instruction']}\n\n### Response:\n")
        check_sample(tokenizer, sample, prompt, record["output"])


@pytest.mark.parametrize("fmt", ["commonsense", "alpaca"])
def test_math_data_in_instruction_formats(tokenizer, data_dir, fmt):
    # math_data/train.json is LLM-Adapters' layout: instruction, input, output, answer.
    cfg = DataConfig(sources=(str(data_dir / "math_data"),), format=fmt, limit=4, max_seq_len=4096)
    out = build_datasets(cfg, tokenizer)
    records = json.loads((data_dir / "math_data" / "train.json").read_text())[:4]
    for sample, record in zip(out.train, records):
        check_sample(tokenizer, sample, instruction_prompt(record["instruction"]), record["output"])


def test_alpaca_without_input_column(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Add 2 and 3.", "output": "5"}])
    out = build_datasets(DataConfig(sources=(str(path),), format="alpaca"), tokenizer)
    check_sample(tokenizer, out.train[0], instruction_prompt("Add 2 and 3."), "5")


def test_metamathqa_format(tokenizer, data_dir, tmp_path):
    rows = [{"query": r["question"], "response": r["answer"]} for r in read_jsonl(data_dir / "gsm8k" / "train.jsonl", 4)]
    out = build_datasets(DataConfig(sources=(str(write_jsonl(tmp_path / "mm.jsonl", rows)),), format="metamathqa",
                                    max_seq_len=4096), tokenizer)
    for sample, row in zip(out.train, rows):
        check_sample(tokenizer, sample, instruction_prompt(row["query"]), row["response"])


def chat_rows(data_dir: Path, n: int) -> list[dict]:
    return [{"messages": [{"role": "system", "content": "Solve it."}, {"role": "user", "content": r["question"]},
                          {"role": "assistant", "content": r["answer"]}]}
            for r in read_jsonl(data_dir / "gsm8k" / "train.jsonl", n)]


def test_chat_format_without_template(tokenizer, data_dir, tmp_path):
    rows = chat_rows(data_dir, 3)
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    out = build_datasets(DataConfig(sources=(str(path),), format="chat", max_seq_len=4096), tokenizer)
    for sample, row in zip(out.train, rows):
        question, answer = row["messages"][1]["content"], row["messages"][2]["content"]
        check_sample(tokenizer, sample, f"system: Solve it.\nuser: {question}\nassistant:", answer)


def test_chat_format_with_template(stories_path, data_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(stories_path)
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>"
                         "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    rows = chat_rows(data_dir, 2)
    out = build_datasets(DataConfig(sources=(str(write_jsonl(tmp_path / "c.jsonl", rows)),), format="chat",
                                    max_seq_len=4096), tok)
    for sample, row in zip(out.train, rows):
        ids, labels = sample["input_ids"], sample["labels"]
        assert ids.count(tok.bos_token_id) == 1  # the template's bos, not a second one
        first = next(i for i, x in enumerate(labels) if x != -100)
        assert tok.decode(ids[:first]).endswith("<|assistant|>\n")
        assert labels[first:] == ids[first:]
        assert ids[-1] == tok.eos_token_id and ids[-2] != tok.eos_token_id  # the template's eos, not doubled
        assert tok.decode(ids[first:], skip_special_tokens=True).strip() == row["messages"][2]["content"]


def test_question_prompt_matches_training_prompts():
    assert question_prompt("gsm8k", "What is 2+2?") == gsm8k_prompt("What is 2+2?") == "Question: What is 2+2?\nAnswer:"
    assert question_prompt("metamathqa", "Q") == question_prompt("alpaca", "Q") == instruction_prompt("Q")
    with pytest.raises(DataError, match="chat"):
        question_prompt("chat", "Q")


# --------------------------------------------------------------------------- loading


def test_folder_split_and_source_fallback(data_dir):
    assert len(load_records((str(data_dir / "gsm8k"),), "test")) == 1319
    ds = load_records(("/nonexistent/gsm8k.jsonl", str(data_dir / "gsm8k" / "test.jsonl")), "test")
    assert len(ds) == 1319 and ds[0]["question"].startswith("Janet")


def test_parquet_file(data_dir, tmp_path):
    rows = read_jsonl(data_dir / "gsm8k" / "test.jsonl", 5)
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "test.parquet")
    assert load_records((str(tmp_path),), "test").to_list() == rows


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "train.jsonl"
    with pytest.raises(DataError, match=f"no such file or folder: '{missing}'"):
        load_records((str(missing),), "train")


def test_folder_without_split_lists_its_files(data_dir):
    with pytest.raises(DataError, match=r"no file for split 'train'.*test\.json"):
        load_records((str(data_dir / "commonsense" / "piqa"),), "train")


def test_every_failed_source_is_listed(tmp_path):
    with pytest.raises(DataError) as info:
        load_records((str(tmp_path / "a.jsonl"), "someone/not-cached-dataset"), "train")
    message = str(info.value)
    assert f"- {tmp_path / 'a.jsonl'}: no such file" in message
    assert "- someone/not-cached-dataset: not a local file or folder, and loading it as a hub dataset failed" in message


def test_malformed_jsonl_reports_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "a", "answer": "#### 1"}\n{"question": "b", "answer": "#### 2"}\n'
                    '{"question": "c", "answer": }\n{"question": "d", "answer": "#### 4"}\n')
    with pytest.raises(DataError, match=f"{path}:3: invalid JSON"):
        load_records((str(path),), "train")


def test_malformed_json_array_reports_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]\n')
    with pytest.raises(DataError, match=f"{path}:3: invalid JSON"):
        load_records((str(path),), "train")


@pytest.mark.parametrize("content", ["", "\n", "[]"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.json"
    path.write_text(content)
    with pytest.raises(DataError, match="empty|no records"):
        load_records((str(path),), "train")


def test_missing_fields_name_expected_found_and_file(tokenizer, data_dir):
    path = data_dir / "commonsense" / "boolq" / "train.json"
    with pytest.raises(DataError) as info:
        build_datasets(DataConfig(sources=(str(path),), format="gsm8k"), tokenizer)
    message = str(info.value)
    assert "expects fields question, answer" in message
    assert "has fields instruction, input, output, answer" in message
    assert str(path) in message


def test_bad_record_is_named_by_index(tokenizer, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "user", "content": "no answer here"}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(DataError, match=r"chat\.jsonl: record 1: no assistant message"):
        build_datasets(DataConfig(sources=(str(path),), format="chat"), tokenizer)


# --------------------------------------------------------------------------- lengths, packing, cache


def test_truncation_and_dropping_are_counted(tokenizer, data_dir):
    records = read_jsonl(data_dir / "gsm8k" / "train.jsonl", 40)
    prompt_lens = [len(tokenizer(gsm8k_prompt(r["question"]))["input_ids"]) for r in records]
    max_len = sorted(prompt_lens)[len(prompt_lens) // 2]  # about half of the prompts do not fit
    cfg = DataConfig(sources=(str(data_dir / "gsm8k"),), limit=40, max_seq_len=max_len)
    out = build_datasets(cfg, tokenizer)
    dropped = sum(n >= max_len for n in prompt_lens)
    assert 0 < dropped < 40
    assert out.stats["dropped"] == dropped and len(out.train) == 40 - dropped
    assert out.stats["truncated"] == 40 - dropped  # every kept GSM8K answer is longer than the rest
    assert all(len(s["input_ids"]) == max_len for s in out.train)
    assert all(any(x != -100 for x in s["labels"]) for s in out.train)


def test_all_prompts_too_long_is_an_error(tokenizer, data_dir):
    with pytest.raises(DataError, match=r"every one of the 8 samples has a prompt of at least max_seq_len=16"):
        build_datasets(DataConfig(sources=(str(data_dir / "gsm8k"),), limit=8, max_seq_len=16), tokenizer)


def test_packing_puts_whole_samples_in_rows(tokenizer, data_dir):
    base = DataConfig(sources=(str(data_dir / "commonsense" / "boolq"),), format="commonsense", limit=20,
                      max_seq_len=1024)
    plain = build_datasets(base, tokenizer).train
    packed = build_datasets(dataclasses.replace(base, packing=True), tokenizer)
    rows = packed.train
    assert rows.column_names == ["input_ids", "labels", "seq_lens", "sample_ids"]
    assert 1 < len(rows) == packed.stats["rows"] < len(plain)
    assert all(len(r["input_ids"]) == len(r["labels"]) == sum(r["seq_lens"]) <= 1024 for r in rows)
    pieces = []
    for r in rows:
        ends = np.cumsum(r["seq_lens"]).tolist()
        pieces += [tuple(r["input_ids"][end - n:end]) for n, end in zip(r["seq_lens"], ends)]
    assert sorted(pieces) == sorted(tuple(s["input_ids"]) for s in plain)  # every sample once, whole
    assert packed.stats["fill"] == pytest.approx(sum(map(len, pieces)) / (1024 * len(rows)))


def test_eval_split_and_size(tokenizer, data_dir):
    cfg = DataConfig(sources=(str(data_dir / "gsm8k"),), limit=4, max_seq_len=4096,
                     eval_sources=(str(data_dir / "gsm8k"),), eval_split="test", eval_size=6)
    out = build_datasets(cfg, tokenizer)
    first = read_jsonl(data_dir / "gsm8k" / "test.jsonl", 1)[0]
    assert len(out.eval) == 6
    check_sample(tokenizer, out.eval[0], gsm8k_prompt(first["question"]), first["answer"])


def test_second_build_is_served_from_the_cache(tokenizer, data_dir, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "train.jsonl", read_jsonl(data_dir / "gsm8k" / "train.jsonl", 32))
    calls = []
    original = data._tokenize_batch

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(data, "_tokenize_batch", counting)
    cfg = DataConfig(sources=(str(path),), max_seq_len=300)
    first = build_datasets(cfg, tokenizer)
    assert calls and first.train.cache_files
    calls.clear()
    second = build_datasets(cfg, tokenizer)
    assert calls == []  # not tokenised again
    assert second.train.to_list() == first.train.to_list() and second.stats == first.stats
    build_datasets(DataConfig(sources=(str(path),), max_seq_len=301), tokenizer)
    assert calls  # a different max_seq_len is a different cache entry


# --------------------------------------------------------------------------- batching


def test_collate_pads_right_and_masks_labels():
    samples = [{"input_ids": [1, 5, 6, 2], "labels": [-100, -100, 6, 2]}, {"input_ids": [1, 7, 2], "labels": [-100, 7, 2]}]
    batch = collate_batch(samples, pad_token_id=2)  # pad == eos: the real eos stays labelled
    assert batch["input_ids"].tolist() == [[1, 5, 6, 2], [1, 7, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 6, 2], [-100, 7, 2, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_ensure_pad_token(stories_path):
    tok = AutoTokenizer.from_pretrained(stories_path)
    assert tok.pad_token is None
    assert ensure_pad_token(tok) == tok.unk_token_id == 0
    tok = AutoTokenizer.from_pretrained(stories_path)
    tok.unk_token = None
    assert ensure_pad_token(tok) == tok.eos_token_id == 2
