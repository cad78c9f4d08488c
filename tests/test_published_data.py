"""Published RL and SFT data read as published: parquet files (r1jax.data.parquet) and verl's row layout (chat-message
prompts, reward_model.ground_truth, data_source), checked against the libraries that write and read them
(datasets writes the files as verl's preprocessing scripts do; transformers renders the prompts as verl's dataset
does)."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from r1jax.data import load_problems, render
from r1jax.data.io import read_sft_jsonl
from r1jax.data.parquet import iter_parquet
from r1jax.data.problems import load_problem_file
from r1jax.rl.rewards import get_reward
from r1jax.rl.judge import _text as judge_text
from test_chat_template import _checkpoint_dir

DAPO_PROMPT = ("Solve the following math problem step by step. The last line of your response should be of the form "
               "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\nWhat is 6 * 7?\n\n"
               "Remember to put your answer on its own line after \"Answer:\".")
# verl's layout, one row per published dataset style
VERL_ROWS = [
    # DAPO-Math-17k: the instruction in the user turn, a plain ground truth
    {"data_source": "math_dapo", "prompt": [{"role": "user", "content": DAPO_PROMPT}], "ability": "MATH",
     "reward_model": {"ground_truth": "42", "style": "rule-lighteval/MATH_v2"}, "extra_info": {"index": "a1"}},
    # Skywork-OR1 math: alternatives JSON-encoded in the string
    {"data_source": "skywork_math", "prompt": [{"role": "user", "content": "Half of 1?"}], "ability": "math",
     "reward_model": {"ground_truth": json.dumps(["\\frac{1}{2}", "0.5"]), "style": "rule"},
     "extra_info": {"index": "b2"}},
    # an interval that merely looks like JSON stays the answer text
    {"data_source": "math", "prompt": [{"role": "system", "content": "Put the answer in \\boxed{}."},
                                       {"role": "user", "content": "Where is x^2 <= x?"}], "ability": "math",
     "reward_model": {"ground_truth": "[0, 1]", "style": "rule"}, "extra_info": {"index": "c3"}},
    # Skywork-OR1 code: TACO-style tests JSON-encoded
    {"data_source": "skywork_code", "prompt": [{"role": "user", "content": "Print a + b."}], "ability": "code",
     "reward_model": {"ground_truth": json.dumps({"inputs": ["1 2\n", "3 4\n"], "outputs": ["3\n", "7\n"]}),
                      "style": "rule"}, "extra_info": {"index": "d4"}},
    # DeepCoder / LiveCodeBench: a JSON list of test dicts, a functional one naming its function in metadata
    {"data_source": "lcb", "prompt": [{"role": "user", "content": "Write add(a, b)."}], "ability": "code",
     "metadata": json.dumps({"func_name": "add"}),
     "reward_model": {"ground_truth": json.dumps([{"input": "1\n2", "output": "3", "testtype": "functional"}]),
                      "style": "rule"}, "extra_info": {"index": "e5"}},
]


def _table_rows(rows):
    """The rows as a table holds them: every column in every row (None where a row lacks it)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return [{k: r.get(k) for k in keys} for r in rows]


def _write_verl_parquet(path, rows):
    datasets = pytest.importorskip("datasets")
    # as verl's examples/data_preprocess scripts write them
    datasets.Dataset.from_list(_table_rows(rows)).to_parquet(str(path))
    return path


def test_verl_rows_from_parquet(tmp_path):
    path = _write_verl_parquet(tmp_path / "train.parquet", VERL_ROWS)
    exs = load_problems(path)
    assert [ex["id"] for ex in exs] == [f"problems/train.parquet:{i}" for i in range(1, 6)]
    dapo, sky, interval, code, lcb = exs
    assert dapo["prompt"] == DAPO_PROMPT and dapo["messages"] == VERL_ROWS[0]["prompt"]
    assert dapo["answer"] == "42" and dapo["source"] == "math_dapo" and dapo["extra_info"] == {"index": "a1"}
    assert dapo["ability"] == "MATH" and "tests" not in dapo
    assert sky["answer"] == ["\\frac{1}{2}", "0.5"]
    assert interval["answer"] == "[0, 1]" and interval["prompt"] == "Where is x^2 <= x?"
    assert interval["messages"][0] == {"role": "system", "content": "Put the answer in \\boxed{}."}
    assert code["tests"] == [{"input": "1 2\n", "output": "3\n"}, {"input": "3 4\n", "output": "7\n"}]
    assert "answer" not in code
    assert lcb["tests"] == [{"fn_name": "add", "args": [1, 2], "expected": 3}]
    # the same rows as JSON lines give the same examples (ids name the file)
    jl = tmp_path / "train.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in _table_rows(VERL_ROWS)))
    strip = [{k: v for k, v in ex.items() if k != "id"} for ex in exs]
    assert [{k: v for k, v in ex.items() if k != "id"} for ex in load_problems(jl)] == strip
    # `r1jax eval --data` and task files go through load_problem_file
    assert load_problem_file(path) == exs


