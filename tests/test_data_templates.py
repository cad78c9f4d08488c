"""Templates: R1-Zero verbatim from the paper, Qwen2.5 ChatML, DeepSeek-R1 chat format."""
import pytest

from r1jax.data import BOXED_INSTRUCTION, MARKERS, list_templates, register_template, render

# DeepSeek-R1 paper (arXiv:2501.12948), Table 1, typed in independently of the implementation.
PAPER_TABLE_1 = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> "
    "</answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here "
    "</answer>. User: prompt. Assistant:"
)


def test_r1_zero_verbatim():
    assert render("r1_zero", {"prompt": "prompt"}) == PAPER_TABLE_1
    q = "What is 2 + 3 * 4?"
    assert render("r1_zero", {"prompt": q, "answer": "14"}) == PAPER_TABLE_1.replace(
        "User: prompt.", f"User: {q}.")
    assert render("r1_zero", [{"role": "user", "content": q}]) == render("r1_zero", {"prompt": q})
    assert all(m in PAPER_TABLE_1 for m in MARKERS)


def test_plain():
    assert render("plain", {"prompt": "2+2"}) == "2+2"


def test_qwen25():
    ex = {"prompt": "What is 1 + 1?"}
    assert render("qwen2.5", ex) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 1 + 1?<|im_end|>\n<|im_start|>assistant\n")
    msgs = [{"role": "system", "content": BOXED_INSTRUCTION}, {"role": "user", "content": "1+1"},
            {"role": "assistant", "content": "\\boxed{2}"}]
    assert render("qwen2.5", msgs, add_generation_prompt=False) == (
        "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
        "<|im_start|>user\n1+1<|im_end|>\n<|im_start|>assistant\n\\boxed{2}<|im_end|>\n")


def test_deepseek_r1():
    assert render("deepseek_r1", {"prompt": "What is 1 + 1?"}) == (
        "<｜begin▁of▁sentence｜><｜User｜>What is 1 + 1?<｜Assistant｜><think>\n")
    msgs = [{"role": "user", "content": "a"},
            {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nb"},
            {"role": "user", "content": "c"}]
    # reasoning of earlier turns is dropped from the history, as in DeepSeek's chat template
    assert render("deepseek_r1", msgs, system="S") == (
        "<｜begin▁of▁sentence｜>S<｜User｜>a<｜Assistant｜>\n\nb<｜end▁of▁sentence｜><｜User｜>c"
        "<｜Assistant｜><think>\n")
    assert render("deepseek_r1", msgs[:1], add_generation_prompt=False) == (
        "<｜begin▁of▁sentence｜><｜User｜>a")


def test_errors_and_registry():
    assert {"plain", "r1_zero", "qwen2.5", "deepseek_r1"} <= set(list_templates())
    with pytest.raises(KeyError, match="unknown template 'qwen'.*valid"):
        render("qwen", {"prompt": "x"})
    with pytest.raises(ValueError, match="no 'prompt' or 'messages' field"):
        render("r1_zero", {"question": "x"})
    with pytest.raises(ValueError, match="exactly one user message"):
        render("r1_zero", {"prompt": "x"}, system="s")
    with pytest.raises(ValueError, match="message 0 is .*role"):
        render("qwen2.5", [{"role": "bot", "content": "x"}])
    with pytest.raises(ValueError, match="already start with a system"):
        render("qwen2.5", [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}], system="c")
    register_template("test_shout", lambda msgs, gen: msgs[-1]["content"].upper())
    assert render("test_shout", {"prompt": "hi"}) == "HI"
    with pytest.raises(ValueError, match="already registered"):
        register_template("test_shout", lambda msgs, gen: "")
