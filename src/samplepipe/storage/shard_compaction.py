"""Compaction of a folder of shards: small shards merged, unusable entries dropped.

`ShardFolder.compact` (see there) is this function; it lives here to keep
`samplepipe.storage.shard_folders` a module of one concern, its index.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .shard_file import _checksum_ok, _payload, split_points
from .shard_index import GOOD, ChangedWhileReading, ShardIndex
from .status import Status


def compact_folder(
    folder: Any,  # a ShardFolder (not imported: shard_folders imports this)
    shard_size: int | None,
    step: str | None,
    shard_bytes: int,
) -> dict[str, Any]:
    """`ShardFolder.compact` of ``folder``."""
    with folder.lock:
        folder.refresh()
        for index in list(folder.shards.values()):
            folder.verify(index)
        valid = folder._valid_entries(step) if step is not None else None
        newest = folder._newest(lambda index: index.verified == GOOD, str)
        shards = sorted(
            (i for i in folder.shards.values() if i.status == Status.OK),
            key=lambda i: i.path,
        )
    kept_of: dict[str, list[int]] = {}
    dropping: set[str] = set()
    for index in shards:
        kept = newest.get(index.path, np.zeros(len(index), bool))
        if valid is not None:
            kept = kept & valid.get(index.path, False)
        kept_of[index.path] = np.flatnonzero(kept).tolist()
        if len(kept_of[index.path]) < len(index):
            dropping.add(index.path)

    def full(index: ShardIndex) -> bool:
        if shard_size is not None and len(kept_of[index.path]) >= shard_size:
            return True
        return index.size >= shard_bytes // 2

    candidates = [i for i in shards if i.path in dropping or not full(i)]
    report: dict[str, Any] = {
        "shards": len(shards),
        "written": [],
        "removed": [],
        "kept": sum(len(kept_of[i.path]) for i in candidates),
        "dropped": sum(len(i) - len(kept_of[i.path]) for i in candidates),
    }
    if not dropping and len(candidates) < 2:
        report.update(kept=0, dropped=0)
        return report
    pending: list[tuple[str, np.ndarray, int]] = []
    done: list[ShardIndex] = []

    def flush(final: bool) -> None:
        ends = split_points([p.nbytes for _, p, _ in pending], *limits)
        if not final:
            ends = ends[:-1]  # the last shard may take more entries
        start = 0
        for end in ends:
            chunk = pending[start:end]
            start = end
            written = folder.write(
                [r for r, _, _ in chunk],
                [p for _, p, _ in chunk],
                [t for _, _, t in chunk],
            )
            report["written"].append(written.path)
        del pending[:start]

    limits = (shard_size, shard_bytes)

    for index in candidates:
        arrays = folder._arrays(index) if kept_of[index.path] else {}
        texts = index.texts() if kept_of[index.path] else ()
        if arrays is None or texts is None:  # changed since judged: leave it
            continue
        try:
            entries = index.entries
        except ChangedWhileReading:  # changed since judged: leave it
            continue
        for position in kept_of[index.path]:
            g, row, t = (int(v) for v in entries[position])
            payload = _payload(arrays, g, row)
            record = texts[position]
            if not _checksum_ok(payload, record):  # changed under us
                break
            pending.append((record, np.array(payload), t))
        else:
            done.append(index)
            flush(final=False)
    flush(final=True)
    for index in done:
        if folder.remove(index.path, index.stamp):
            report["removed"].append(index.path)
    return report