def test_chat_prompts_render_as_verl_does(tmp_path):
    """verl's RLHFDataset renders a row's prompt with tokenizer.apply_chat_template(prompt, add_generation_prompt=True):
    template "hf:DIR" gives the same text for the loaded example, the system turn included."""
    transformers = pytest.importorskip("transformers")
    d = _checkpoint_dir(tmp_path, "qwen2_5_instruct", as_file=True)
    ref = transformers.AutoTokenizer.from_pretrained(str(d))
    exs = load_problems(_write_verl_parquet(tmp_path / "t.parquet", VERL_ROWS))
    for row, ex in zip(VERL_ROWS, exs):
        want = ref.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
        assert render(f"hf:{d}", ex) == want
    assert render("qwen2.5", exs[2]).startswith("<|im_start|>system\nPut the answer in \\boxed{}.<|im_end|>")
    assert render("r1_zero", exs[0]).endswith(f"User: {DAPO_PROMPT}. Assistant:")
    with pytest.raises(ValueError, match="exactly one user message"):
        render("r1_zero", exs[2])  # a completion template cannot hold a system turn: said, not dropped


def test_alternative_answers_score_any(tmp_path):
    acc = get_reward("accuracy")
    ex = {"answer": ["\\frac{1}{2}", "0.5"]}
    assert acc("<answer>0.5</answer>", ex) == 1.0 and acc("\\boxed{1/2}", ex) == 1.0
    assert acc("<answer>2</answer>", ex) == 0.0
    assert acc.quick("<answer>1/2</answer>", ex) == 1.0 and acc.quick("<answer>3</answer>", ex) == 0.0
    assert acc.quick("<answer>\\sqrt{4}/4</answer>", ex) is None  # needs math-verify for the first alternative
    assert acc("<answer>\\sqrt{4}/4</answer>", ex) == 1.0
    assert acc("<answer>x</answer>", {"answer": ["x", "y"]}) == 1.0
    assert get_reward("verifiable")("<answer>0.5</answer>", ex) == 1.0
    with pytest.raises(ValueError, match="empty list"):
        acc("<answer>1</answer>", {"answer": []})
    assert judge_text(["1/2", "0.5"]) == "1/2 or 0.5"


def test_verl_code_row_is_judged_by_its_tests(tmp_path):
    code = load_problems(_write_verl_parquet(tmp_path / "c.parquet", VERL_ROWS[3:4]))[0]
    good = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    bad = "```python\nprint(0)\n```"
    verifiable = get_reward("verifiable")
    assert verifiable(good, code) == 1.0 and verifiable(bad, code) == 0.0


