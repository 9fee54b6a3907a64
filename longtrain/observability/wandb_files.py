"""Read an offline W&B run (`<output_dir>/wandb/offline-run-*/run-<id>.wandb`) without
syncing it: the config, every logged step, the summary and the alerts.

The file is W&B's record log: a 7-byte header (":W&B", a 2-byte magic, a version byte), then
32 KiB blocks of records in LevelDB's log format (per record: CRC-32C 4 bytes, length 2
bytes little-endian, type 1 byte: 1 full, 2 first, 3 middle, 4 last fragment; a block's tail
shorter than a record header is zero padding). Each record's payload is a `Record` protobuf
of W&B's internal schema.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from typing import Any

_BLOCK = 32 * 1024
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    path: str
    run_id: str = ""
    name: str = ""
    group: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    alerts: list[tuple[str, str]] = field(default_factory=list)

    def series(self, key: str) -> list[Any]:
        """Every logged value of `key`, in step order."""
        return [row[key] for row in self.history if key in row]


def _payloads(data: bytes) -> list[bytes]:
    if data[:4] != b":W&B":
        raise ValueError("not a W&B run file (no ':W&B' header)")
    out: list[bytes] = []
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:
            pos += left
            continue
        length = int.from_bytes(data[pos + 4:pos + 6], "little")
        kind = data[pos + 6]
        if kind == 0:
            # zero padding to the end of the block
            pos += left
            continue
        payload = data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        if kind == _FULL:
            out.append(payload)
        elif kind == _FIRST:
            pending = payload
        elif kind == _MIDDLE:
            pending += payload
        elif kind == _LAST:
            out.append(pending + payload)
            pending = b""
    return out


def _items(items: Any) -> dict[str, Any]:
    out = {}
    for item in items:
        key = "/".join(item.nested_key) if item.nested_key else item.key
        out[key] = json.loads(item.value_json)
    return out


def read_offline_run(path: str) -> OfflineRun:
    """`path`: a run's .wandb file, its offline-run-* directory, or an output directory
    holding exactly one offline run."""
    from wandb.proto import wandb_internal_pb2 as pb

    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(path, "run-*.wandb"))
                       or glob.glob(os.path.join(path, "wandb", "offline-run-*", "run-*.wandb")))
        if len(found) != 1:
            raise ValueError(f"{path}: expected one offline W&B run file, found {len(found)}")
        path = found[0]
    with open(path, "rb") as f:
        data = f.read()
    run = OfflineRun(path=path)
    for payload in _payloads(data):
        record = pb.Record.FromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.name = record.run.run_id, record.run.display_name
            run.group, run.tags = record.run.run_group, list(record.run.tags)
            run.config.update(_items(record.run.config.update))
        elif kind == "config":
            run.config.update(_items(record.config.update))
        elif kind == "history":
            run.history.append(_items(record.history.item))
        elif kind == "summary":
            run.summary.update(_items(record.summary.update))
        elif kind == "alert":
            run.alerts.append((record.alert.title, record.alert.text))
    return run
