"""Prompt instructions ("TEMPLATE+NAME", r1jax.data.templates.INSTRUCTIONS) and verl's GSM8K rule (reward `gsm8k`),
checked against what verl does: its GSM8K preprocessing (examples/data_preprocess/gsm8k.py: the question, a space and
the instruction as the user turn; the gold after '####' without commas), its rule (verl/utils/reward_score/gsm8k.py,
re-stated below as a reference) and transformers' apply_chat_template for the rendered prompt."""
import doctest
import json
import random
import re

import pytest

from r1jax.data import INSTRUCTIONS, check_template, get_task, register_instruction, render
from r1jax.data.tasks import default_data_dir
from r1jax.data import templates
from r1jax.data.templates import is_own_template, own_template
from r1jax.eval.run import vote_answer
from r1jax.rl import prompt_pass
from r1jax.rl.rewards import get_reward, score_batch
from test_chat_template import _checkpoint_dir

VERL_GSM8K_INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'
DEEPSCALER_INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."


def _verl_extract(text, method):
    """verl's GSM8K extraction: the last 300 characters; strict = the last '#### number' (',' and '$' removed),
    flexible = the last number-like run that is not '.' (the loop variable's last value when all are '.')."""
    text = text[-300:]
    if method == "strict":
        hits = re.findall("#### (\\-?[0-9\\.\\,]+)", text)
        return hits[-1].replace(",", "").replace("$", "") if hits else None
    hits = re.findall("(\\-?[0-9\\.\\,]+)", text)
    out = None
    for out in reversed(hits):
        if out not in ("", "."):
            break
    return out


def _verl_score(text, gold, method, format_score):
    answer = _verl_extract(text, method)
    if answer is None:
        return 0.0
    return 1.0 if answer == gold else float(format_score)


CASES = [
    "Natalia sold 48 + 24 = 72 clips.\n#### 72",
    "#### 72",
    "####72",                                   # no space: strict reads nothing
    "#### $72",                                 # a dollar before the number: nothing either
    "#### 7$2",
    "#### 72.0",                                # a string comparison: wrong
    "#### 72. The end.",                        # the run takes the period: wrong, as verl scores it
    "#### 1,000",
    "#### 41\nwait\n#### 72",                   # the last one counts
    "#### 72\nwait\n#### 41",
    "#### -3",
    "#### 72\n" + "padding " * 50,              # outside the last 300 characters
    "padding " * 50 + "#### 72",
    "The answer is 72 apples.",
    "The answer is 72.",
    "1,000 or so",
    ". . .",
    "-.-",
    "",
    "no numbers at all",
    "<answer>72</answer>",
    "\\boxed{72}",
]


@pytest.mark.parametrize("method", ["strict", "flexible"])
@pytest.mark.parametrize("gold", ["72", "1000", "-3"])
def test_gsm8k_rule_scores_as_verl_does(method, gold):
    rule = get_reward("gsm8k")
    for text in CASES:
        for fs in (0.0, 0.1):
            want = _verl_score(text, gold, method, fs)
            assert rule(text, {"answer": gold}, method=method, format_score=fs) == want, (text, method, fs)
    # random text over the characters the rule reads
    rng = random.Random(0)
    alphabet = ["#### ", "#", " ", "7", "2", "1", "0", ".", ",", "-", "$", "\n", "a"]
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 120)))
        assert rule(text, {"answer": gold}, method=method) == _verl_score(text, gold, method, 0.0), repr(text)


def test_gsm8k_rule_gold_alternatives_votes_and_errors():
    rule = get_reward("gsm8k")
    assert rule("#### 5", {"answer": ["4", "5"]}) == 1.0
    assert rule("#### 1000", {"answer": "1,000"}) == 1.0                 # the gold drops its separators
    assert rule("#### 18", {"answer": "16 - 3 = 13 eggs.\n#### 18"}) == 1.0  # a gold with its solution text
    assert rule("#### 7" * 10**6, {"answer": "7"}) == 0.0                 # longer than any completion: unread
    with pytest.raises(ValueError, match=r"method='loose'; valid: \['strict', 'flexible'\]"):
        rule("#### 5", {"answer": "5"}, method="loose")
    totals, parts = score_batch(["#### 5", "5", "#### 6"], [{"answer": "5"}] * 3, {"gsm8k": 1.0})
    assert totals.tolist() == [1.0, 0.0, 0.0] and parts["gsm8k"].tolist() == [1.0, 0.0, 0.0]
    assert vote_answer("so\n#### 1,200", {"answer": "1200"}, "gsm8k") == "1200"
    assert vote_answer("so 12 then 1,200", {"answer": "1200"}, "gsm8k", {"method": "flexible"}) == "1,200"
    assert vote_answer("x\n#### 5", {"source": "openai/gsm8k"}, "by_source",
                       {"rules": {"openai/gsm8k": "gsm8k"}}) == "5"
    assert get_reward("by_source")("#### 5", {"answer": "5", "source": "openai/gsm8k"},
                                   rules={"openai/gsm8k": "gsm8k"}) == 1.0
    rows = [{"reward/gsm8k": 1.0, "id": "a"}, {"reward/gsm8k": 0.0, "id": "a"}]
    assert prompt_pass.count_solved(rows, 2, "gsm8k") == [{"id": "a", "solved": 1, "samples": 2}]


