"""The cost of a step's code identity (issue 27): O(code), never O(data).

    python bench/code_identity.py [--modules 50] [--steps 10]

Writes a tree of user modules (each with a few functions that call functions
of the next modules through ``module.attribute``, a dispatch table and a
class), imports it, and times `estimator_identity` of a pipeline of ten steps
whose ``transform`` reaches the tree: in a fresh process (cold: nothing
cached) and again in the same process (warm), best of 5 each. The data the
pipeline runs on plays no part: the identity never reads a sample.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap

MODULE = """
import numpy as np
{imports}

K = {i}


def f{i}(X):
    return {calls}np.asarray(X) * {i}.0


def g{i}(X):
    return f{i}(X) + K


TABLE = {{"f": f{i}, "g": g{i}}}


class Op{i}:
    factor = {i}

    def apply(self, X):
        return TABLE["g"](X) * self.factor
"""

STEPS = """
import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
{imports}


class Step(TransformerMixin, BaseEstimator):
    def __init__(self, n=0):
        self.n = n

    def fit(self, X, y=None):
        return self

    def transform(self, X):
        return {body}
"""

TIMING = """
import sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
from sklearn.pipeline import Pipeline
from samplepipe.storage import estimator_identity
import steps
pipeline = [getattr(steps, f"Step{i}")(n=i) for i in range(int(sys.argv[2]))]
times = []
for _ in range(6):
    t0 = time.perf_counter()
    digests = [estimator_identity(s) for s in pipeline]
    times.append(time.perf_counter() - t0)
print(times[0], min(times[1:]))
"""


def write_tree(root: str, n_modules: int, n_steps: int) -> None:
    for i in range(n_modules):
        nxt = [j for j in (i + 1, i + 2) if j < n_modules]
        imports = "\n".join(f"import m{j}" for j in nxt)
        calls = "".join(f"m{j}.f{j}(X) + " for j in nxt)
        text = MODULE.format(i=i, imports=imports, calls=calls)
        with open(os.path.join(root, f"m{i}.py"), "w") as f:
            f.write(text)
    classes = []
    for s in range(n_steps):
        first = s * n_modules // n_steps
        body = STEPS.format(
            imports=f"import m{first}", body=f"m{first}.Op{first}().apply(X)"
        )
        classes.append(body.replace("class Step(", f"class Step{s}("))
    with open(os.path.join(root, "steps.py"), "w") as f:
        f.write("\n".join(textwrap.dedent(c) for c in classes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", type=int, default=50)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        write_tree(root, args.modules, args.steps)
        colds, warms = [], []
        for _ in range(args.rounds):
            out = subprocess.run(
                [sys.executable, "-c", TIMING, root, str(args.steps)],
                check=True,
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
            ).stdout.split()
            colds.append(float(out[0]))
            warms.append(float(out[1]))
    load = os.getloadavg()[0]
    print(
        f"code identity of {args.steps} steps over {args.modules} user modules "
        f"(load {load:.2f}), best of {args.rounds} processes:"
    )
    print(f"  first in a process: {min(colds) * 1e3:.2f} ms")
    print(f"  again in the same process: {min(warms) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
