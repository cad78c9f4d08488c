"""A checkpoint's own chat template: the Jinja `chat_template` of a Hugging Face tokenizer, rendered as
transformers' `apply_chat_template(..., tokenize=False)` renders it.

Instruct and distilled models were trained on one exact prompt format, and a prompt that differs by a newline
moves their scores. The built-in templates cover R1-Zero, Qwen2.5 and DeepSeek-R1; any other checkpoint
(Llama 3.x Instruct, Qwen2.5-Math, QwQ, your own SFT model) brings its format along in `chat_template.jinja` or
`tokenizer_config.json`, and template `"hf:PATH"` renders that (`r1jax.data.render`, every stage's `template`,
`r1jax eval --template hf`).

The environment is the one transformers builds: a sandboxed Jinja environment (templates from the Hub are
untrusted code) with `trim_blocks` / `lstrip_blocks`, the `loopcontrols` extension, a `tojson` filter that keeps
non-ASCII text, `raise_exception(message)`, `strftime_now(format)`, and the variables `messages`, `tools` (None),
`documents` (None), `add_generation_prompt` and the tokenizer's special tokens that are set (`bos_token`,
`eos_token`, `pad_token`, ...). `{% generation %}` blocks (assistant-mask markers) render their body.

Example:
    >>> t = ChatTemplate("{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content | trim }}{% endfor %}"
    ...                  "{% if add_generation_prompt %}<assistant>{% endif %}", special_tokens={"bos_token": "<s>"})
    >>> t.render([{"role": "user", "content": " Hi "}])
    '<s><user>Hi<assistant>'
"""
from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from r1jax.data.tokenizers import _config_token, read_json_object

# transformers passes the tokenizer's special tokens that are set; an unset one is undefined in the template.
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# What the renderer itself sets.
RESERVED = ("messages", "tools", "documents", "add_generation_prompt")
TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "tokenizer_config.json"


class ChatTemplateError(ValueError):
    """A chat template that cannot be read, compiled or rendered; the message names the file."""


def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        # TRL-style templates mark assistant text with {% generation %}; transformers uses it to build a mask,
        # which r1jax computes from the prompt / completion split instead, so the body renders unchanged.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        # As in transformers: no underscore attributes, the usual route from a namespace to Python internals.
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates may not set {name!r} on a namespace")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters, which would change the prompt text.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, namespace=Namespace, dict=dict,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env


class ChatTemplate:
    """A compiled chat template. `special_tokens` maps names in SPECIAL_TOKENS (bos_token, eos_token, ...) to
    their text; a missing or None one is undefined in the template, as in transformers. `path` names the
    source in errors."""

    def __init__(self, source: str, *, special_tokens: Mapping[str, str | None] | None = None,
                 path: str = "<memory>"):
        import jinja2

        if not isinstance(source, str) or not source.strip():
            raise ChatTemplateError(f"{path}: the chat template is empty")
        unknown = set(special_tokens or {}) - set(SPECIAL_TOKENS)
        if unknown:
            raise ChatTemplateError(f"{path}: unknown special tokens {sorted(unknown)}; valid: {SPECIAL_TOKENS}")
        self.source, self.path = source, path
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"{path}: chat template syntax error at line {e.lineno}: {e.message}") from None

    @functools.cached_property
    def variables(self) -> frozenset[str]:
        """The names the template reads from its context (e.g. Qwen3's `enable_thinking`)."""
        import jinja2.meta

        return frozenset(jinja2.meta.find_undeclared_variables(_environment().parse(self.source)))

    def check_variables(self, variables: Mapping[str, Any]) -> None:
        """Raises ChatTemplateError for extra variables the template would not read (a misspelt `enable_thinking`
        would silently render the default) or that would replace the ones transformers sets."""
        reserved = sorted(set(variables) & (set(RESERVED) | set(SPECIAL_TOKENS)))
        if reserved:
            raise ChatTemplateError(f"{self.path}: template variables {reserved} are set by the renderer")
        unread = sorted(set(variables) - self.variables)
        if unread:
            read = sorted(self.variables - set(RESERVED) - set(SPECIAL_TOKENS) - set(_environment().globals))
            raise ChatTemplateError(f"{self.path}: the chat template never reads {unread}; the variables it reads "
                                    f"besides messages and special tokens: {read}")

    def render(self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True,
               **variables) -> str:
        """The text of `messages` (dicts with `role` and `content`); with `add_generation_prompt` it ends where
        the assistant's response begins. `variables` are further template variables, as transformers'
        `apply_chat_template(..., **kwargs)` passes them (e.g. `enable_thinking=False` for Qwen3)."""
        self.check_variables(variables)
        return self.render_checked(messages, add_generation_prompt, variables)

    def render_checked(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool,
                       variables: Mapping[str, Any]) -> str:
        """`render` with `variables` already passed through `check_variables` (once per template, not per prompt)."""
        import jinja2

        try:
            return self._template.render(messages=[dict(m) for m in messages], tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self.special_tokens,
                                         **variables)
        except jinja2.TemplateError as e:  # raise_exception() in the template, or an undefined operation
            raise ChatTemplateError(f"{self.path}: the chat template refused the conversation "
                                    f"(roles {[m.get('role') for m in messages]}): {e}") from None

    def __repr__(self) -> str:
        return f"ChatTemplate(path={self.path!r}, {len(self.source)} chars)"


def _read_config(path: Path) -> dict:
    try:
        return read_json_object(path)
    except ValueError as e:
        raise ChatTemplateError(str(e)) from None


def _config_template(config: dict, where: Path) -> str:
    source = config.get("chat_template")
    if source is None:
        raise ChatTemplateError(f"{where}: has no 'chat_template' (a base model's tokenizer has none: use a "
                                "built-in template such as r1_zero, or a checkpoint that ships one)")
    if isinstance(source, list):  # several named templates (e.g. "default" and "tool_use"): the default one
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, Mapping)}
        if "default" not in named:
            raise ChatTemplateError(f"{where}: 'chat_template' holds templates {sorted(map(str, named))} but no "
                                    "'default' one")
        source = named["default"]
    if not isinstance(source, str):
        raise ChatTemplateError(f"{where}: 'chat_template' is {type(source).__name__}, expected a string")
    return source


def load_chat_template(path: str | os.PathLike) -> ChatTemplate:
    """The chat template of a checkpoint or tokenizer directory (its `chat_template.jinja`, else the
    `chat_template` of its `tokenizer_config.json`), or of one such file. Special tokens come from the
    `tokenizer_config.json` beside it."""
    path = Path(path)
    if not path.exists():
        raise ChatTemplateError(f"{path}: no such file or directory (expected a checkpoint or tokenizer directory, "
                                f"a {TEMPLATE_FILE} or a {CONFIG_FILE})")
    if path.is_dir():
        found = [path / n for n in (TEMPLATE_FILE, CONFIG_FILE) if (path / n).is_file()]
        if not found:
            raise ChatTemplateError(f"{path}: neither {TEMPLATE_FILE} nor {CONFIG_FILE} is in this directory")
        path = found[0]
    if path.suffix == ".json":
        config = _read_config(path)
        source = _config_template(config, path)
    else:
        source = path.read_text(encoding="utf-8")
        beside = path.with_name(CONFIG_FILE)
        config = _read_config(beside) if beside.is_file() else {}
    tokens = {k: _config_token(config, k) for k in SPECIAL_TOKENS}
    return ChatTemplate(source, special_tokens=tokens, path=str(path))

