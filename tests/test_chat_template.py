"""A checkpoint's own chat template (template "hf:PATH") against transformers' apply_chat_template, and the
built-in qwen2.5 / deepseek_r1 templates against the checkpoints' real ones."""
import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTok
from tokenizers import decoders, models, pre_tokenizers, trainers

from r1jax.data import (BOXED_INSTRUCTION, ChatTemplate, ChatTemplateError, check_template, load_chat_template,
                        load_tokenizer, render)

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"

# Each family's control tokens and the special tokens its tokenizer_config.json names.
FAMILIES = {
    "qwen2_5_instruct": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                         {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
    "deepseek_r1_distill": (["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"],
                            {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"}),
    "llama3_instruct": (["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
                        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
}

CONVERSATIONS = [
    [{"role": "user", "content": "What is 7 * 8?"}],
    [{"role": "system", "content": BOXED_INSTRUCTION}, {"role": "user", "content": "  Solve x + 1 = 3.  "}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>\nhm\n</think>\n\nHello!"},
     {"role": "user", "content": "Now compute 2^10 — and say it in 中文."}],
]


def _source(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")


def _checkpoint_dir(root: Path, name: str, *, as_file: bool) -> Path:
    """A tokenizer directory as a Hub checkpoint has it: tokenizer.json (a tiny byte-level BPE with the family's
    control tokens) and tokenizer_config.json, with the chat template in chat_template.jinja or in the config."""
    specials, tokens = FAMILIES[name]
    d = root / name
    d.mkdir()
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [c["content"] for conv in CONVERSATIONS for c in conv] * 4
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    tok.save(str(d / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **tokens}
    if as_file:
        (d / "chat_template.jinja").write_text(_source(name), encoding="utf-8")
    else:
        config["chat_template"] = _source(name)
    (d / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return d


@pytest.mark.parametrize("as_file", [False, True], ids=["in_config", "jinja_file"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_hf_template_matches_transformers(tmp_path, name, as_file):
    transformers = pytest.importorskip("transformers")
    d = _checkpoint_dir(tmp_path, name, as_file=as_file)
    ref = transformers.AutoTokenizer.from_pretrained(str(d))
    ours = load_tokenizer(d, add_markers=False)  # r1jax's <think>/<answer> tokens are not in this vocabulary
    for conv in CONVERSATIONS:
        for gen in (True, False):
            want = ref.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            text = render(f"hf:{d}", conv, add_generation_prompt=gen)
            assert text == want
            ids = ref.apply_chat_template(conv, tokenize=True, add_generation_prompt=gen, return_dict=True)
            assert ours.encode(text) == list(ids["input_ids"])
    # An example's prompt is its one user turn; system= puts a system turn first.
    ex = {"prompt": "What is 7 * 8?", "answer": "56"}
    assert render(f"hf:{d}", ex, system="Be brief.") == ref.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": ex["prompt"]}],
        tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("builtin, name, bos", [("qwen2.5", "qwen2_5_instruct", None),
                                                 ("deepseek_r1", "deepseek_r1_distill", "<｜begin▁of▁sentence｜>")])
def test_builtin_templates_equal_the_checkpoints(builtin, name, bos):
    real = ChatTemplate(_source(name), special_tokens={"bos_token": bos})
    for conv in CONVERSATIONS:
        for gen in (True, False):
            assert render(builtin, conv, add_generation_prompt=gen) == real.render(conv, add_generation_prompt=gen)


def test_template_features_match_transformers():
    transformers = pytest.importorskip("transformers")
    tok = HFTok(models.WordLevel({"<unk>": 0, "<s>": 1}, unk_token="<unk>"))
    ref = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")
    source = ("{% for m in messages %}{% if loop.index0 > 1 %}{% break %}{% endif %}"
              "[{{ m | tojson }}|{{ eos_token is defined }}|{{ bos_token }}]{% generation %}{{ m.content | upper }}"
              "{% endgeneration %}{% endfor %}{% set ns = namespace(n=0) %}{% set ns.n = ns.n + 1 %}{{ ns.n }}"
              "{{ dict(a=1) | tojson }}{{ tools is none }}{{ documents is none }}")
    conv = [{"role": "user", "content": "é <b>"}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "never rendered"}]
    want = ref.apply_chat_template(conv, chat_template=source, tokenize=False)
    assert ChatTemplate(source, special_tokens={"bos_token": "<s>"}).render(conv) == want
    assert '"é <b>"' in want and "False|<s>" in want  # non-ASCII and HTML kept; unset eos_token is undefined


# Qwen3's switch (the same condition as its checkpoints' template): thinking unless enable_thinking is false, when
# the prompt closes an empty think block; earlier turns lose their reasoning.
THINKING_SWITCH = (
    "{% for m in messages %}{% set content = m.content %}"
    "{% if m.role == 'assistant' and '</think>' in content %}"
    "{% set content = (content.split('</think>') | last).lstrip('\\n') %}{% endif %}"
    "{{ '<|im_start|>' + m.role + '\\n' + content + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}")


def test_template_variables_match_transformers(tmp_path):
    """'hf:PATH?enable_thinking=false' renders as apply_chat_template(..., enable_thinking=False)."""
    transformers = pytest.importorskip("transformers")
    d = _checkpoint_dir(tmp_path, "qwen2_5_instruct", as_file=True)
    (d / "chat_template.jinja").write_text(THINKING_SWITCH, encoding="utf-8")
    ref = transformers.AutoTokenizer.from_pretrained(str(d))
    for conv in CONVERSATIONS:
        for query, kwargs in (("", {}), ("?enable_thinking=false", {"enable_thinking": False}),
                              ("?enable_thinking=true", {"enable_thinking": True})):
            want = ref.apply_chat_template(conv, tokenize=False, add_generation_prompt=True, **kwargs)
            assert render(f"hf:{d}{query}", conv) == want
    assert render(f"hf:{d}?enable_thinking=false", CONVERSATIONS[0]).endswith("<think>\n\n</think>\n\n")
    check_template(f"hf:{d}?enable_thinking=false")


def test_template_variables_are_checked(tmp_path):
    d = _checkpoint_dir(tmp_path, "qwen2_5_instruct", as_file=True)
    (d / "chat_template.jinja").write_text(THINKING_SWITCH, encoding="utf-8")
    with pytest.raises(ChatTemplateError, match=r"never reads \['enable_thinkng'\].*reads besides messages and "
                                                r"special tokens: \['enable_thinking'\]"):
        check_template(f"hf:{d}?enable_thinkng=false")
    with pytest.raises(ChatTemplateError, match=r"variables \['add_generation_prompt'\] are set by the renderer"):
        check_template(f"hf:{d}?add_generation_prompt=false")
    with pytest.raises(ChatTemplateError, match=r"'enable_thinking' is not name=value"):
        check_template(f"hf:{d}?enable_thinking")
    with pytest.raises(ChatTemplateError, match=r"'x-y=1' is not name=value"):
        check_template(f"hf:{d}?x-y=1", read=False)  # a dry run checks the form without reading the file


def test_load_chat_template_files(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>",
        "chat_template": [{"name": "tool_use", "template": "tools"},
                          {"name": "default", "template": "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}"}]}))
    msgs = [{"role": "user", "content": "x"}]
    assert load_chat_template(tmp_path).render(msgs) == "<s>x</s>"
    # chat_template.jinja wins over the config's template; special tokens still come from the config
    (tmp_path / "chat_template.jinja").write_text("{{ eos_token }}{{ messages | length }}")
    assert load_chat_template(tmp_path).render(msgs) == "</s>1"
    assert load_chat_template(tmp_path / "tokenizer_config.json").render(msgs) == "<s>x</s>"
    assert render(f"hf:{tmp_path / 'chat_template.jinja'}", {"prompt": "q"}) == "</s>1"


def test_chat_template_errors(tmp_path):
    with pytest.raises(ChatTemplateError, match="no such file or directory"):
        load_chat_template(tmp_path / "missing")
    with pytest.raises(ChatTemplateError, match="neither chat_template.jinja nor tokenizer_config.json"):
        load_chat_template(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(ChatTemplateError, match="has no 'chat_template'.*base model"):
        load_chat_template(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "tool_use",
                                                                                     "template": "t"}]}))
    with pytest.raises(ChatTemplateError, match=r"\['tool_use'\] but no 'default'"):
        load_chat_template(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": ')
    with pytest.raises(ChatTemplateError, match="invalid JSON at line 1"):
        load_chat_template(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}\n{{ m.content }")
    with pytest.raises(ChatTemplateError, match="chat_template.jinja: chat template syntax error at line 2"):
        load_chat_template(tmp_path)
    with pytest.raises(ChatTemplateError, match="empty"):
        ChatTemplate("  ")
    with pytest.raises(ChatTemplateError, match="unknown special tokens"):
        ChatTemplate("x", special_tokens={"bos": "<s>"})
    strict = ChatTemplate("{% if messages[0].role != 'system' %}{{ raise_exception('a system turn first') }}"
                          "{% endif %}ok", path="strict.jinja")
    with pytest.raises(ChatTemplateError, match=r"strict.jinja: .*\(roles \['user'\]\): a system turn first"):
        strict.render([{"role": "user", "content": "x"}])


def test_templates_run_sandboxed():
    # Chat templates from the Hub are untrusted code: no route to Python internals.
    for source in ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "{% set ns = namespace() %}"
                   "{% set ns._x = 1 %}", "{{ messages.append(1) }}"):
        with pytest.raises(ChatTemplateError):
            ChatTemplate(source).render([{"role": "user", "content": "x"}])


def test_check_template(tmp_path):
    check_template("r1_zero")
    with pytest.raises(KeyError, match="unknown template 'r1-zero'.*hf:PATH"):
        check_template("r1-zero")
    with pytest.raises(ChatTemplateError, match="no such file"):
        check_template(f"hf:{tmp_path / 'nothing'}")
    with pytest.raises(KeyError, match="unknown template 'hf:'"):
        render("hf:", {"prompt": "x"})