def test_bad_verl_rows_are_named(tmp_path):
    def rows_error(rows):
        with pytest.raises(ValueError) as e:
            load_problems(_write_verl_parquet(tmp_path / "bad.parquet", rows))
        return str(e.value)

    base = dict(VERL_ROWS[0])
    assert "bad.parquet:1" in rows_error([{**base, "prompt": [{"role": "assistant", "content": "hi"}]}])
    assert "must end with a non-empty user message" in rows_error(
        [{**base, "prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    err = rows_error([{**base, "reward_model": {"style": "rule", "ground_truth": None}}])
    assert "reward_model.ground_truth" in err
    err = rows_error([{**base, "reward_model": {"style": "rule", "ground_truth": json.dumps({"inputs": ["1"]})}}])
    assert "bad.parquet:1" in err and "ground_truth" in err
    assert "expected non-empty text or a list of chat messages" in rows_error([{**base, "prompt": 3}])


def test_iter_parquet_values_and_errors(tmp_path):
    import datetime

    path = tmp_path / "x.parquet"
    table = pa.table({"q": ["a", "b"], "when": [datetime.date(2024, 8, 1), datetime.date(2025, 1, 31)],
                      "raw": [b"text", b"more"], "tests": [[{"input": "1", "output": "1"}], []],
                      "n": pa.array([1, None], pa.int64())})
    pq.write_table(table, path, row_group_size=1)
    rows = list(iter_parquet(path))
    assert rows == [(1, {"q": "a", "when": "2024-08-01", "raw": "text", "tests": [{"input": "1", "output": "1"}],
                         "n": 1}),
                    (2, {"q": "b", "when": "2025-01-31", "raw": "more", "tests": [], "n": None})]
    json.dumps([r for _, r in rows])  # what JSON lines would have held

    data = path.read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        list(iter_parquet(tmp_path / "cut.parquet"))
    (tmp_path / "j.parquet").write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="not a readable parquet file"):
        load_problems(tmp_path / "j.parquet")
    pq.write_table(table.slice(0, 0), tmp_path / "empty.parquet")
    with pytest.raises(ValueError, match="holds no rows"):
        list(iter_parquet(tmp_path / "empty.parquet"))
    with pytest.raises(FileNotFoundError):
        list(iter_parquet(tmp_path / "missing.parquet"))
    pq.write_table(pa.table({"b": [b"\xff\xfe"]}), tmp_path / "bin.parquet")
    with pytest.raises(ValueError, match="bin.parquet:1: a binary value"):
        list(iter_parquet(tmp_path / "bin.parquet"))


def test_sft_messages_from_parquet(tmp_path):
    """OpenR1-Math-220k style: `messages` whose last turn is the response, in parquet, read as the JSON lines are."""
    rows = [{"problem": "1+1?", "messages": [{"role": "user", "content": "1+1?"},
                                             {"role": "assistant", "content": "<think>1+1=2</think> 2"}]},
            {"problem": "2+2?", "messages": [{"role": "user", "content": "2+2?"},
                                             {"role": "assistant", "content": "4"}]}]
    path = _write_verl_parquet(tmp_path / "sft.parquet", rows)
    jl = tmp_path / "sft.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = read_sft_jsonl(path)
    assert got == read_sft_jsonl(jl)
    assert got[0]["completion"] == "<think>1+1=2</think> 2" and got[0]["messages"] == rows[0]["messages"][:1]


def _dapo_reference(completion, gold):
    """verl's math_dapo.compute_score (DAPO's reward), its extraction and its string comparison, for answers its
    normalization leaves alone (plain numbers and words)."""
    import re

    found = re.findall(r"(?i)Answer\s*:\s*([^\n]+)", completion[-300:])
    pred = (found[-1] if found else "[INVALID]").split("=")[-1].replace(" ", "").strip()
    return 1.0 if pred == gold.replace(" ", "") else -1.0


@pytest.mark.parametrize("completion", [
    "Let me compute: 6 * 7 = 42.\nAnswer: 42",
    "6 * 7 = 42.\nanswer:42\n",
    "Answer: 41\nWait, recheck: 6 * 7 = 42.\nAnswer: 42",
    "Answer: 42\nNo wait.\nAnswer: 41",
    "Final Answer: x = 42",
    "The answer is 42.",                                   # no "Answer:" line
    "Answer: 42\n" + "padding " * 60 + "\nthat is all",    # the line is not among the last 300 characters
    "<answer>42</answer>",
    "\\boxed{42}",
    "",
])
def test_answer_line_extracts_as_dapo_does(completion):
    ours = get_reward("answer_line")(completion, {"answer": "42"})
    assert ours == (1.0 if _dapo_reference(completion, "42") == 1.0 else 0.0)
    assert get_reward("answer_line").quick(completion, {"answer": "42"}) == ours


def test_answer_line_compares_as_accuracy(tmp_path):
    line = get_reward("answer_line")
    assert line("So\nAnswer: \\frac{1}{2}", {"answer": "0.5"}) == 1.0     # DAPO's string match would say -1
    assert line("So\nAnswer: $\\sqrt{8}$", {"answer": "2\\sqrt{2}"}) == 1.0
    assert line("Answer: 3", {"answer": ["1", "3"]}) == 1.0
    assert line("Answer: " + "9" * 5000, {"answer": "3"}) == 0.0         # hostile text scores 0
    from r1jax.eval.run import vote_answer
    assert vote_answer("x\nAnswer: 7\n", {"answer": "7"}, "answer_line") == "7"
    # the DAPO row above, scored by its own rule
    dapo = load_problems(_write_verl_parquet(tmp_path / "d.parquet", VERL_ROWS[:1]))[0]
    assert line("6 * 7 = 42\nAnswer: 42", dapo) == 1.0 and get_reward("accuracy")("Answer: 42", dapo) == 0.0


def test_dapo_experiment_on_dapo_files(tmp_path):
    """experiments/dapo_qwen2_5_32b.py:dapo17k=...,dapo_aime=... on tiny files in DAPO's published layout: the prompts
    are rendered by the run tokenizer's chat template (template "hf" follows --config.tokenizer.path), rewarded by
    the Answer: line, and the comparison evaluates the AIME file by the same rule."""
    from pathlib import Path

    from run_helpers import load_config

    from r1jax.pipeline.stages import resolve_tokenizer_templates, run

    def rows(n, offset):
        out = []
        for i in range(n):
            a, b = offset + i, 2 * i + 1
            text = DAPO_PROMPT.replace("What is 6 * 7?", f"What is {a} + {b}?")
            out.append({"data_source": "math_dapo", "prompt": [{"role": "user", "content": text}],
                        "ability": "MATH", "reward_model": {"ground_truth": str(a + b), "style": "rule"},
                        "extra_info": {"index": f"{offset}-{i}"}})
        return out

    train = _write_verl_parquet(tmp_path / "dapo-math-17k.parquet", rows(16, 0))
    aime = _write_verl_parquet(tmp_path / "aime-2024.parquet", rows(8, 100))
    tok = _checkpoint_dir(tmp_path, "qwen2_5_instruct", as_file=True)
    path = Path(__file__).resolve().parents[1] / "experiments" / "dapo_qwen2_5_32b.py"
    with pytest.raises(ValueError, match="needs dapo_aime=PATH"):
        load_config(path, f"dapo17k={train}")
    cfg = load_config(path, f"dapo17k={train},dapo_aime={aime}")
    assert cfg.task.template == "hf" and dict(cfg.grpo.rewards) == {"answer_line": 2.0, "overlong": 1.0}
    resolve_tokenizer_templates(cfg, ["grpo", "compare"])
    assert cfg.task.template == "hf:/ckpt/Qwen2.5-32B"

    cfg = load_config(path, f"runlocal,dapo17k={train},dapo_aime={aime}")
    cfg.tokenizer.update(kind="path", path=str(tok))
    cfg.model.overrides.vocab_size = 300  # the tiny tokenizer's
    cfg.grpo.max_prompt_len = 320  # DAPO's instruction, in a tokenizer trained on a few lines
    cfg.grpo.steps = 1
    cfg.compare.eval.num_problems = 4
    out = run(cfg, tmp_path / "run")
    assert not out["stopped"]
    assert cfg.task.template == f"hf:{tok}"
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    grpo = [m for m in metrics if m.get("stage") == "grpo" and "reward/answer_line" in m]
    assert len(grpo) == 1 and "reward_by_source/math_dapo" in grpo[0]  # one source per prompt, not per row
    completions = [json.loads(line) for line in (tmp_path / "run" / "grpo" / "completions.jsonl").read_text()
                   .splitlines()]
    assert completions and all(c["prompt"].startswith("Solve the following math problem") for c in completions)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert 0.0 <= results["dapo"]["pass@1"] <= 1.0, results
    samples = [json.loads(line) for f in sorted((tmp_path / "run" / "compare").rglob("*.jsonl"))
               for line in f.read_text().splitlines()]
    assert samples and all(s["prompt"].startswith("Solve the following") for s in samples)


def test_inspect_shows_the_data_as_a_run_sees_it(tmp_path):
    """`r1jax inspect` (r1jax.data.describe): counts, sources, gold kinds, the reward check and prompt lengths, and
    the exit status says whether the reward and the template take every problem."""
    import subprocess
    import sys
    from pathlib import Path

    from r1jax.data import load_tokenizer
    from r1jax.data.describe import describe

    path = _write_verl_parquet(tmp_path / "mixed.parquet", VERL_ROWS)
    exs = load_problems(path)
    tok_dir = _checkpoint_dir(tmp_path, "qwen2_5_instruct", as_file=True)
    tok = load_tokenizer(tok_dir, add_markers=False)
    d = describe(exs, template=f"hf:{tok_dir}", tokenizer=tok, reward="verifiable", max_prompt_len=60, show=2)
    assert d["problems"] == 5 and d["reward_check"] == "ok"
    assert d["sources"] == {"lcb": 1, "math": 1, "math_dapo": 1, "skywork_code": 1, "skywork_math": 1}
    assert d["gold"] == {"answer": 3, "answer_alternatives": 1, "tests": 2, "choices": 0, "messages": 5}
    from r1jax.data.pipeline import prompt_token_ids  # counted as the run's max_prompt_len check counts them
    lengths = [len(ids) for ids in prompt_token_ids(tok, exs, f"hf:{tok_dir}")]
    assert d["prompt_tokens"]["max"] == max(lengths) and d["prompt_tokens"]["min"] == min(lengths)
    assert d["over_max_prompt_len"] == sum(n > 60 for n in lengths)
    assert [s["text"] for s in d["shown"]] == [render(f"hf:{tok_dir}", ex) for ex in exs[:2]]
    assert "lack them" in describe(exs, reward="accuracy")["reward_check"]  # the code rows have no answer
    assert "problem 2" in describe(exs, template="r1_zero")["template_error"]  # the system turn

    root = Path(__file__).resolve().parents[1]

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "r1jax.cli", "inspect", "--data", str(path), *args],
                              capture_output=True, text=True, cwd=root, timeout=300)

    ok = cli("--template", "hf", "--tokenizer", str(tok_dir), "--reward", "verifiable", "--show", "1")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert ok.stdout.startswith(f"5 problems from {path}") and "reward: judges every problem" in ok.stdout
    assert "prompt tokens: min" in ok.stdout and "<|im_start|>user\nSolve the following" in ok.stdout
    bad = cli("--template", "r1_zero", "--reward", "accuracy")
    assert bad.returncode == 1 and "template: cannot render problem 2" in bad.stdout, bad.stdout[-2000:]
    assert cli("--template", "hf").returncode == 2


