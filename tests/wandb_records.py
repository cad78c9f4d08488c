"""Reading back an offline W&B run (the .wandb record log that `wandb sync` uploads), for tests."""
import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2


def wandb_records(path: Path) -> list:
    """The records of one .wandb file: a 7-byte header, then LevelDB-log chunks (crc32c, length, type) in 32 KiB
    blocks; a record is one FULL chunk or FIRST, MIDDLE..., LAST."""
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    records, parts, pos = [], [], 7
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and n == 0:  # zero padding to the end of a block
            pos += left
            continue
        parts.append(data[pos + 7:pos + 7 + n])
        pos += 7 + n
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(b"".join(parts))
            records.append(rec)
            parts = []
    return records


def run_logs(workdir: Path) -> list[list]:
    """The records of each offline run directory under workdir/wandb, oldest first.

    `run.finish()` returns once the exit record is sent, but the W&B service closes (flushes) the run's .wandb
    file on its own later; reading right away missed the exit record (1 CI run) or every record (1 of ~30).
    `wandb.teardown()` waits for the service process to exit, so every file is complete when read."""
    import wandb

    wandb.teardown()
    files = sorted((workdir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert files, f"no offline W&B run under {workdir}"
    return [wandb_records(f) for f in files]


def history(records) -> list[dict]:
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


def of_kind(records, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def tables(workdir: Path, stage: str, name: str) -> list[list[dict]]:
    """The rows of each W&B table `<stage>/<name>` the run under workdir logged, in logging order."""
    out = []
    for records in run_logs(workdir):
        run_dir = next((workdir / "wandb").glob(f"offline-run-*-{of_kind(records, 'run')[0].run_id}"))
        for h in history(records):
            if f"{stage}/{name}/path" in h:
                table = json.loads((run_dir / "files" / h[f"{stage}/{name}/path"]).read_text())
                out.append([dict(zip(table["columns"], row)) for row in table["data"]])
    return out
