"""Requests to an S3 API server per 10,000 samples: one file per sample vs shards.

    python bench/s3_requests.py            # 10,000 x 128 float64, shards of 1,000
    python bench/s3_requests.py --n 1000   # smaller

One command starts the tests' S3 API server (moto in server mode on 127.0.0.1,
behind a counter of requests by kind: ``tests/test_storage_fs.py``) and, for
each layout, counts the requests of: a first ``transform`` (compute + write); a
second ``transform`` in the same process; the same in a new process (a child
process: nothing of the first one's caches); loading every output's data in
that new process. Nothing here is a test, and no figure is a time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_storage_fs import BUCKET, S3_ENV, SERVER, S3Server  # noqa: E402

CHILD = r"""
import json, sys
import numpy as np
from sklearn.preprocessing import FunctionTransformer
from samplepipe import CheckpointWrapper, SampleWrapper
from samplepipe.storage import TransformReport
from samplepipe.testing import random_samples

root, layout, n, d, shard_size, endpoint = sys.argv[1:7]
step = CheckpointWrapper(
    SampleWrapper(FunctionTransformer()),
    features_dir=root,
    storage_options={"endpoint_url": endpoint},
    layout=layout,
    shard_size=int(shard_size),
)
samples = random_samples(int(n), n_features=int(d))
report = TransformReport()
out = step.transform_samples(samples, report=report)
print(json.dumps({"computed": report.computed}), flush=True)
input()  # the parent counts the transform's requests, then lets us load
total = float(sum(np.sum(o.data) for o in out))
print(json.dumps({"sum": total}), flush=True)
input()
"""


def child(server, root, layout, args):
    """A new process: transform, wait, load every output; requests of each part."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CHILD,
            root,
            layout,
            str(args.n),
            str(args.d),
            str(args.shard_size),
            server.endpoint,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    server.requests()  # what came before: not this process's
    seen = {}
    computed = json.loads(proc.stdout.readline())["computed"]
    seen["transform"] = server.requests()
    proc.stdin.write("\n")
    proc.stdin.flush()
    json.loads(proc.stdout.readline())
    seen["load every output"] = server.requests()
    proc.stdin.write("\n")
    proc.stdin.flush()
    proc.wait(timeout=600)
    return computed, seen


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--shard-size", type=int, default=1000)
    args = parser.parse_args()
    os.environ.update(S3_ENV)
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True
    )
    try:
        port = int(proc.stdout.readline())
        server = S3Server(proc, f"http://127.0.0.1:{port}")
        import fsspec

        fsspec.filesystem("s3", endpoint_url=server.endpoint).mkdir(f"s3://{BUCKET}")
        print(f"S3 requests, {args.n:,} samples x {args.d} float64", flush=True)
        rows = {}
        for layout in ("files", "shards"):
            root = f"s3://{BUCKET}/{uuid.uuid4().hex}/{layout}"
            computed, first = child(server, root, layout, args)
            assert computed == args.n, computed
            computed, again = child(server, root, layout, args)
            assert computed == 0, computed
            rows[layout] = {
                "first run, new process: transform": first["transform"],
                "first run: load every output": first["load every output"],
                "re-run in a new process: transform": again["transform"],
                "re-run: load every output": again["load every output"],
            }
        print(f"\n| phase | files | shards of {args.shard_size:,} | files / shards |")
        print("|---|---:|---:|---:|")
        for phase in rows["files"]:
            f, s = rows["files"][phase], rows["shards"][phase]
            nf, ns = sum(f.values()), sum(s.values())
            ratio = f"{nf / ns:.0f}x" if ns else "-"
            print(f"| {phase} | {nf:,} {dict(f)} | {ns:,} {dict(s)} | {ratio} |")
        total_f = sum(sum(c.values()) for c in rows["files"].values())
        total_s = sum(sum(c.values()) for c in rows["shards"].values())
        print(f"| all four | {total_f:,} | {total_s:,} | {total_f / total_s:.0f}x |")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
