"""Prompt templates: the R1-Zero template, the chat formats of Qwen2.5 and DeepSeek-R1, and any checkpoint's own.

``render(name, x)`` takes an example dict (its ``messages`` if it has them, as chat examples and verl's RL rows do,
else its ``prompt`` as the user turn) or a list of chat messages (``{"role": "system" | "user" | "assistant",
"content": str}``) and returns the text the model sees; with ``add_generation_prompt`` (the default) the text ends
where the model's response begins.
Template ``"hf:PATH"`` is the Jinja chat template of a checkpoint or tokenizer directory (or its
``chat_template.jinja`` / ``tokenizer_config.json``), rendered as transformers renders it
(``r1jax.data.chat_template``); ``"hf:PATH?name=value&..."`` passes template variables as
``apply_chat_template(..., name=value)`` does, e.g. ``"hf:/ckpt/Qwen3-8B?enable_thinking=false"`` for Qwen3's
non-thinking mode. A variable the template never reads is refused (a misspelling would render the default).
``"TEMPLATE+INSTRUCTION"`` also appends a registered instruction to the last user turn, as published recipes put one
in the user's message (``INSTRUCTIONS``; add more with ``register_instruction``): ``"qwen2.5+think_hash"`` is verl's
GSM8K prompt, ``"deepseek_r1+think_boxed"`` DeepScaleR's, ``"hf+reason_boxed"`` DeepSeek's directive for R1 on math
under the tokenizer's own template. The example keeps its text (decontamination and ids read the problem alone).

Example:
    >>> from r1jax.data import render
    >>> render("r1_zero", {"prompt": "What is 2 + 3 * 4?"}).split("</answer>")[-1]
    '. User: What is 2 + 3 * 4?. Assistant:'
    >>> render("qwen2.5", [{"role": "user", "content": "Hi"}], system="Be brief.")
    '<|im_start|>system\\nBe brief.<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
    >>> render("deepseek_r1", {"prompt": "Hi"})
    '<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜><think>\\n'
    >>> print(render("plain+think_hash", {"prompt": "2 + 2?"}))
    2 + 2? Let's think step by step and output the final answer after "####".
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

Message = Mapping[str, str]

THINK_START, THINK_END = "<think>", "</think>"
ANSWER_START, ANSWER_END = "<answer>", "</answer>"
MARKERS = (THINK_START, THINK_END, ANSWER_START, ANSWER_END)

# DeepSeek-R1 paper, Table 1, verbatim; "prompt" is replaced by the problem. The paper writes
# "User: prompt. Assistant:", so the period stays even after a question mark.
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> "
    "</answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here "
    "</answer>. User: {prompt}. Assistant:"
)

# The directive DeepSeek recommends putting in the user prompt for math with R1 models.
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

# Instructions a template may append to the last user turn ("TEMPLATE+NAME"), each with the separator its recipe
# puts before it.
INSTRUCTIONS: dict[str, str] = {
    # DeepSeek's directive for R1 on math problems, on its own line as SimpleRL-Zoo and Qwen2.5-Math's CoT prompt do.
    "reason_boxed": "\n" + BOXED_INSTRUCTION,
    # verl's MATH preprocessing and DeepScaleR: "{problem} Let's think step by step ... \boxed{}."
    "think_boxed": " Let's think step by step and output the final answer within \\boxed{}.",
    # verl's GSM8K preprocessing, read by its "####" rule (reward `gsm8k`).
    "think_hash": " Let's think step by step and output the final answer after \"####\".",
}

HF_PREFIX = "hf:"  # "hf:PATH": a checkpoint's or tokenizer directory's own chat template

QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN_IM_START, QWEN_IM_END = "<|im_start|>", "<|im_end|>"

DEEPSEEK_BOS = "<｜begin▁of▁sentence｜>"
DEEPSEEK_EOS = "<｜end▁of▁sentence｜>"
DEEPSEEK_USER, DEEPSEEK_ASSISTANT = "<｜User｜>", "<｜Assistant｜>"

_ROLES = ("system", "user", "assistant")


def _messages(x: Mapping[str, Any] | Sequence[Message], system: str | None) -> list[Message]:
    if isinstance(x, Mapping):
        if "messages" in x:  # chat examples: the conversation before the response (its `prompt` is the user turn)
            msgs: list[Message] = list(x["messages"])
        elif "prompt" in x:
            msgs = [{"role": "user", "content": x["prompt"]}]
        else:
            raise ValueError(f"example has no 'prompt' or 'messages' field (has {sorted(x)}); pass an example "
                             "with a 'prompt' or a list of {'role', 'content'} messages")
    else:
        msgs = list(x)
    for i, m in enumerate(msgs):
        if m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} is {dict(m)!r}; expected role in {_ROLES} and a str content")
    if system is not None:
        if msgs and msgs[0]["role"] == "system":
            raise ValueError("system= given but the messages already start with a system message")
        msgs = [{"role": "system", "content": system}] + msgs
    return msgs


def _plain(msgs: list[Message], add_generation_prompt: bool) -> str:
    del add_generation_prompt  # a bare prompt has no response marker to add
    if len(msgs) != 1 or msgs[0]["role"] != "user":
        raise ValueError(f"template 'plain' takes exactly one user message, got roles "
                         f"{[m['role'] for m in msgs]}")
    return msgs[0]["content"]


def _r1_zero(msgs: list[Message], add_generation_prompt: bool) -> str:
    if len(msgs) != 1 or msgs[0]["role"] != "user":
        raise ValueError(f"template 'r1_zero' takes exactly one user message (it is a completion prompt "
                         f"for base models), got roles {[m['role'] for m in msgs]}")
    del add_generation_prompt  # the template always ends at "Assistant:"
    return R1_ZERO_TEMPLATE.format(prompt=msgs[0]["content"])


def _qwen25(msgs: list[Message], add_generation_prompt: bool) -> str:
    if msgs[0]["role"] != "system":
        # Qwen2.5-Instruct's own chat template inserts this default system turn.
        msgs = [{"role": "system", "content": QWEN_DEFAULT_SYSTEM}] + msgs
    text = "".join(f"{QWEN_IM_START}{m['role']}\n{m['content']}{QWEN_IM_END}\n" for m in msgs)
    if add_generation_prompt:
        text += f"{QWEN_IM_START}assistant\n"
    return text


def _deepseek_r1(msgs: list[Message], add_generation_prompt: bool) -> str:
    # DeepSeek-R1 / R1-Distill: system text right after BOS, no turn separators, each finished assistant
    # turn closed by EOS with its reasoning dropped (only the text after </think> is kept in history),
    # and the response forced to open with "<think>\n" as DeepSeek recommends.
    system = "".join(m["content"] for m in msgs if m["role"] == "system")
    parts = [DEEPSEEK_BOS, system]
    for m in msgs:
        if m["role"] == "user":
            parts.append(DEEPSEEK_USER + m["content"])
        elif m["role"] == "assistant":
            content = m["content"].split(THINK_END)[-1]
            parts.append(DEEPSEEK_ASSISTANT + content + DEEPSEEK_EOS)
    if add_generation_prompt:
        parts.append(DEEPSEEK_ASSISTANT + THINK_START + "\n")
    return "".join(parts)


_TEMPLATES: dict[str, Callable[[list[Message], bool], str]] = {}


def register_template(name: str, fn: Callable[[list[Message], bool], str]) -> None:
    """Adds ``fn(messages, add_generation_prompt) -> str`` as template ``name``."""
    if "+" in name or name.startswith(HF_PREFIX) or name == "hf":
        raise ValueError(f"template name {name!r}: '+' starts an instruction and 'hf' names a checkpoint's template")
    if name in _TEMPLATES:
        raise ValueError(f"template {name!r} is already registered")
    _TEMPLATES[name] = fn


def list_templates() -> list[str]:
    return sorted(_TEMPLATES)


def register_instruction(name: str, text: str) -> None:
    """Adds ``text`` (with its leading separator, e.g. " Answer in one word.") as instruction ``name``, appended to
    the last user turn by templates written "TEMPLATE+name"."""
    if not name.isidentifier():
        raise ValueError(f"instruction name {name!r} must be an identifier (it follows '+' in a template name)")
    if name in INSTRUCTIONS:
        raise ValueError(f"instruction {name!r} is already registered")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"instruction {name!r} needs a non-empty str; got {text!r}")
    INSTRUCTIONS[name] = text


def split_instruction(template: str) -> tuple[str, str | None]:
    """'TEMPLATE+NAME' -> ('TEMPLATE', NAME) for a registered instruction NAME; any other template -> (it, None).
    A registered template (or "hf") followed by an unknown NAME is refused; an hf:PATH whose path holds a '+' is a
    path."""
    base, plus, name = template.rpartition("+")
    if not plus:
        return template, None
    if name in INSTRUCTIONS:
        return base, name
    if base in _TEMPLATES or is_own_template(base) or (name.isidentifier() and not base.startswith(HF_PREFIX)):
        raise KeyError(f"template {template!r}: unknown instruction {name!r} after '+'; registered: "
                       f"{sorted(INSTRUCTIONS)} (r1jax.data.templates.register_instruction adds more)")
    return template, None


def _with_instruction(fn: Callable[[list[Message], bool], str], text: str) -> Callable[[list[Message], bool], str]:
    def render_with(msgs: list[Message], add_generation_prompt: bool) -> str:
        users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
        if not users:
            raise ValueError(f"an instruction ({text.strip()!r}) goes in the last user turn; the messages have "
                             f"roles {[m['role'] for m in msgs]}")
        i = users[-1]
        msgs = [*msgs[:i], {**msgs[i], "content": msgs[i]["content"] + text}, *msgs[i + 1:]]
        return fn(msgs, add_generation_prompt)
    return render_with


register_template("plain", _plain)
register_template("r1_zero", _r1_zero)
register_template("qwen2.5", _qwen25)
register_template("deepseek_r1", _deepseek_r1)


def _template_value(text: str):
    try:
        return json.loads(text)  # true / false / null / numbers / "quoted"
    except ValueError:
        return text


def split_hf_template(template: str) -> tuple[str, dict[str, Any]]:
    """'hf:PATH?name=value&...' -> (PATH, {name: value}); values are JSON (true, false, null, numbers) or text.
    The variables go to the chat template as transformers' `apply_chat_template(..., **kwargs)` passes them."""
    from r1jax.data.chat_template import ChatTemplateError

    path, _, query = template[len(HF_PREFIX):].partition("?")
    variables = {}
    for item in filter(None, query.split("&")):
        name, eq, value = item.partition("=")
        if not eq or not name.isidentifier():
            raise ChatTemplateError(f"template {template!r}: {item!r} is not name=value (e.g. "
                                    f"'hf:/ckpt/Qwen3-8B?enable_thinking=false')")
        variables[name] = _template_value(value)
    return path, variables


