"""The cost of exact identities (issue 12), measured side by side in one run.

    python bench/identity.py [--old-ref REF]

1. Cache keys: the time to compute the per-sample identities and the batch
   digest of the flows' cache key for 100,000 keys, for samples that load from
   checkpoints (the usual case after the first step) and for in-memory data.
2. First run of a checkpointed step on 10,000 x 128 float64, this code against
   the previous identity (the code at ``--old-ref``, checked out in a temporary
   git worktree), each in a fresh process, alternated, best of 3 rounds.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

FIRST_RUN = """
import sys, tempfile, time
import numpy as np
from samplepipe import CheckpointWrapper, Sample, SampleWrapper
from sklearn.preprocessing import FunctionTransformer
rng = np.random.default_rng(0)
X = rng.normal(size=(10_000, 128))
samples = [Sample(x, key=f"s/{i:05d}") for i, x in enumerate(X)]
step = CheckpointWrapper(SampleWrapper(FunctionTransformer(np.negative)),
                         features_dir=tempfile.mkdtemp(dir=sys.argv[1]))
t0 = time.perf_counter()
step.transform(samples)
print(time.perf_counter() - t0)
"""


def cache_keys(n=100_000):
    from sklearn.preprocessing import StandardScaler

    from samplepipe import CheckpointWrapper, Sample, SampleWrapper
    from samplepipe.storage import CheckpointLoader, Identity, Stamp, keys_digest

    step = CheckpointWrapper(
        SampleWrapper(StandardScaler()), features_dir="/nonexistent"
    )
    step.estimator.estimator.fit(np.zeros((2, 8)))
    upstream = Identity("a" * 32, "b" * 32, "")
    lazy = []
    from samplepipe import DelayedSample

    for i in range(n):
        key = f"subject_{i // 10:05d}/sample_{i % 10:02d}"
        loader = CheckpointLoader(
            f"/x/{key}.h5",
            Identity(upstream.step, upstream.inputs, key),
            Stamp(1, 2, 3, 4),
        )
        lazy.append(DelayedSample(loader, key=key))
    rng = np.random.default_rng(0)
    eager = [Sample(rng.normal(size=128), key=s.key) for s in lazy]
    out = {}
    for name, samples in (
        ("lazy (from checkpoints)", lazy),
        ("in memory, 128 floats", eager),
    ):
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            # what StepCachePolicy.compute_key does for one batch
            inputs = step.input_identities(samples)
            step.step_identity()
            keys_digest(f"{s.key}={i}" for s, i in zip(samples, inputs))
            best = min(best, time.perf_counter() - t0)
        out[name] = best
    return out


def first_runs(old_ref, rounds=3):
    root = subprocess.run(
        ["git", "rev-parse", "--show-toplevel"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    scratch = tempfile.mkdtemp(prefix="samplepipe-bench-")
    old = os.path.join(scratch, "old")
    subprocess.run(
        ["git", "-C", root, "worktree", "add", "--detach", "-q", old, old_ref],
        check=True,
    )
    try:
        variants = {
            "this code": os.path.join(root, "src"),
            old_ref: os.path.join(old, "src"),
        }
        times = {k: [] for k in variants}
        for _ in range(rounds):
            for name, src in variants.items():
                env = dict(os.environ, PYTHONPATH=src)
                out = subprocess.run(
                    [sys.executable, "-c", FIRST_RUN, scratch],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                times[name].append(float(out.stdout))
        return {k: min(v) for k, v in times.items()}
    finally:
        subprocess.run(
            ["git", "-C", root, "worktree", "remove", "--force", old], check=True
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-ref", default="3b423de")
    args = parser.parse_args()
    for name, seconds in cache_keys().items():
        print(f"cache key, 100,000 keys, {name}: {seconds:.3f} s")
    runs = first_runs(args.old_ref)
    new, old = runs["this code"], runs[args.old_ref]
    print(f"first run 10,000 x 128, this code: {new:.3f} s")
    print(f"first run 10,000 x 128, {args.old_ref} (previous identity): {old:.3f} s")
    print(f"ratio this/previous: {new / old:.3f}")


if __name__ == "__main__":
    main()
