"""eval.mode: loglik — multiple choice by the log-likelihood of each answer continuation."""

from __future__ import annotations

import math
import string
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dude_dist.config import EvalConfig
from dude_dist.errors import ConfigError, DataError
from dude_dist.evaluate import (
    answer_choices,
    evaluate_commonsense_loglik,
    instruction_prompt,
    multiple_choice,
    pair_ids,
    sequence_logprobs,
)

VOCAB = "\0" + string.printable  # id 0 is the pad


def continuation_logprobs(model, tokenizer, pairs, batch_size: int) -> list[float]:
    """``sum log p(continuation | context)`` per pair, one sequence per pair (the plain way,
    which the one-sequence-per-item scoring must agree with)."""
    requests = []
    for context, continuation in pairs:
        ctx, cont = pair_ids(tokenizer, context, continuation)
        requests.append((ctx + cont, [(len(ctx) + i, [tok]) for i, tok in enumerate(cont)]))
    answers = sequence_logprobs(model, tokenizer.pad_token_id or 0, requests, batch_size)
    return [sum(q[0] for q in res) for res in answers]


class CharTokenizer:
    """One id per character; no special tokens."""

    pad_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [VOCAB.index(ch) for ch in text]}


class Bigram(nn.Module):
    """logits[t] = table[token t]: p(next | previous) is a row of softmax(table), by hand."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])


def _bigram(pairs: dict[tuple[str, str], float]) -> Bigram:
    """A bigram model with p(b | a) = value for the listed pairs; the rest of each row uniform."""
    n = len(VOCAB)
    probs = torch.full((n, n), 1.0 / n, dtype=torch.float64)
    for a in {a for a, _ in pairs}:
        listed = {VOCAB.index(b): p for (a2, b), p in pairs.items() if a2 == a}
        rest = (1.0 - sum(listed.values())) / (n - len(listed))
        probs[VOCAB.index(a)] = rest
        for b, p in listed.items():
            probs[VOCAB.index(a), b] = p
    return Bigram(probs.log().float())


def test_two_options_scored_by_hand():
    model = _bigram({("b", "a"): 0.7, ("b", "b"): 0.2, ("a", "b"): 0.5})
    got = continuation_logprobs(model, CharTokenizer(), [("ab", "a"), ("ab", "b"), ("ab", "ab")], batch_size=2)
    # p(a | b) = 0.7; p(b | b) = 0.2; p(a | b) p(b | a) = 0.7 * 0.5
    assert got == pytest.approx([math.log(0.7), math.log(0.2), math.log(0.7 * 0.5)], abs=1e-5)


def test_the_highest_likelihood_per_character_wins():
    # context "...Answer:" then " ab" or " ac": they differ in the last character, after "a"
    model = _bigram({("a", "b"): 0.6, ("a", "c"): 0.1})
    item = ("Please choose the correct answer to the question: Q?\n\nAnswer1: ab Answer2: ac\n\n"
            "Answer format: answer1/answer2")
    items = [{"instruction": item, "input": "", "answer": "answer1"},
             {"instruction": item, "input": "", "answer": "answer2"}]
    out = evaluate_commonsense_loglik(model, CharTokenizer(), "ARC-Easy", items, batch_size=3)
    assert out["accuracy"] == 0.5 and out["correct"] == 1 and out["n"] == 2
    rec = out["records"][0]
    assert rec["choices"] == ["answer1", "answer2"] and rec["predicted"] == "answer1" and rec["correct"]
    assert rec["logprobs"][0] - rec["logprobs"][1] == pytest.approx(math.log(0.6 / 0.1), abs=1e-5)
    assert out["records"][1]["predicted"] == "answer1" and not out["records"][1]["correct"]


def test_a_longer_continuation_is_judged_per_character():
    # " b" (2 characters) against " cc" (3): the sums favour " b", the per-character means " cc"
    model = _bigram({(":", " "): 0.5, (" ", "b"): 0.2, (" ", "c"): 0.5, ("c", "c"): 0.2})
    item = ("Please choose the correct answer to the question: Q?\n\nAnswer1: b Answer2: cc\n\n"
            "Answer format: answer1/answer2")
    rec = evaluate_commonsense_loglik(model, CharTokenizer(), "ARC-Easy", [{"instruction": item, "answer": "answer2"}],
                                      batch_size=1)["records"][0]
    want = [math.log(0.5 * 0.2), math.log(0.5 * 0.5 * 0.2)]
    assert rec["logprobs"] == pytest.approx(want, abs=1e-5)
    assert want[0] > want[1] and want[1] / 3 > want[0] / 2
    assert rec["predicted"] == "answer2" and rec["correct"]


def test_items_are_posed_as_lm_eval_poses_them():
    arc = ("Please choose the correct answer to the question: Which is a gas?\n\nAnswer1: ice Answer2: steam "
           "Answer3: wood\n\nAnswer format: answer1/answer2/answer3")
    q = "Question: Which is a gas?\nAnswer:"
    assert multiple_choice("ARC-Easy", arc) == (["answer1", "answer2", "answer3"],
                                                [(q, " ice"), (q, " steam"), (q, " wood")])
    piqa = ("Please choose the correct solution to the question: Open a jar.\n\nSolution1: Twist the lid.\n\n"
            "Solution2: Eat the lid.\n\nAnswer format: solution1/solution2")
    assert multiple_choice("piqa", piqa)[1] == [("Question: Open a jar.\nAnswer:", " Twist the lid."),
                                                ("Question: Open a jar.\nAnswer:", " Eat the lid.")]
    boolq = ("Please answer the following question with true or false, question: is water wet?\n\n"
             "Answer format: true/false")
    assert multiple_choice("boolq", boolq) == (["true", "false"], [("Question: is water wet?\nAnswer:", " true"),
                                                                   ("Question: is water wet?\nAnswer:", " false")])
    wino = ("Please choose the correct answer to fill in the blank to complete the given sentence: Ann helped Bo "
            "because _ was kind.\n\nOption1: Ann Option2: Bo Answer format: option1/option2")
    assert multiple_choice("winogrande", wino) == (["option1", "option2"], [
        ("Ann helped Bo because Ann", " was kind."), ("Ann helped Bo because Bo", " was kind.")])
    with pytest.raises(DataError, match=r"ARC-Easy: cannot read the question and options of 'What\?'"):
        multiple_choice("ARC-Easy", "What?")
    with pytest.raises(DataError, match=r"ARC-Easy: 2 options for the labels answer1/answer2/answer3"):
        multiple_choice("ARC-Easy", arc.replace(" Answer3: wood", ""))
    with pytest.raises(DataError, match=r"winogrande: no blank \(_\) to fill in 'Ann helped Bo\.'"):
        multiple_choice("winogrande", wino.replace(" because _ was kind.", "."))


def test_every_shipped_item_can_be_posed(data_dir):
    import json

    for task in ("ARC-Easy", "ARC-Challenge", "boolq", "openbookqa", "piqa", "social_i_qa", "winogrande"):
        items = json.loads((data_dir / "commonsense" / task / "test.json").read_text())
        for item in items[:300]:
            labels, pairs = multiple_choice(task, item["instruction"])
            assert item["answer"] in labels and len(pairs) == len(labels), (task, item["instruction"][:80])


def test_answer_labels_come_from_the_answer_format_line_else_the_task():
    assert answer_choices("social_i_qa", "Q?\n\nAnswer format: answer1/answer2/answer3") == [
        "answer1", "answer2", "answer3"]
    assert answer_choices("boolq", "Is it?") == ["true", "false"]


def test_batching_and_padding_do_not_change_the_scores(stories_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(stories_path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(stories_path)
    prompt = instruction_prompt("Once upon a time there was")
    pairs = [(prompt, " a little girl."), (prompt, " a dog"), ("Tom", " went home and slept.")]
    one = continuation_logprobs(model, tok, pairs, batch_size=1)
    three = continuation_logprobs(model, tok, pairs, batch_size=3)
    assert three == pytest.approx(one, abs=1e-4)
    # the first pair by a plain forward of the whole text
    ctx = tok(prompt)["input_ids"]
    full = tok(prompt + " a little girl.")["input_ids"]
    with torch.no_grad():
        logp = model(torch.tensor([full])).logits[0].float().log_softmax(-1)
    want = sum(logp[t - 1, full[t]].item() for t in range(len(ctx), len(full)))
    assert one[0] == pytest.approx(want, abs=1e-4)


def test_loglik_mode_is_validated():
    assert EvalConfig(tasks=("boolq",), mode="loglik").mode == "loglik"
    with pytest.raises(ConfigError, match="eval.mode.*'sample'"):
        EvalConfig(mode="sample")
    with pytest.raises(ConfigError, match="gsm8k has no answer choices"):
        EvalConfig(tasks=("gsm8k", "boolq"), mode="loglik")




@pytest.mark.parametrize("continuations", [[" true", " false"], [" a dog", " a cat", " a bird"],
                                           [" yes", " no way"]])
def test_one_shared_sequence_scores_like_one_sequence_per_choice(stories_path, continuations):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dude_dist.evaluate import _choice_requests, _choice_scores, sequence_logprobs

    model = AutoModelForCausalLM.from_pretrained(stories_path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(stories_path)
    pairs = [("Question: What did Tom see?\nAnswer:", c) for c in continuations]
    requests = _choice_requests(tok, pairs)
    got = _choice_scores(sequence_logprobs(model, tok.pad_token_id or 0, requests, batch_size=2), len(pairs))
    want = continuation_logprobs(model, tok, pairs, batch_size=1)
    assert got == pytest.approx(want, abs=1e-4)
    assert len(requests) in (1, len(pairs))
