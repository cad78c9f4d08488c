"""Reading and writing JSONL datasets for SFT, rejection sampling and distillation.

Rows are {"prompt": str, "completion": str, ...} or chat {"messages": [{"role", "content"}, ...]} whose last
message is the assistant's response (it becomes the completion; the earlier messages are the prompt), or TRL's
conversational prompt-completion rows ({"prompt": [messages], "completion": [one assistant message]}), in JSON lines
or, as Hugging Face publishes SFT sets such as OpenR1-Math-220k, parquet (`.parquet`).

Example:
    >>> import json, tempfile, pathlib
    >>> from r1jax.data.io import read_sft_jsonl
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "d.jsonl"
    >>> _ = p.write_text(json.dumps({"messages": [{"role": "user", "content": "1+1?"},
    ...                                           {"role": "assistant", "content": "2"}]}) + "\\n")
    >>> read_sft_jsonl(p)[0]["completion"]
    '2'
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from r1jax.data.parquet import is_parquet, iter_parquet


def read_jsonl(path: str | Path, check: Callable[[Any, str], dict], *, what: str) -> list[dict]:
    """Every non-blank line of a JSONL file, each passed through `check(row, "PATH:LINE")` (which raises naming the
    line and field); a missing or empty file, or a line that is not JSON (a truncated file), is an error. A parquet
    file (`.parquet`) gives its rows the same way, by row number."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no {what} file at {path}")
    if is_parquet(path):
        return [check(row, f"{path}:{n}") for n, row in iter_parquet(path)]
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: invalid JSON ({e.msg}); truncated file?") from None
            rows.append(check(row, f"{path}:{n}"))
    if not rows:
        raise ValueError(f"{path} holds no {what} rows")
    return rows


def read_sft_jsonl(path: str | Path) -> list[dict]:
    return read_jsonl(path, _normalize, what="SFT data")


def _normalize(row: Mapping, where: str) -> dict:
    if isinstance(row, Mapping) and isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        return dict(row)
    if isinstance(row, Mapping) and isinstance(row.get("prompt"), list) and isinstance(row.get("completion"), list):
        # TRL's conversational prompt-completion rows: the completion is one assistant message
        from r1jax.data.problems import split_chat_prompt

        done = row["completion"]
        if (len(done) != 1 or not isinstance(done[0], Mapping) or done[0].get("role") != "assistant"
                or not isinstance(done[0].get("content"), str)):
            raise ValueError(f"{where}: a conversational completion is one assistant message; got {done!r:.100}")
        messages, text = split_chat_prompt(row["prompt"], where, "prompt")
        return {**row, "prompt": text, "messages": messages, "completion": done[0]["content"]}
    if isinstance(row, Mapping) and isinstance(row.get("messages"), list) and row["messages"]:
        msgs = row["messages"]
        last = msgs[-1]
        if not isinstance(last, Mapping) or last.get("role") != "assistant" or not isinstance(last.get("content"), str):
            raise ValueError(f"{where}: the last message must be the assistant's response; got {last!r:.80}")
        out = {k: v for k, v in row.items() if k != "messages"}
        out.update(messages=msgs[:-1], completion=last["content"])
        return out
    keys = sorted(row) if isinstance(row, Mapping) else type(row).__name__
    raise ValueError(f"{where}: expected {{'prompt': str, 'completion': str}} or {{'messages': [...]}}; got {keys}")


def write_jsonl(path: str | Path, rows: Iterable[Mapping]) -> int:
    """Writes rows atomically (a temporary file renamed into place); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n