@functools.lru_cache(maxsize=16)
def _hf_template(template: str):
    # Once per template string: prompts are rendered one example at a time, datasets have millions.
    from r1jax.data.chat_template import load_chat_template

    path, variables = split_hf_template(template)
    chat = load_chat_template(Path(path).expanduser())
    chat.check_variables(variables)
    return chat, variables


def _template_fn(template: str, read: bool = True) -> Callable[[list[Message], bool], str] | None:
    if isinstance(template, str):
        base, instruction = split_instruction(template)
        if instruction is not None:
            fn = _template_fn(base, read)
            return None if fn is None else _with_instruction(fn, INSTRUCTIONS[instruction])
    if isinstance(template, str) and template.startswith(HF_PREFIX) and template[len(HF_PREFIX):]:
        if not read:
            split_hf_template(template)
            return None
        chat, variables = _hf_template(template)
        return lambda msgs, add_generation_prompt: chat.render_checked(msgs, add_generation_prompt, variables)
    if template not in _TEMPLATES:
        raise KeyError(f"unknown template {template!r}; valid: {list_templates()}, or 'hf:PATH' (the chat "
                       "template of a checkpoint or tokenizer directory)")
    return _TEMPLATES[template]


def is_own_template(template: str) -> bool:
    """Template "hf" (or "hf?name=value&...", either with "+instruction"): the chat template of the tokenizer in use,
    its path not named."""
    return template == "hf" or template.startswith(("hf?", "hf+"))


