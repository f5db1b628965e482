"""The cost of `CheckpointWrapper.explain` (issue 24): 100,000 samples in <= 2 s.

    python bench/explain.py [--n 100000] [--layout files]

Writes ``n`` checkpoints of 16 float64 each (untimed), then, each in a new
process (imports and building the samples excluded), times ``explain`` of
all samples: (a) nothing changed, every sample reused; (b) a parameter
changed, every sample recomputed, each naming the parameter. Best of 3 each,
with the load average printed beside it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

BUILD = """
import sys
import numpy as np
from sklearn.preprocessing import FunctionTransformer
import samplepipe as sp

def times(X, factor=1.0):
    return np.asarray(X) * factor

def step(folder, layout, factor):
    return sp.wrap(["sample", "checkpoint"],
                   FunctionTransformer(times, kw_args={"factor": factor}),
                   features_dir=folder, layout=layout)

def samples(n):
    X = np.random.default_rng(0).normal(size=(n, 16))
    return [sp.Sample(x, key=f"{i // 1000:03d}/{i:07d}") for i, x in enumerate(X)]
"""

WRITE = (
    BUILD
    + """
folder, layout, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
step(folder, layout, 2.0).transform(samples(n))
"""
)

TIME = (
    BUILD
    + """
import time, collections
folder, layout = sys.argv[1], sys.argv[2]
n, factor = int(sys.argv[3]), float(sys.argv[4])
s = samples(n)
wrapper = step(folder, layout, factor)
t0 = time.perf_counter()
explained = wrapper.explain(s)
seconds = time.perf_counter() - t0
counts = collections.Counter((e.action, e.reason) for e in explained)
print(seconds, dict(counts), explained[0].detail)
"""
)


def run(script: str, *args: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--layout", default="files", choices=["files", "shards"])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as folder:
        run(WRITE, folder, args.layout, str(args.n))
        print(
            f"explain of {args.n:,} samples, layout={args.layout} "
            f"(load {os.getloadavg()[0]:.2f}), best of {args.rounds} new processes:"
        )
        for label, factor in (("all reused", "2.0"), ("a parameter changed", "3.0")):
            best, said = None, ""
            for _ in range(args.rounds):
                out = run(TIME, folder, args.layout, str(args.n), factor)
                seconds, rest = out.split(" ", 1)
                if best is None or float(seconds) < best:
                    best, said = float(seconds), rest.strip()
            assert best is not None
            print(f"  {label}: {best:.2f} s  {said}")


if __name__ == "__main__":
    main()