def test_solution_only_rows_take_the_last_boxed_answer(tmp_path):
    """MATH as Hendrycks et al. publish it (problem, solution, level, type) and NuminaMath: the gold is the last
    \\boxed{} of the worked solution, as MATH's grader reads it."""
    rows = [{"problem": "Half of 1?", "solution": "First \\boxed{2} was wrong; it is $\\boxed{\\frac{1}{2}}$.",
             "level": "Level 1", "type": "Algebra"},
            {"problem": "1+1?", "solution": "Clearly \\boxed{2}.", "level": "Level 1", "type": "Prealgebra"}]
    path = _write_verl_parquet(tmp_path / "math.parquet", rows)
    exs = load_problem_file(path)
    assert [ex["answer"] for ex in exs] == ["\\frac{1}{2}", "2"] and exs[0]["level"] == "Level 1"
    assert exs[0]["solution"] == rows[0]["solution"]  # the worked solution stays on the example
    assert get_reward("accuracy")("<answer>0.5</answer>", exs[0]) == 1.0
    with pytest.raises(ValueError, match=r"bad\.parquet:1: needs a gold 'answer'.*'solution' with a \\boxed"):
        load_problems(_write_verl_parquet(tmp_path / "bad.parquet", [{"problem": "q", "solution": "no box"}]))