def test_gsm8k_gold_is_verls_ground_truth_on_the_published_file():
    """r1jax's GSM8K loader gives every training problem the ground truth verl's preprocessing writes."""
    path = default_data_dir() / "train" / "gsm8k_train.jsonl"
    if not path.exists():
        pytest.skip(f"{path} is not on this machine")
    raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    ours = get_task("gsm8k", split="train")
    assert len(ours) == len(raw) == 7473
    for row, ex in zip(raw, ours):
        verl = re.search("#### (\\-?[0-9\\.\\,]+)", row["answer"]).group(0).split("#### ")[1].replace(",", "")
        assert ex["answer"] == verl and ex["prompt"] == row["question"]
        assert get_reward("gsm8k")(f"... so\n#### {verl}", ex) == 1.0


@pytest.mark.parametrize("family,template", [("qwen2_5_instruct", "qwen2.5"), ("deepseek_r1_distill", "deepseek_r1")])
def test_instruction_renders_as_verl_prompts_it(tmp_path, family, template):
    """verl's preprocessing writes [{"role": "user", "content": question + " " + instruction}] and its dataset
    renders that with the tokenizer's chat template: "+NAME" gives the same text from the bare problem, with r1jax's
    built-in template and with the checkpoint's own ("hf:DIR", or "hf" resolved for the run's tokenizer)."""
    transformers = pytest.importorskip("transformers")
    d = _checkpoint_dir(tmp_path, family, as_file=True)
    ref = transformers.AutoTokenizer.from_pretrained(str(d))
    ex = {"prompt": "Natalia sold clips to 48 of her friends. How many?", "answer": "72"}
    for name, text in (("think_hash", VERL_GSM8K_INSTRUCTION), ("think_boxed", DEEPSCALER_INSTRUCTION)):
        want = ref.apply_chat_template([{"role": "user", "content": f"{ex['prompt']} {text}"}],
                                       add_generation_prompt=True, tokenize=False)
        assert render(f"hf:{d}+{name}", ex) == want
        assert render(own_template(f"hf+{name}", d / "tokenizer.json"), ex) == want
        if family == "qwen2_5_instruct":  # (the distill checkpoint's own template differs from deepseek_r1's
            assert render(f"{template}+{name}", ex) == want  # in the forced "<think>\n")
    assert ex == {"prompt": "Natalia sold clips to 48 of her friends. How many?", "answer": "72"}  # unchanged


def test_instruction_goes_in_the_last_user_turn_and_bad_names_are_refused():
    assert doctest.testmod(templates).failed == 0
    msgs = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
                         {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]}
    text = render("qwen2.5+reason_boxed", msgs)
    assert "Q1<|im_end|>" in text and f"Q2\n{INSTRUCTIONS['reason_boxed'].strip()}<|im_end|>" in text
    assert render("r1_zero+think_hash", {"prompt": "2+2?"}).endswith(f"User: 2+2? {VERL_GSM8K_INSTRUCTION}. Assistant:")
    with pytest.raises(ValueError, match="goes in the last user turn"):
        render("qwen2.5+think_hash", [{"role": "system", "content": "S"}])
    for bad in ("qwen2.5+nope", "hf+nope", "hf?enable_thinking=false+nope"):
        with pytest.raises(KeyError, match="unknown instruction 'nope' after '\\+'; registered: \\['reason_boxed'"):
            check_template(bad)
    with pytest.raises(KeyError, match="unknown template 'nope'"):
        check_template("nope+think_hash")
    assert is_own_template("hf+think_hash") and is_own_template("hf?a=1+think_hash")
    assert not is_own_template("hf:/x+think_hash")
    assert own_template("hf?enable_thinking=false+think_hash", "/ckpt/q/tokenizer.json") == \
        "hf:/ckpt/q?enable_thinking=false+think_hash"
    with pytest.raises(ValueError, match="already registered"):
        register_instruction("think_hash", " again")
    with pytest.raises(ValueError, match="'\\+' starts an instruction"):
        templates.register_template("mine+boxed", templates._plain)
    with pytest.raises(ValueError, match="must be an identifier"):
        register_instruction("two words", " x")
    with pytest.raises(ValueError, match="non-empty str"):
        register_instruction("blank_instruction", "  ")
    register_instruction("one_word_test", " Answer in one word.")
    try:
        assert render("plain+one_word_test", {"prompt": "Capital of France?"}) == \
            "Capital of France? Answer in one word."
    finally:
        del INSTRUCTIONS["one_word_test"]


def test_gsm8k_experiment_verl_variant():
    from run_helpers import ROOT, load_config

    cfg = load_config(ROOT / "experiments" / "grpo_qwen2_5_1_5b_gsm8k.py", "verl,runlocal")
    assert cfg.task.template == "qwen2.5+think_hash" and dict(cfg.grpo.rewards) == {"gsm8k": 1.0}
    assert cfg.grpo.eval.reward == "gsm8k"
    plain = load_config(ROOT / "experiments" / "grpo_qwen2_5_1_5b_gsm8k.py", "runlocal")
    assert plain.task.template == "qwen2.5" and dict(plain.grpo.rewards) == {"accuracy": 1.0, "format": 1.0}
    assert load_config(ROOT / "experiments" / "deepscaler_1_5b.py", None).task.template == "deepseek_r1+think_boxed"