def own_template(template: str, tokenizer_path: str | Path) -> str:
    """`template` with "hf" / "hf?..." / "hf+..." made "hf:<the tokenizer's directory>?..." (a tokenizer.json or
    .model file names its directory); any other template as it is."""
    if not is_own_template(template):
        return template
    path = Path(tokenizer_path)
    directory = path.parent if path.is_file() or path.suffix in (".json", ".model") else path
    return f"hf:{directory}{template[2:]}"


def check_template(template: str, *, read: bool = True) -> None:
    """Raises KeyError for an unknown template name and ChatTemplateError (a ValueError) for an `hf:PATH` whose
    chat template cannot be read or compiled (`read=False`: the name's form only), before any prompt is rendered."""
    _template_fn(template, read)


def render(template: str, x: Mapping[str, Any] | Sequence[Message], *, system: str | None = None,
           add_generation_prompt: bool = True) -> str:
    """Renders an example (its ``messages``, else its ``prompt``) or chat messages with the template named ``template``.

    Templates: 'plain' (the prompt as is), 'r1_zero' (DeepSeek-R1 paper Table 1), 'qwen2.5'
    (Qwen2.5-Instruct ChatML with its default system prompt), 'deepseek_r1' (DeepSeek-R1 and
    R1-Distill; the response starts with "<think>\\n"), 'hf:PATH' (a checkpoint's own chat template) and
    'hf:PATH?name=value&...' (with template variables, e.g. enable_thinking=false); any of them '+NAME' with an
    instruction from INSTRUCTIONS appended to the last user turn (e.g. 'qwen2.5+think_hash').
    """
    return _template_fn(template)(_messages(x, system), add_generation_prompt)