def test_decontamination_as_open_r1_does_it(tmp_path):
    """open-r1's rule (scripts/decontaminate.py): lowercase, whitespace collapsed, word 8-grams; a training problem
    sharing one with an evaluation problem is contaminated. Applied by config.task.decontaminate before a run trains,
    and counted (and written out) by `r1jax inspect --decontaminate`."""
    import subprocess
    import sys
    from pathlib import Path

    from r1jax.data import get_task
    from r1jax.data.decontaminate import decontaminate, word_ngrams

    def open_r1_ngrams(text, n):  # open-r1's normalize_string + word_ngrams, as its script builds them
        words = " ".join(text.lower().strip().split()).split()
        return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}

    aime = get_task("aime", split="test")
    math500 = get_task("math500", split="test")
    text = aime[3]["prompt"]
    for n in (1, 8, 13):
        assert word_ngrams(text, n) == open_r1_ngrams(text, n)
    words = text.split()
    copied = {"prompt": "Consider this.\n" + "  ".join(words[:8]).upper() + " and more"}      # 8 words of AIME
    short = {"prompt": " ".join(words[:7])}                                                   # 7: not contaminated
    fresh = {"prompt": "What is the smallest prime greater than 1000?"}
    kept, removed = decontaminate([copied, short, fresh, math500[0]], {"aime": aime, "math500": math500})
    assert kept == [short, fresh] and removed == {"aime": 1, "math500": 1}
    assert decontaminate([short], {"aime": aime}, ngram=7)[1] == {"aime": 1}

    # in a run: config.task.decontaminate drops them from the training split before anything trains
    from run_helpers import TINY_R1ZERO, load_config

    from r1jax.pipeline.stages import load_tasks

    rows = [copied, short, fresh, {"prompt": math500[0]["prompt"], "answer": "1"}]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"answer": "1", **r}) + "\n" for r in rows))
    cfg = load_config(TINY_R1ZERO, None)
    cfg.task.name, cfg.task.decontaminate = "problems", "aime,math500"
    cfg.task.train, cfg.task.test = {"path": str(train)}, {"path": str(train)}
    assert [ex["prompt"] for ex in load_tasks(cfg)["train"]] == [short["prompt"], fresh["prompt"]]
    cfg.task.decontaminate = "test"  # the task's own test split: every row is in it, the 7-word one has no 8-gram
    assert [ex["prompt"] for ex in load_tasks(cfg)["train"]] == [short["prompt"]]
    cfg.task.decontaminate_ngram = 7
    with pytest.raises(ValueError, match="left none of the 4 training problems"):
        load_tasks(cfg)
    cfg.task.decontaminate = "aime,nonesuch"
    with pytest.raises(ValueError, match="'nonesuch' is neither 'test', a task"):
        load_tasks(cfg)

    out = tmp_path / "clean.jsonl"
    r = subprocess.run([sys.executable, "-m", "r1jax.cli", "inspect", "--data", str(train), "--template", "r1_zero",
                        "--decontaminate", "aime,math500", "--out", str(out)], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "decontamination: 2 clean; contaminated by aime 1, math500 1" in r.stdout
    assert [ex["prompt"] for ex in load_problems(out)] == [short["prompt"], fresh["prompt"]]


def test_check_data_runs_every_stage_data_check_and_no_stage(tmp_path):
    """`r1jax train --check_data` (stages.run(check_data=True)): tasks, tokenizer and every pending stage's data
    checks, the first stage's included, then nothing runs; a config for other hardware is checked on an abstract
    mesh of its size."""
    import subprocess
    import sys

    from run_helpers import ROOT, TINY_R1ZERO, load_config

    from r1jax.pipeline.stages import run

    cfg = load_config(TINY_R1ZERO, None)
    out = run(cfg, tmp_path / "ok", check_data=True)
    assert out["checked"] == ["pretrain", "grpo"] and out["tasks"]["train"] > 0 and out["vocab_size"] > 0
    assert not list((tmp_path / "ok").glob("*/DONE")) and (tmp_path / "ok" / "metrics.jsonl").read_text() == ""

    cfg = load_config(TINY_R1ZERO, None)
    cfg.stages, cfg.grpo.init = "grpo", "scratch"  # GRPO first: a plain run would meet its data only as it starts
    cfg.grpo.max_prompt_len = 4
    with pytest.raises(ValueError, match="longer than max_prompt_len=4"):
        run(cfg, tmp_path / "long", check_data=True)

    cfg = load_config(TINY_R1ZERO, None)
    cfg.hardware.num_devices, cfg.mesh.data, cfg.mesh.fsdp = 64, 8, 8  # a pod's layout, checked on this machine
    assert run(cfg, tmp_path / "pod", check_data=True)["checked"] == ["pretrain", "grpo"]

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "r1jax.cli", "train", "--config", str(TINY_R1ZERO), "--workdir",
                               str(tmp_path / "cli"), "--check_data", *args], capture_output=True, text=True, cwd=ROOT,
                              timeout=300)

    ok = cli()
    assert ok.returncode == 0 and ok.stdout.startswith("data ok for stages ['pretrain', 'grpo']"), ok.stderr[-2000:]
    bad = cli("--config.task.decontaminate=nonesuch")
    assert bad.returncode == 1 and "'nonesuch' is neither 'test', a task" in bad.stderr, bad.stderr[-2000:]


