"""A generative judge: a language model asked, through a template, whether a response is right; its yes / no
becomes the score (DeepSeek-R1's generative reward model, fed the model's prediction and the ground truth, for
answers that rules cannot check; used in its rejection sampling).

The judge generates `max_new_tokens` greedily through `r1jax.sampling.generate` for a whole batch of prompts at
once. `parse_verdict` maps its output to 1 (yes), 0 (no) or None (anything else); it never raises and reads at
most `MAX_VERDICT_CHARS` characters, so hostile or broken outputs score `invalid_score` (default 0).

Templates are names from `JUDGE_TEMPLATES` or strings with the fields {prompt}, {response}, {reference}; the fields
are substituted literally (braces inside a response are text, not format directives).

Example:
    >>> [parse_verdict(t) for t in ["Yes", " **no**.", "yes, no", "Yesterday", None, "maybe"]]
    [1.0, 0.0, None, None, None, None]
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

JUDGE_TEMPLATES = {
    "correct": ("Question: {prompt}\nReference answer: {reference}\nResponse: {response}\n"
                "Is the response correct given the reference? Answer yes or no.\nAnswer:"),
    "reasoning": ("Question: {prompt}\nResponse: {response}\n"
                  "Is the reasoning in the response sound and its conclusion right? Answer yes or no.\nAnswer:"),
}
FIELDS = ("prompt", "response", "reference")
MAX_VERDICT_CHARS = 256
_YES = {"yes", "y", "correct", "true"}
_NO = {"no", "n", "incorrect", "wrong", "false"}
_FIELD_RE = re.compile(r"\{(\w*)\}")
_WORD_RE = re.compile(r"[a-z]+")
_PREFIX_RE = re.compile(r"^(?:final\s+)?(?:answer|verdict|judgement|judgment)\s*[:\-]?\s*")


def resolve_template(template: str) -> str:
    """The template text (a name in JUDGE_TEMPLATES or the text itself), checked: it may only use {prompt},
    {response} and {reference}, and must use {response}."""
    if not isinstance(template, str) or not template:
        raise ValueError(f"judge template must be a non-empty str (a name in {sorted(JUDGE_TEMPLATES)} or text "
                         f"with {{prompt}}, {{response}}, {{reference}}); got {template!r}")
    text = JUDGE_TEMPLATES.get(template, template)
    used = set(_FIELD_RE.findall(text))
    unknown = sorted(used - set(FIELDS))
    if unknown:
        raise ValueError(f"judge template uses unknown field(s) {unknown}; valid: {list(FIELDS)} (template "
                         f"{template!r:.80})")
    if "response" not in used:
        raise ValueError(f"judge template {template!r:.80} never shows the judge the {{response}}")
    return text


def fill(template_text: str, *, prompt: str, response: str, reference: str) -> str:
    """The template with its fields replaced literally (one pass, so a field's value is never re-expanded)."""
    values = {"prompt": prompt, "response": response, "reference": reference}
    return _FIELD_RE.sub(lambda m: values[m.group(1)], template_text)


def parse_verdict(text) -> float | None:
    """1.0 for yes, 0.0 for no, None for anything else: not text, empty, both yes- and no-words among the first
    words, anything but a word first, or a first word that is neither ("Yesterday", "maybe"). Markup (quotes,
    ** bold, punctuation) and an "Answer:" prefix are ignored. Never raises."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text[:4 * MAX_VERDICT_CHARS]).decode("utf-8", "replace")
    if not isinstance(text, str):
        return None
    head = _PREFIX_RE.sub("", text[:MAX_VERDICT_CHARS].strip().lower().lstrip(" \t\n\"'*`_#>:-([{"))
    if not _WORD_RE.match(head):  # the verdict must come first: "🙂 yes", "<answer>yes" are not answers
        return None
    words = _WORD_RE.findall(head)[:4]
    # The first word decides; a yes and a no together ("yes, no", "no... yes") is no verdict at all.
    if words[0] in _YES and not any(w in _NO for w in words[1:]):
        return 1.0
    if words[0] in _NO and not any(w in _YES for w in words[1:]):
        return 0.0
    return None


def verdict_scores(outputs: Sequence, *, yes_score: float = 1.0, no_score: float = 0.0,
                   invalid_score: float = 0.0) -> tuple[np.ndarray, int]:
    """Scores of judge outputs and the count of invalid ones (neither yes nor no)."""
    scores, invalid = np.full(len(outputs), float(invalid_score)), 0
    for i, out in enumerate(outputs):
        v = parse_verdict(out)
        if v is None:
            invalid += 1
        else:
            scores[i] = yes_score if v == 1.0 else no_score
    return scores, invalid


def _text(x) -> str:
    if isinstance(x, list):  # alternative gold answers
        return " or ".join(map(_text, x))
    return x if isinstance(x, str) else ("" if x is None else str(x))


class Judge:
    """A judge model with its template: `judge(responses, examples) -> (scores_R, info)`.

    `examples[i]` gives {prompt} (its "prompt" field) and {reference} (its `reference_field`, e.g. the gold
    answer). Prompts longer than `max_prompt_len` tokens are not judged: they score `invalid_score` and are counted
    in info["too_long"] (cut, they would show the judge something else than the response). `batch_size` > 0 pads
    every generate call to that many prompts so each compiles once."""

    def __init__(self, model, tokenizer, *, template: str = "correct", reference_field: str = "answer",
                 max_new_tokens: int = 4, max_prompt_len: int = 512, batch_size: int = 0, yes_score: float = 1.0,
                 no_score: float = 0.0, invalid_score: float = 0.0, mesh=None, rules=None):
        if max_new_tokens < 1 or max_prompt_len < 1 or batch_size < 0:
            raise ValueError(f"judge: max_new_tokens={max_new_tokens} and max_prompt_len={max_prompt_len} must be "
                             f">= 1, batch_size={batch_size} >= 0")
        self.model, self.tokenizer = model, tokenizer
        self.template = resolve_template(template)
        self.reference_field = reference_field
        self.max_new_tokens, self.max_prompt_len, self.batch_size = max_new_tokens, max_prompt_len, batch_size
        self.scores = dict(yes_score=float(yes_score), no_score=float(no_score), invalid_score=float(invalid_score))
        self.mesh, self.rules = mesh, rules

    def prompts(self, responses: Sequence, examples: Sequence[Mapping]) -> list[str]:
        if len(responses) != len(examples):
            raise ValueError(f"got {len(responses)} responses but {len(examples)} examples")
        needs_ref = "{reference}" in self.template
        out = []
        for i, (resp, ex) in enumerate(zip(responses, examples)):
            if needs_ref and self.reference_field not in ex:
                raise ValueError(f"judge template shows {{reference}}, but example {i} has no "
                                 f"{self.reference_field!r} field (has {sorted(ex)}); set reference_field")
            out.append(fill(self.template, prompt=_text(ex.get("prompt")), response=_text(resp),
                            reference=_text(ex.get(self.reference_field))))
        return out

    def outputs(self, texts: Sequence[str]) -> tuple[list[str | None], int]:
        """The judge's greedy continuations (None where the prompt was too long) and the too-long count."""
        from r1jax.eval.run import decode_completions
        from r1jax.sampling import generate

        tk = self.tokenizer
        ids = []
        for t in texts:
            x = tk.encode(t)
            if tk.bos_id is not None and (not x or x[0] != tk.bos_id):
                x = [tk.bos_id] + x
            ids.append(x)
        fits = [i for i, x in enumerate(ids) if len(x) <= self.max_prompt_len]
        outs: list[str | None] = [None] * len(texts)
        step = self.batch_size or max(len(fits), 1)
        for start in range(0, len(fits), step):
            idx = fits[start:start + step]
            chunk = [ids[i] for i in idx]
            chunk += [chunk[0]] * (step - len(chunk))  # same shapes for every call
            res = generate(self.model, chunk, max_new_tokens=self.max_new_tokens, temperature=0.0,
                           eos_id=tk.stop_ids, pad_id=tk.pad_id or 0, mesh=self.mesh,
                           rules=self.rules or "fsdp", min_prompt_bucket=16)
            for i, text in zip(idx, decode_completions(tk, res.tokens, res.lengths)):
                outs[i] = text
        return outs, len(texts) - len(fits)

    def __call__(self, responses: Sequence, examples: Sequence[Mapping]) -> tuple[np.ndarray, dict]:
        outs, too_long = self.outputs(self.prompts(responses, examples))
        scores, invalid = verdict_scores(outs, **self.scores)
        return scores, {"too_long": too_long, "invalid": invalid - too_long, "outputs": outs}


class JudgeComponent:
    """A judge as a GRPO model-reward component (scores the decoded completions)."""

    def __init__(self, spec, judge: Judge):
        self.spec, self.judge = spec, judge

    def score(self, *, texts, examples, **_) -> np.ndarray:
        return self.judge(texts, examples)[0]
