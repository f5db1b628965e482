"""layout="shards" against raw h5py one-file-per-sample loops, in one run.

    python bench/shards.py                 # 10,000 x 128 float64, best of 3 rounds
    python bench/shards.py --n 2000        # smaller, for a smoke test

Measured side by side, each round into fresh folders:

* raw h5py: write one file per sample (``f["array"] = x``), read them back;
* ``CheckpointWrapper(layout="shards")`` first run (compute + write), and
  the same transform without checkpoints (``SampleWrapper`` alone: what any
  layout pays for computing and making output samples);
* its re-run in a new process (a child: imports and sample creation are not
  timed; the transform and reading every sample's data are). The child's
  first `step_identity` is timed apart: it costs the same in every layout
  and once per process (``importlib.metadata`` scans installed packages to
  name the version of a standard-library module the step's code uses);
* disk use (allocated blocks) of both against the raw data size.

Nothing here is a test; the figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np


def make_samples(n, d, seed=0):
    from samplepipe import Sample

    data = np.random.default_rng(seed).normal(size=(n, d))
    return [Sample(data[i], key=f"s/{i:06d}") for i in range(n)]


def step(features, shard_size):
    from samplepipe import CheckpointWrapper, SampleWrapper
    from samplepipe.testing import CountingTransformer

    return CheckpointWrapper(
        SampleWrapper(CountingTransformer(offset=1.0, stateless=True)),
        features_dir=features,
        layout="shards",
        shard_size=shard_size,
    )


def read_all(samples):
    total = 0.0
    for s in samples:
        total += float(s.data[0])
    return total


def disk_use(folder):
    """(allocated bytes, apparent bytes, files) under ``folder``."""
    blocks = size = files = 0
    for d, _, names in os.walk(folder):
        for name in names:
            st = os.stat(os.path.join(d, name))
            blocks += st.st_blocks * 512
            size += st.st_size
            files += 1
    return blocks, size, files


def rerun_child(features, n, d, shard_size):
    """The re-run in this new process: transform and read every sample."""
    samples = make_samples(n, d)
    wrapper = step(features, shard_size)
    gc.collect()
    t0 = time.perf_counter()
    wrapper.step_identity()  # once per process, whatever the layout (see notes)
    startup = time.perf_counter() - t0
    gc.collect()
    t0 = time.perf_counter()
    total = read_all(wrapper.transform(samples))
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "startup": startup, "total": total}))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--rerun-child", metavar="FEATURES")
    args = parser.parse_args()
    if args.rerun_child:
        rerun_child(args.rerun_child, args.n, args.d, args.shard_size)
        return
    n, d = args.n, args.d
    samples = make_samples(n, d)
    X = np.stack([s.data for s in samples]) + 1.0
    work = tempfile.mkdtemp(prefix="samplepipe-bench-shards-")
    rows = {
        "no checkpoint": [],
        "raw write": [],
        "raw read": [],
        "shards first": [],
        "shards rerun": [],
        "identity startup": [],
    }
    disk = {}
    print(
        f"{n} samples x {d} float64 ({X.nbytes / 1e6:.2f} MB), shard_size="
        f"{args.shard_size}, {args.rounds} rounds in {work}"
    )
    step(None, args.shard_size).step_identity()  # once per process, as the child
    try:
        for r in range(args.rounds):
            raw = os.path.join(work, f"raw{r}")
            os.makedirs(raw)
            gc.collect()
            t0 = time.perf_counter()
            for i in range(n):
                with h5py.File(os.path.join(raw, f"{i}.h5"), "w") as f:
                    f["array"] = X[i]
            rows["raw write"].append(time.perf_counter() - t0)
            gc.collect()
            t0 = time.perf_counter()
            total = 0.0
            for i in range(n):
                with h5py.File(os.path.join(raw, f"{i}.h5"), "r") as f:
                    total += float(f["array"][()][0])
            rows["raw read"].append(time.perf_counter() - t0)
            disk["raw"] = disk_use(raw)

            plain = step(None, args.shard_size).estimator
            gc.collect()
            t0 = time.perf_counter()
            plain.transform(samples)
            rows["no checkpoint"].append(time.perf_counter() - t0)

            features = os.path.join(work, f"shards{r}")
            wrapper = step(features, args.shard_size)
            gc.collect()
            t0 = time.perf_counter()
            out = wrapper.transform(samples)
            rows["shards first"].append(time.perf_counter() - t0)
            assert np.array_equal(out[-1].data, X[-1])
            child = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--rerun-child",
                    features,
                    "--n",
                    str(n),
                    "--d",
                    str(d),
                    "--shard-size",
                    str(args.shard_size),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            result = json.loads(child.stdout.strip().splitlines()[-1])
            assert abs(result["total"] - total) < 1e-6 * max(1.0, abs(total))
            rows["shards rerun"].append(result["seconds"])
            rows["identity startup"].append(result["startup"])
            disk["shards"] = disk_use(features)
            shutil.rmtree(raw)
            print(
                f"  round {r + 1}: "
                + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in rows.items())
                + f"; ratios {rows['raw write'][-1] / rows['shards first'][-1]:.1f}x"
                f" / {rows['raw read'][-1] / rows['shards rerun'][-1]:.1f}x"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best = {k: min(v) for k, v in rows.items()}
    print()
    for name, seconds in best.items():
        print(f"  {name:16s} {seconds:8.3f} s  {n / seconds:10.0f} samples/s")
    print()
    write_speedup = best["raw write"] / best["shards first"]
    read_speedup = best["raw read"] / best["shards rerun"]
    print(
        f"  raw write / shards first run         {write_speedup:6.1f}x  (target >= 10x)"
    )
    print(
        f"  raw read / shards new-process re-run {read_speedup:6.1f}x  (target >= 10x)"
    )
    with_startup = best["raw read"] / (best["shards rerun"] + best["identity startup"])
    print(f"  the same, with the process's first step identity {with_startup:6.1f}x")
    for name, (blocks, size, files) in disk.items():
        target = "  (target <= 1.5x)" if name == "shards" else ""
        print(
            f"  disk, {name:6s}: {blocks / 1e6:7.2f} MB allocated, "
            f"{size / 1e6:7.2f} MB apparent, {files:6d} files = "
            f"{blocks / X.nbytes:5.2f}x the data{target}"
        )


if __name__ == "__main__":
    main()