def test_open_reasoner_zero_and_open_instruct_layouts(tmp_path):
    """Open-Reasoner-Zero's files (a JSON array of [human, assistant-with-ground_truth] pairs) and open-instruct's
    RLVR rows (messages, ground_truth, dataset) load as the same problems."""
    orz = [[{"from": "human", "value": "What is 6 * 7?"},
            {"from": "assistant", "ground_truth": {"value": "42"}}],
           [{"from": "human", "value": "Half of 1?"},
            {"from": "assistant", "ground_truth": {"value": "\\frac{1}{2}"}}]]
    path = tmp_path / "orz_math_57k_collected.json"
    path.write_text(json.dumps(orz))  # one line, as json.dump writes it
    exs = load_problem_file(path)
    assert [(ex["prompt"], ex["answer"]) for ex in exs] == [("What is 6 * 7?", "42"), ("Half of 1?", "\\frac{1}{2}")]
    # ids stay unique when records share a line (prompt_pass and rejection sampling tell prompts apart by id)
    assert [ex["id"] for ex in exs] == ["problems/orz_math_57k_collected.json:1",
                                        "problems/orz_math_57k_collected.json:1#2"]

    # open-instruct's conversion of the same file: the assistant turn holds the reference, not prompt
    rows = [{"messages": [{"role": "user", "content": q[0]["value"]},
                          {"role": "assistant", "content": q[1]["ground_truth"]["value"]}],
             "ground_truth": q[1]["ground_truth"]["value"], "dataset": "math"} for q in orz]
    oi = load_problems(_write_verl_parquet(tmp_path / "rlvr.parquet", rows))
    assert [(ex["prompt"], ex["answer"], ex["source"]) for ex in oi] == [
        ("What is 6 * 7?", "42", "math"), ("Half of 1?", "\\frac{1}{2}", "math")]
    assert oi[0]["messages"] == [{"role": "user", "content": "What is 6 * 7?"}]
    assert render("r1_zero", oi[0]) == render("r1_zero", exs[0])
    bad = tmp_path / "bad.json"
    empty = [{"from": "human", "value": ""}, {"from": "assistant", "ground_truth": {"value": "1"}}]
    bad.write_text(json.dumps([empty]))
    with pytest.raises(ValueError, match="bad.json:1: field 'prompt' is '', expected non-empty text"):
        load_problems(bad)


