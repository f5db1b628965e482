"""Work that the crash tests kill with SIGKILL at random moments.

python _child.py transform FEATURES_DIR LOG N
python _child.py model MODEL_PATH
python _child.py flow FEATURES_DIR LOG N      (PREFECT_API_URL must be set)
python _child.py forks [flow]                 a fork server, see `serve_forks`
"""

import functools
import os
import signal
import sys
import traceback

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

from samplepipe import CheckpointWrapper, SampleWrapper
from samplepipe.testing import CountingTransformer, random_samples


class BigModel(TransformerMixin, BaseEstimator):
    """Fitting stores a 16 MB array, so that saving the model takes a while."""

    def __init__(self, seed=0):
        self.seed = seed

    def fit(self, X, y=None):
        self.weights_ = np.random.default_rng(self.seed).normal(size=2_000_000)
        return self

    def transform(self, X):
        return X


def transformer(log):
    return SampleWrapper(CountingTransformer(offset=1.0, stateless=True, log_path=log))


@functools.cache
def samples_of(n):
    return random_samples(n, n_features=16, seed=7)


def transform(features, log, n):
    wrapper = CheckpointWrapper(transformer(log), features_dir=features)
    wrapper.transform(samples_of(int(n)))


def model(path):
    samples = random_samples(4)
    seed = 0
    while True:  # refit and save until killed
        seed += 1
        CheckpointWrapper(SampleWrapper(BigModel(seed=seed)), model_path=path).fit(
            samples
        )


def flow(features, log, n):
    from sklearn.pipeline import Pipeline

    from samplepipe.flows import transform_pipeline

    pipe = Pipeline(
        [("step", CountingTransformer(offset=1.0, stateless=True, log_path=log))]
    )
    transform_pipeline(
        pipe,
        samples_of(int(n)),
        features_dir=features,
        model_dir=features,
        batch_size=250,
    )


WORK = {"transform": transform, "model": model, "flow": flow}


def serve_forks():
    """Fork a child per request; the work starts at once, imports are done.

    Reads lines from stdin, answers one line each on stdout:
    ``start MODE ARGS...`` -> the child's pid (the child runs ``WORK[MODE]``
    and exits 0, or 1 on an exception); ``wait PID`` -> ``killed`` if SIGKILL
    ended the child, else ``exit CODE``. An unwaited child stays a zombie, so
    its pid is never reused while the caller may signal it.
    """
    if sys.argv[2:] == ["flow"]:
        import samplepipe.flows  # noqa: F401  (imported once, not per child)
    print("READY", flush=True)
    for line in sys.stdin:
        command, *args = line.split()
        if command == "start":
            mode, *args = args
            if mode != "model":
                samples_of(int(args[-1]))  # made once, before the fork
            pid = os.fork()
            if pid == 0:
                devnull = os.open(os.devnull, os.O_RDWR)
                os.dup2(devnull, 0)
                os.dup2(devnull, 1)
                code = 0
                try:
                    WORK[mode](*args)
                except BaseException:
                    traceback.print_exc()
                    code = 1
                finally:
                    sys.stderr.flush()
                    os._exit(code)
            print(pid, flush=True)
        elif command == "wait":
            _, status = os.waitpid(int(args[0]), 0)
            if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
                print("killed", flush=True)
            else:
                print(f"exit {os.waitstatus_to_exitcode(status)}", flush=True)


def main():
    mode, *args = sys.argv[1:]
    if mode == "forks":
        serve_forks()
        return
    if mode != "model":
        samples_of(int(args[-1]))
    print("READY", flush=True)
    WORK[mode](*args)
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
