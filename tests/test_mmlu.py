"""MMLU, MMLU-Redux, MMLU-Pro and C-Eval files: each published format, simple-evals' prompt for any number of options,
the multiple_choice reward and cons@k past D, file detection, and the refusals."""
import csv
import json

import numpy as np
import pytest

from r1jax.data import get_task, load_mmlu, load_problem_file
from r1jax.data.gpqa import QUERY_TEMPLATE
from r1jax.data.mmlu import choice_prompt
from r1jax.eval.run import vote_answer
from r1jax.rl.rewards import extract_choice, score_batch

MMLU = [{"question": "What is 2 + 2?", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "22"],
         "answer": 1},
        {"question": "Which gas do plants take in?", "subject": "biology", "choices": ["O2", "N2", "CO2", "He"],
         "answer": 2}]
REDUX = [{**MMLU[0], "error_type": "ok", "source": "x"},
         {**MMLU[1], "error_type": "wrong_groundtruth", "source": "y", "correct_answer": "C"}]
PRO = [{"question_id": 7, "question": "Pick the tenth letter's option.", "options": [f"option {i}" for i in range(10)],
        "answer": "J", "answer_index": 9, "cot_content": "", "category": "other", "src": "ori_mmlu-x"},
       {"question_id": 8, "question": "Three options only.", "options": ["a", "b", "c"], "answer": "B",
        "answer_index": 1, "cot_content": "", "category": "math", "src": "stemez"}]
CEVAL = [{"id": 0, "question": "1 + 1 = ?", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "B",
          "explanation": "1 + 1 = 2"}]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def _simple_evals_csv(path):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["", "Question", "A", "B", "C", "D", "Answer", "Subject"])  # the file's unnamed index column
        w.writerow([0, "What is 2 + 2?", "3", "4", "5", "22", "B", "elementary_mathematics"])
        w.writerow([1, "Which gas do plants take in?", "O2", "N2", "CO2", "He", "C", "biology"])
    return path


def test_four_options_are_simple_evals_template_exactly():
    choices = ["3", "4", "5", "22"]
    assert choice_prompt("What is 2 + 2?", choices) == QUERY_TEMPLATE.format(
        Question="What is 2 + 2?", **dict(zip("ABCD", choices)))
    ten = choice_prompt("q", [str(i) for i in range(10)])
    assert "LETTER is one of ABCDEFGHIJ." in ten and ten.endswith("\nI) 8\nJ) 9")


def test_every_format_gives_the_same_questions(tmp_path):
    mmlu = load_mmlu(_jsonl(tmp_path / "mmlu.jsonl", MMLU))
    csv_rows = load_mmlu(_simple_evals_csv(tmp_path / "mmlu.csv"))
    for a, b in zip(mmlu, csv_rows):
        assert (a["prompt"], a["choices"], a["answer"]) == (b["prompt"], b["choices"], b["answer"])
    assert [e["answer"] for e in mmlu] == ["B", "C"] and mmlu[0]["subject"] == "elementary_mathematics"
    assert csv_rows[1]["Subject"] == "biology"
    ceval = load_mmlu(_jsonl(tmp_path / "ceval.jsonl", CEVAL))[0]
    assert ceval["choices"] == ["1", "2", "3", "4"] and ceval["answer"] == "B" and ceval["explanation"] == "1 + 1 = 2"
    pro = load_mmlu(_jsonl(tmp_path / "pro.jsonl", PRO), task="mmlu_pro")
    assert [len(e["choices"]) for e in pro] == [10, 3] and [e["answer"] for e in pro] == ["J", "B"]
    assert pro[0]["category"] == "other" and pro[0]["id"].startswith("mmlu_pro/")
    assert "one of ABC." in pro[1]["prompt"] and "answer_index" not in pro[0]


def test_redux_flagged_rows_are_left_out_unless_kept(tmp_path):
    path = _jsonl(tmp_path / "redux.jsonl", REDUX)
    assert [e["error_type"] for e in load_mmlu(path)] == ["ok"]
    assert len(load_mmlu(path, keep_flagged=True)) == 2


