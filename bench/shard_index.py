"""The per-process index of a sharded folder: memory held and lookup time.

    python bench/shard_index.py --n 1000000 --per-shard 100000

Writes ``--n`` entries (``--features`` float64 each) with
`ShardFolder.write_new` in shards of ``--per-shard`` entries, then, in a
fresh child process: loads the folder's index under ``tracemalloc`` (bytes
held per entry), and times `ShardFolder.find` of every identity in batches of
``--batch`` twice: the first pass verifies each shard's payloads, the second
is a cached run's lookup. Nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time


def identities(n):
    from samplepipe.storage import Identity

    return [Identity("s" * 32, f"{i:032x}", f"k/{i:07d}") for i in range(n)]


def build(root, n, per_shard, features):
    import numpy as np

    from samplepipe.storage import shards

    folder = shards.shard_folder(root)
    idents = identities(n)
    payload = np.zeros(features)
    for start in range(0, n, per_shard):
        chunk = idents[start : start + per_shard]
        folder.write_new(chunk, [payload] * len(chunk), ["a"] * len(chunk))


def measure(root, n, batch):
    import gc
    import tracemalloc

    from samplepipe.storage import shards

    idents = identities(n)
    gc.collect()
    tracemalloc.start()
    t = time.perf_counter()
    folder = shards.shard_folder(root)
    folder.refresh()
    load = time.perf_counter() - t
    shards.DATA.clear()
    gc.collect()
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    times = []
    for _ in range(2):
        t = time.perf_counter()
        for start in range(0, n, batch):
            found = folder.find(idents[start : start + batch])
            assert all(not isinstance(f, str) for f in found)
        times.append(time.perf_counter() - t)
    return {
        "entries": n,
        "index_load_s": round(load, 3),
        "held_bytes_per_entry": round(held / n, 1),
        "find_first_s": round(times[0], 3),
        "find_cached_s": round(times[1], 3),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--per-shard", type=int, default=100_000)
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--child", default="")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.n, args.batch)))
        return
    with tempfile.TemporaryDirectory(prefix="samplepipe-index-") as root:
        t = time.perf_counter()
        build(root, args.n, args.per_shard, args.features)
        print(
            f"built {args.n:,} entries in {time.perf_counter() - t:.1f} s", flush=True
        )
        cmd = [sys.executable, __file__, "--n", str(args.n), "--batch", str(args.batch)]
        subprocess.run([*cmd, "--child", root], check=True)


if __name__ == "__main__":
    main()