def test_sharded_splits_load_from_a_directory_or_a_glob(tmp_path):
    """Hugging Face shards a split (data/train-00000-of-00002.parquet, ...): a directory or a glob reads the shards in
    order, ids naming each row's shard."""
    shards = tmp_path / "data"
    shards.mkdir()
    _write_verl_parquet(shards / "train-00000-of-00002.parquet", VERL_ROWS[:2])
    _write_verl_parquet(shards / "train-00001-of-00002.parquet", VERL_ROWS[2:3])
    (shards / "README.md").write_text("not data")
    (shards / "dataset_info.json").write_text('{"features": {}}')  # metadata beside the shards is not a shard
    by_dir = load_problems(shards)
    assert [ex["prompt"] for ex in by_dir] == [r["prompt"][-1]["content"] for r in VERL_ROWS[:3]]
    assert by_dir[2]["id"] == "problems/data:train-00001-of-00002.parquet:1"
    by_glob = load_problem_file(str(shards / "train-*.parquet"))
    assert [ex["prompt"] for ex in by_glob] == [ex["prompt"] for ex in by_dir]
    with pytest.raises(FileNotFoundError, match="no data files"):
        load_problems(str(shards / "test-*.parquet"))


def test_trl_conversational_prompt_completion_rows(tmp_path):
    """TRL's conversational prompt-completion SFT rows read as the messages rows do: the prompt conversation is what
    the template renders (as TRL renders it: apply_chat_template(prompt, add_generation_prompt=True)), the one
    assistant message the completion."""
    transformers = pytest.importorskip("transformers")
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    rows = [{"prompt": conv, "completion": [{"role": "assistant", "content": "4"}]}]
    path = tmp_path / "trl.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n")
    row = read_sft_jsonl(path)[0]
    assert row["completion"] == "4" and row["messages"] == conv and row["prompt"] == "2+2?"
    d = _checkpoint_dir(tmp_path, "qwen2_5_instruct", as_file=True)
    want = transformers.AutoTokenizer.from_pretrained(str(d)).apply_chat_template(conv, add_generation_prompt=True,
                                                                                  tokenize=False)
    assert render(f"hf:{d}", row) == want
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": conv, "completion": [{"role": "user", "content": "4"}]}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: a conversational completion is one assistant message"):
        read_sft_jsonl(bad)


def test_deepcoder_rows(tmp_path):
    """DeepCoder-Preview rows (problem, tests as a JSON string): PrimeIntellect's stdin_stdout and function_call
    tests, run by the sandbox."""
    tests = [{"type": "function_call", "fn_name": "add", "input": [1, 2], "output": [3]},
             {"type": "function_call", "fn_name": "add", "input": [-1, 1], "output": [0]}]
    stdin = [{"type": "stdin_stdout", "input": "1 2\n", "output": "3\n"}]
    rows = [{"problem": "Write add(a, b).", "tests": json.dumps(tests), "starter_code": ""},
            {"problem": "Print a + b.", "tests": json.dumps(stdin), "starter_code": ""}]
    path = tmp_path / "deepcoder.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fn, io = load_problems(path)
    assert fn["tests"] == [{"fn_name": "add", "args": [1, 2], "expected": [3]},
                           {"fn_name": "add", "args": [-1, 1], "expected": [0]}]
    code_tests = get_reward("code_tests")
    assert code_tests("```python\ndef add(a, b):\n    return a + b\n```", fn) == 1.0
    assert code_tests("```python\ndef add(a, b):\n    return a + b if a > 0 else 1\n```", fn) == 0.5
    assert code_tests("```python\na, b = map(int, input().split())\nprint(a + b)\n```", io) == 1.0


def test_select_rows_as_skywork_does(tmp_path):
    """select / select_range (task options): Skywork-OR1 trains its 7B model on the math rows whose
    extra_info.model_difficulty for DeepSeek-R1-Distill-Qwen-7B lies in [1, 15]; rows without the field are left out."""
    def row(i, ability, difficulty):
        extra = {"index": i} if difficulty is None else {
            "index": i, "model_difficulty": {"DeepSeek-R1-Distill-Qwen-7B": difficulty,
                                             "DeepSeek-R1-Distill-Qwen-32B": 16 - difficulty}}
        return {"data_source": "sky", "prompt": [{"role": "user", "content": f"q{i}"}], "ability": ability,
                "reward_model": {"ground_truth": json.dumps([str(i)]), "style": "rule"}, "extra_info": extra}

    rows = [row(0, "math", 0), row(1, "math", 1), row(2, "math", 15), row(3, "math", 16), row(4, "code", 5),
            row(5, "math", None), row(6, "math", 8)]
    path = tmp_path / "sky.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = load_problems(path, select={"ability": "math"},
                        select_range={"extra_info.model_difficulty.DeepSeek-R1-Distill-Qwen-7B": [1, 15]})
    assert [ex["prompt"] for ex in got] == ["q1", "q2", "q6"] and got[0]["answer"] == "1"
    assert len(load_problems(path, select={"ability": ["math", "code"]})) == 7
    with pytest.raises(ValueError, match=r"select_range\['x'\] = 3; expected \[low, high\] numbers"):
        load_problems(path, select_range={"x": 3})
    # as a run's task options
    from r1jax.data import get_task
    assert len(get_task("problems", split="train", path=str(path), select={"ability": "code"})) == 1