def test_files_are_recognized(tmp_path):
    cases = {"mmlu.jsonl": MMLU, "redux.jsonl": REDUX, "pro.jsonl": PRO, "ceval.jsonl": CEVAL}
    for name, rows in cases.items():
        loaded = load_problem_file(_jsonl(tmp_path / name, rows))
        assert loaded and all("choices" in e and e["prompt"].startswith("Answer the following") for e in loaded), name
    assert [e["answer"] for e in load_problem_file(_simple_evals_csv(tmp_path / "m.csv"))] == ["B", "C"]
    for task in ("mmlu", "mmlu_redux", "mmlu_pro", "ceval"):
        assert get_task(task, path=str(tmp_path / "pro.jsonl"))[0]["task"] == task


@pytest.mark.parametrize("row,match", [
    ({"question": "q", "choices": ["a", "b"], "answer": 2}, "answer index 2 is not one of the 2 options"),
    ({"question": "q", "options": ["a", "b", "c"], "answer": "D"}, "neither a letter A-C"),
    ({"question": "q", "choices": ["a"], "answer": 0}, "1 options; a question has 2-10"),
    ({"question": "q", "options": [str(i) for i in range(11)], "answer": "A"}, "11 options"),
    ({"question": " ", "choices": ["a", "b"], "answer": 0}, "no question text"),
    ({"question": "q", "choices": "ab", "answer": 0}, "expected a list of options"),
    ({"question": "q", "choices": ["a", None], "answer": 0}, "an option is not text"),
])
def test_bad_rows_name_their_line(tmp_path, row, match):
    path = _jsonl(tmp_path / "bad.jsonl", [MMLU[0], row])
    with pytest.raises(ValueError, match=rf"bad.jsonl:2: .*{match}"):
        load_mmlu(path)
    with pytest.warns(UserWarning, match="skipped 1 invalid rows"):
        assert len(load_mmlu(path, on_invalid="skip")) == 1


def test_multiple_choice_past_d(tmp_path):
    pro = load_mmlu(_jsonl(tmp_path / "pro.jsonl", PRO))
    completions = ["Thinking about it.\nAnswer: J", "Answer: I", "<answer> J </answer>", "Answer: B",
                   "Answer: D\nAnswer: B"]
    examples = [pro[0]] * 3 + [pro[1]] * 2
    _, parts = score_batch(completions, examples, {"multiple_choice": 1.0, "verifiable": 1.0})
    # Three options: "Answer: D" is no option, and simple-evals' first match within A-C is the later "Answer: B".
    assert parts["multiple_choice"].tolist() == parts["verifiable"].tolist() == [1.0, 0.0, 1.0, 1.0, 1.0]
    assert extract_choice("Answer: E then Answer: B") == "B"  # four options (GPQA): unchanged
    assert extract_choice("Answer: E then Answer: B", 10) == "E"
    assert vote_answer("Answer: J", pro[0], "multiple_choice") == "J"
    assert vote_answer("Answer: J", pro[1], "verifiable") is None
    with pytest.raises(ValueError, match="gold letter A-C"):
        score_batch(["Answer: D"], [{**pro[1], "answer": "D"}], {"multiple_choice": 1.0})
    with pytest.raises(ValueError, match="list of 2-10 options"):
        score_batch(["Answer: A"], [{**pro[1], "choices": ["x"]}], {"multiple_choice": 1.0})


def test_an_evaluation_on_mmlu_pro(tmp_path):
    from flax import nnx

    from r1jax.data import ByteTokenizer
    from r1jax.eval import evaluate
    from r1jax.models import Transformer, get_preset

    pro = load_mmlu(_jsonl(tmp_path / "pro.jsonl", PRO))
    model = Transformer(get_preset("tiny_qwen2").replace(max_position_embeddings=1024), rngs=nnx.Rngs(0))
    m = evaluate(model, ByteTokenizer(), pro, k=2, template="plain", max_new_tokens=4, batch_size=2,
                 reward="multiple_choice", return_samples=True)
    assert len(m["samples"]) == 4 and np.isfinite(m["pass@1"]) and 0.0 <= m["pass@1"] <= 1.0
