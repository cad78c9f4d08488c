"""GPQA in simple-evals' format: the option shuffle, the prompt, the answer pattern, and the multiple_choice reward."""
import csv
import json
import random
import re

import numpy as np
import pytest

from r1jax.data import get_task, load_gpqa, load_problem_file
from r1jax.data.gpqa import FIELDS
from r1jax.rl.rewards import extract_choice, score_batch

ROWS = [["What is the charge of an electron?", "-1 e", "+1 e", "0", "+2 e"],
        ["Which planet is largest?", "Jupiter", "Mars", "Venus", " Earth\n"],
        ["Which is a noble gas?", "Neon", "Iron", "Sodium", "Carbon"]]


def _csv(path, rows=ROWS):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["Record ID", *FIELDS])
        w.writerows([[f"rec{i}", *r] for i, r in enumerate(rows)])
    return path


def simple_evals_reference(rows):
    """openai/simple-evals gpqa_eval.py, typed in independently: one Random(0) permutation per row in order."""
    rng = random.Random(0)
    out = []
    for row in rows:
        perm = rng.sample(range(4), 4)
        choices = [row[1:][i] for i in perm]
        prompt = ("Answer the following multiple choice question. The last line of your response should be of the "
                  "following format: 'Answer: $LETTER' (without quotes) where LETTER is one of ABCD. Think step by "
                  f"step before answering.\n\n{row[0]}\n\nA) {choices[0]}\nB) {choices[1]}\nC) {choices[2]}\n"
                  f"D) {choices[3]}")
        out.append((prompt, "ABCD"[choices.index(row[1])]))
    return out


def test_gpqa_matches_simple_evals(tmp_path):
    path = _csv(tmp_path / "gpqa_diamond.csv")
    examples = load_gpqa(path)
    assert [(ex["prompt"], ex["answer"]) for ex in examples] == simple_evals_reference(ROWS)
    assert examples[1]["choices"].count(" Earth\n") == 1  # options as written
    assert examples[0]["Record ID"] == "rec0" and examples[0]["id"] == "gpqa/gpqa_diamond.csv:2"
    # The same questions as JSON lines, through the sniffing loader and the task.
    rows = [dict(zip(FIELDS, r)) for r in ROWS]
    jsonl = tmp_path / "gpqa.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [ex["answer"] for ex in load_problem_file(jsonl)] == [ex["answer"] for ex in examples]
    assert [ex["prompt"] for ex in load_problem_file(path)] == [ex["prompt"] for ex in examples]
    assert len(get_task("gpqa", path=str(path), limit=2)) == 2
    # A bad row keeps the others' permutations: simple-evals draws one per row.
    bad = ROWS[:1] + [["Twins?", "x", "x", "y", "z"]] + ROWS[2:]
    with pytest.warns(UserWarning, match="two options are the same text"):
        kept = load_gpqa(_csv(tmp_path / "bad.csv", bad), on_invalid="skip")
    assert [ex["answer"] for ex in kept] == [examples[0]["answer"], examples[2]["answer"]]


def test_gpqa_file_errors(tmp_path):
    (tmp_path / "x.csv").write_text("Question,Answer\nq,a\n")
    with pytest.raises(ValueError, match=r"the CSV header lacks \['Correct Answer'"):
        load_gpqa(tmp_path / "x.csv")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_gpqa(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="task 'gpqa' reads a file you provide"):
        get_task("gpqa")


@pytest.mark.parametrize("completion, letter", [
    ("Reasoning...\nAnswer: C", "C"),
    ("Answer: $B$ because", "B"),
    ("answer: b", "b"),  # as simple-evals reads it: not the gold "B"
    ("<think>Answer: A? no...</think>The final answer.\nAnswer: D", "D"),  # the response after the reasoning
    ("<think>x</think> <answer> (B) </answer>", "B"),  # the R1-Zero template's answer
    ("\\boxed{C}", "C"),
    ("<answer>Carbon</answer>", None),
    ("no answer", None),
    ("Answer: E", None),
])
def test_extract_choice(completion, letter):
    assert extract_choice(completion) == letter


def test_multiple_choice_reward_and_verifiable_dispatch(tmp_path):
    ex = load_gpqa(_csv(tmp_path / "g.csv"))[0]
    right, wrong = f"Answer: {ex['answer']}", "Answer: " + next(c for c in "ABCD" if c != ex["answer"])
    hostile = "Answer: " * 50_000 + "Z"
    totals, parts = score_batch([right, wrong, hostile], [ex] * 3, {"multiple_choice": 1.0, "verifiable": 1.0})
    assert parts["multiple_choice"].tolist() == parts["verifiable"].tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="multiple_choice needs a gold letter A-D"):
        score_batch([right], [{"answer": "Neon"}], {"multiple_choice": 1.0})
    assert re.fullmatch(r"[ABCD]", ex["answer"]) and np.isfinite(totals).all()


def test_cons_at_k_votes_on_letters(tmp_path):
    from r1jax.eval.run import vote_answer

    ex = load_gpqa(_csv(tmp_path / "g.csv"))[0]
    assert vote_answer("Thinking.\nAnswer: B", ex, "verifiable") == vote_answer("Answer: B", ex, "multiple_choice")
    assert vote_answer("Answer: B", ex, "verifiable") == "B" and vote_answer("Answer: B", ex, "accuracy") is None