def test_by_source_scores_each_published_set_by_its_own_rule(tmp_path):
    """A run mixing DAPO-Math-17k (an "Answer:" line) with Skywork-OR1 (boxed answers, code tests): `by_source` picks
    each row's rule by its data_source, as verl's default_compute_score does."""
    from r1jax.rl.rewards import score_batch

    exs = load_problems(_write_verl_parquet(tmp_path / "mix.parquet", VERL_ROWS))  # dapo, skywork, interval, code, lcb
    rules = {"by_source": {"rules": {"math_dapo": "answer_line", "*": "verifiable"}}}
    completions = ["6*7=42\nAnswer: 42", "\\boxed{0.5}", "\\boxed{[0, 1]}",
                   "```python\na, b = map(int, input().split())\nprint(a + b)\n```",
                   "```python\ndef add(a, b):\n    return a + b\n```"]
    totals, parts = score_batch(completions, exs, {"by_source": 1.0}, reward_kwargs=rules, num_workers=2)
    assert parts["by_source"].tolist() == [1.0, 1.0, 1.0, 1.0, 1.0]
    swapped = ["\\boxed{42}", "Answer: 0.5"] + completions[2:]  # each rule reads only its own form
    assert score_batch(swapped, exs, {"by_source": 1.0}, reward_kwargs=rules)[0].tolist()[:2] == [0.0, 0.0]
    # without rules every source is verifiable: DAPO's Answer: line is not an answer block or a box
    assert get_reward("by_source")(completions[0], exs[0]) == 0.0
    with pytest.raises(ValueError, match="unknown reward 'acuracy'"):
        score_batch(completions, exs, {"by_source": 1.0}, reward_kwargs={"by_source": {"rules": {"*": "acuracy"}}})
    with pytest.raises(ValueError, match="not a correctness rule of one completion"):
        get_reward("by_source")("x", exs[0], rules={"*": "length"})


def test_evaluation_judges_and_votes_by_each_source_rule(tmp_path, monkeypatch):
    """evaluate(reward="by_source", reward_kwargs=...): every sample judged by its problem's rule and cons@k voting on
    what that rule reads (DAPO's Answer: line for its rows); eval_config carries the options, check_reward uses them."""
    import numpy as np

    from r1jax.data import ByteTokenizer
    from r1jax.eval import check_reward
    from r1jax.eval import run as eval_run

    exs = load_problems(_write_verl_parquet(tmp_path / "mix.parquet", VERL_ROWS[:2]))  # math_dapo, skywork_math
    texts = ["x\nAnswer: 42", "x\nAnswer: 41", "\\boxed{0.5}", "\\boxed{1/2}"]  # k=2 per problem

    class Out:
        def __init__(self, rows):
            self.tokens, self.lengths, self.stats = np.zeros((rows, 1), np.int32), np.ones(rows, np.int32), {}

    monkeypatch.setattr(eval_run, "generate", lambda model, chunk, num_samples, **kw: Out(len(chunk) * num_samples))
    monkeypatch.setattr(eval_run, "decode_completions", lambda tok, tokens, lengths: texts[:len(lengths)])
    rules = {"rules": {"math_dapo": "answer_line"}}
    m = eval_run.evaluate(None, ByteTokenizer(), exs, k=2, template="qwen2.5", reward="by_source",
                          reward_kwargs=rules, return_samples=True, batch_size=2)
    assert [s["correct"] for s in m["samples"]] == [True, False, True, True]
    assert [s["answer"] for s in m["samples"]] == ["42", "41", "0.5", "1/2"]
    assert m["pass@1"] == 0.75 and m["by_source/math_dapo/pass@1"] == 0.5
    plain = eval_run.evaluate(None, ByteTokenizer(), exs, k=2, template="qwen2.5", reward="by_source", batch_size=2)
    assert plain["by_source/math_dapo/pass@1"] == 0.0  # without rules: verifiable, which reads no Answer: line
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        check_reward("by_source", exs, {"rules": {"*": "nope"}})
    from r1jax.configs import eval_config
    assert "reward_kwargs" in eval_config()
