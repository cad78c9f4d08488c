"""Parquet files as rows: the format Hugging Face datasets and verl publish RL and SFT data in.

`iter_parquet(path)` yields `(row number, row dict)` with 1-based row numbers, which the loaders use where a JSON-lines
file has line numbers (an error names `FILE.parquet:ROW`). Nested columns become lists and dicts; values JSON cannot
hold become what JSON-lines files would have held (timestamps and dates as ISO text, decimals as floats, UTF-8
bytes as text), so a row read from parquet behaves as the same row read from JSON lines. Rows are read one record
batch at a time, not the whole table.

Example:
    >>> import tempfile, pyarrow as pa, pyarrow.parquet as pq
    >>> path = tempfile.mktemp(suffix=".parquet")
    >>> pq.write_table(pa.table({"problem": ["1+1?"], "reward_model": [{"ground_truth": "2", "style": "rule"}]}), path)
    >>> list(iter_parquet(path))
    [(1, {'problem': '1+1?', 'reward_model': {'ground_truth': '2', 'style': 'rule'}})]
"""
from __future__ import annotations

import datetime
import decimal
import os
from pathlib import Path
from typing import Any, Iterator

SUFFIXES = (".parquet", ".pq")
_BATCH_ROWS = 1024


def is_parquet(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in SUFFIXES


def _plain(value: Any, where: str) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v, where) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        # pyarrow gives map columns as lists of (key, value) tuples; a list of pairs is what they are, kept as lists
        return [_plain(v, where) for v in value]
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{where}: a binary value that is not UTF-8 text ({value[:20]!r}...); rows hold "
                             "text, numbers, lists and dicts") from None
    return value


def iter_parquet(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(1-based row number, row) of a parquet file; a missing, empty, truncated or non-parquet file is an error."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        reader = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable parquet file (truncated or another format?): {e}") from None
    if reader.metadata.num_rows == 0:
        raise ValueError(f"{path}: file holds no rows")
    n = 0
    try:
        for batch in reader.iter_batches(batch_size=_BATCH_ROWS):
            for row in batch.to_pylist():
                n += 1
                yield n, _plain(row, f"{path}:{n}")
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: reading rows after row {n} failed (damaged file?): {e}") from None
