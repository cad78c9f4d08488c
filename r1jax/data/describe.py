"""What a dataset looks like to a run, before the run: `r1jax inspect --data FILE`.

`describe(examples, ...)` summarizes problems as a stage would see them: how many, their fields, sources (verl's
`data_source`) and gold kinds, whether a reward can judge every one (`check_reward`, the check a GRPO stage or an
evaluation makes before sampling), the prompt length in tokens under a template and tokenizer (and how many exceed a
`max_prompt_len`), how many problems each evaluation set contaminates (`r1jax.data.decontaminate`), and the first
few prompts rendered exactly as the model will read them. `format_description` prints it.

Example:
    >>> from r1jax.data.describe import describe
    >>> d = describe([{"prompt": "1+1?", "answer": "2", "source": "toy"}], template="plain", reward="accuracy", show=1)
    >>> d["problems"], d["sources"], d["gold"]["answer"], d["reward_check"], d["shown"][0]["text"]
    (1, {'toy': 1}, 1, 'ok', '1+1?')
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np


def _gold_kinds(examples: Sequence[Mapping]) -> dict[str, int]:
    kinds = Counter()
    for ex in examples:
        if "answer" in ex:
            kinds["answer"] += 1
            if isinstance(ex["answer"], list):
                kinds["answer_alternatives"] += 1
        for key in ("tests", "choices", "messages"):
            if key in ex:
                kinds[key] += 1
    return {k: kinds.get(k, 0) for k in ("answer", "answer_alternatives", "tests", "choices", "messages")}


def describe(examples: Sequence[Mapping], *, template: str | None = None, tokenizer=None, reward: str | None = None,
             max_prompt_len: int = 0, show: int = 2, decontaminated: tuple[list, Mapping[str, int]] | None = None,
             reward_kwargs: Mapping | None = None) -> dict:
    """A summary dict (see the module docstring). `template` renders the prompts (token counts need `tokenizer` too);
    a template that cannot render some problem, or a reward that cannot judge one, is reported, not raised.
    `decontaminated`, what r1jax.data.decontaminate.decontaminate returned for these examples, gives the problems
    each evaluation set contaminates under "contaminated", and those none does under "clean"."""
    from r1jax.data.pipeline import _encode_prompt
    from r1jax.data.templates import render

    out: dict = {"problems": len(examples)}
    if decontaminated is not None:
        kept, removed = decontaminated
        out["contaminated"], out["clean"] = dict(removed), len(kept)
    fields = Counter(k for ex in examples for k in ex)
    out["fields"] = dict(sorted(fields.items()))
    out["sources"] = dict(sorted(Counter(str(ex["source"]) for ex in examples if "source" in ex).items()))
    out["gold"] = _gold_kinds(examples)
    if reward:
        from r1jax.eval.run import check_reward

        try:
            check_reward(reward, examples, reward_kwargs)
            out["reward_check"] = "ok"
        except ValueError as e:
            out["reward_check"] = str(e)
    out["shown"] = []
    if template:
        texts, lengths = [], []
        for i, ex in enumerate(examples):
            try:
                texts.append(render(template, ex))
            except (ValueError, KeyError) as e:
                out["template_error"] = f"problem {i} ({ex.get('id', '?')}): {e}"
                break
        if tokenizer is not None and "template_error" not in out:
            # as the sampler and the run's max_prompt_len check count them (BOS included: pipeline.prompt_token_ids)
            lengths = np.array([len(_encode_prompt(tokenizer, t, None)) for t in texts])
            q = np.percentile(lengths, [0, 50, 99, 100]) if len(lengths) else [0] * 4
            out["prompt_tokens"] = dict(zip(("min", "median", "p99", "max"), (int(round(v)) for v in q)))
            if max_prompt_len:
                out["over_max_prompt_len"] = int((lengths > max_prompt_len).sum())
        for i, text in enumerate(texts[:show]):
            ex = examples[i]
            row = {"id": ex.get("id"), "text": text}
            for key in ("answer", "tests", "choices", "source"):
                if key in ex:
                    row[key] = ex[key]
            if len(lengths):
                row["tokens"] = int(lengths[i])
            out["shown"].append(row)
    return out


def _clip(value, width: int = 300) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= width else text[:width] + f"... ({len(text)} chars)"


def format_description(d: Mapping, *, name: str = "") -> str:
    lines = [f"{d['problems']} problems" + (f" from {name}" if name else "")]
    lines.append("fields: " + ", ".join(f"{k} ({n})" for k, n in d["fields"].items()))
    if d["sources"]:
        lines.append("sources: " + ", ".join(f"{k} ({n})" for k, n in d["sources"].items()))
    gold = d["gold"]
    lines.append(f"gold: answer {gold['answer']} (lists of alternatives {gold['answer_alternatives']}), tests "
                 f"{gold['tests']}, choices {gold['choices']}; chat-message prompts {gold['messages']}")
    if "contaminated" in d:
        lines.append(f"decontamination: {d['clean']} clean; contaminated by " +
                     ", ".join(f"{k} {n}" for k, n in d["contaminated"].items()))
    if "reward_check" in d:
        lines.append("reward: " + ("judges every problem" if d["reward_check"] == "ok" else d["reward_check"]))
    if "template_error" in d:
        lines.append(f"template: cannot render {d['template_error']}")
    if "prompt_tokens" in d:
        t = d["prompt_tokens"]
        line = f"prompt tokens: min {t['min']}, median {t['median']}, p99 {t['p99']}, max {t['max']}"
        if "over_max_prompt_len" in d:
            line += f"; {d['over_max_prompt_len']} over max_prompt_len"
        lines.append(line)
    for row in d["shown"]:
        head = f"--- {row['id']}" + (f" ({row['tokens']} tokens)" if "tokens" in row else "")
        lines += [head, row["text"]]
        lines += [f"[{key}] {_clip(row[key])}" for key in ("answer", "tests", "choices", "source") if key in row]
    return "\n".join(lines)
